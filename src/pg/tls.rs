//! Connection security for every Postgres connection the relay opens: the
//! replication connection (`replication`) and the ordinary SQL connections
//! of `setup`, `status`, `check` and `verify`.
//!
//! libpq's settings, with libpq's meaning:
//!
//! | sslmode       | TLS                         | server certificate checked                  |
//! |---------------|-----------------------------|---------------------------------------------|
//! | `disable`     | never                       | -                                           |
//! | `prefer`      | if the server offers it     | chain only, and only if `sslrootcert` is set |
//! | `require`     | always                      | chain only, and only if `sslrootcert` is set |
//! | `verify-ca`   | always                      | chain against `sslrootcert`                 |
//! | `verify-full` | always                      | chain against `sslrootcert` and host name   |
//!
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are read from the
//! database URL (`?sslmode=verify-full&sslrootcert=/ca.pem`) or keyword
//! string (`sslmode=verify-full sslrootcert=/ca.pem`) and can be overridden by
//! the `ssl_*` options. tokio-postgres knows only `disable`/`prefer`/`require`
//! and none of the file parameters, so they are taken out of the string
//! before it is handed over.
//!
//! TLS is rustls with the `ring` provider, set per connection (no process
//! default needed). TLS is never tried over Unix-domain sockets, as in libpq.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// libpq's `allow` is accepted as `prefer` (the relay never needs the
    /// "plain first" order it means).
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode {other:?}; expected disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    /// Whether a server that refuses TLS is an error.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }

    fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authentication method the server may ask for, by libpq's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No password at all (`trust`, `peer`, a client certificate).
    None,
    /// A cleartext password.
    Password,
    Md5,
    ScramSha256,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }
}

/// libpq's `require_auth`: the methods the server may ask for, as a list
/// (`scram-sha-256`, `password,md5`) or as the methods it may not
/// (`!password,!md5`). Unset, any method is answered, as libpq does; set, a
/// server (or a man in the middle) cannot make the relay send a password in
/// a weaker form than the operator allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequireAuth {
    /// (methods, negated); None: anything goes.
    rule: Option<(Vec<AuthMethod>, bool)>,
}

impl RequireAuth {
    pub fn parse(s: &str) -> Result<RequireAuth, String> {
        let mut methods = Vec::new();
        let mut negated = None;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(
                    "require_auth: negated (!method) and plain methods cannot be mixed".into(),
                );
            }
            methods.push(match name {
                "none" => AuthMethod::None,
                "password" => AuthMethod::Password,
                "md5" => AuthMethod::Md5,
                "scram-sha-256" => AuthMethod::ScramSha256,
                other => {
                    return Err(format!(
                        "require_auth: unknown method {other:?} (known: none, password, md5, scram-sha-256)"
                    ))
                }
            });
        }
        Ok(RequireAuth {
            rule: negated.map(|n| (methods, n)),
        })
    }

    pub fn allows(&self, m: AuthMethod) -> bool {
        match &self.rule {
            None => true,
            Some((list, negated)) => list.contains(&m) != *negated,
        }
    }

    /// The rule as libpq writes it, for messages.
    pub fn describe(&self) -> String {
        match &self.rule {
            None => "any".into(),
            Some((list, negated)) => list
                .iter()
                .map(|m| format!("{}{}", if *negated { "!" } else { "" }, m.as_str()))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// The TLS settings of one database: no secrets, only paths. Also the
/// authentication rule (`require_auth`), which tokio-postgres does not know
/// either and which belongs to the same question: whom the relay trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// CA certificates (PEM) the server's chain must lead to.
    pub root_cert: Option<PathBuf>,
    /// Client certificate chain (PEM), for `cert` authentication.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    pub require_auth: RequireAuth,
}

/// A TLS setting that cannot be used: a file that cannot be read or parsed,
/// or settings that do not fit together.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

impl TlsSettings {
    /// What a bare tokio-postgres config implies: its sslmode, no files.
    pub fn from_tokio_postgres(cfg: &tokio_postgres::Config) -> TlsSettings {
        TlsSettings {
            mode: match cfg.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Require => SslMode::Require,
                _ => SslMode::Prefer,
            },
            ..TlsSettings::default()
        }
    }

    /// The rustls client configuration for these settings, reading the
    /// files now (so a renewed certificate is picked up on reconnect).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verify_chain = self.root_cert.is_some()
            || matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull);
        let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
            let path = self.root_cert.as_ref().ok_or_else(|| {
                TlsError(format!(
                    "sslmode={} needs the CA certificate that signed the server's certificate: set sslrootcert in the database URL or --ssl-root-cert",
                    self.mode
                ))
            })?;
            let mut roots = RootCertStore::empty();
            let certs = if is_system(path) {
                system_roots()?
            } else {
                read_certs("sslrootcert", path)?
            };
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("sslrootcert {}: {e}", path.display())))?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError(format!("sslrootcert {}: {e}", path.display())))?;
            Arc::new(ChainVerifier {
                inner: webpki,
                check_name: self.mode == SslMode::VerifyFull,
            })
        } else {
            // prefer/require without a root certificate: encrypted, not
            // authenticated (libpq's semantics).
            Arc::new(NoServerVerification(provider.clone()))
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certs("sslcert", cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    TlsError(format!(
                        "sslkey {}: cannot read a PEM private key: {}",
                        key.display(),
                        pem_error(&e)
                    ))
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    TlsError(format!(
                        "sslcert {} and sslkey {} do not fit together: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            (Some(_), None) => {
                return Err(TlsError(
                    "sslcert is set but sslkey is not: a client certificate needs its private key"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError(
                    "sslkey is set but sslcert is not: a client key needs its certificate".into(),
                ))
            }
        };
        // What libpq 17 sends; servers before 17 ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Arc::new(config))
    }

    /// The name the server certificate is checked against; with no host
    /// name check any valid name does.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        match ServerName::try_from(host.to_string()) {
            Ok(n) => Ok(n),
            Err(_) if self.mode != SslMode::VerifyFull => {
                Ok(ServerName::try_from("localhost").expect("valid name"))
            }
            Err(e) => Err(TlsError(format!(
                "host {host:?} cannot be checked against a certificate (sslmode=verify-full): {e}"
            ))),
        }
    }
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PEM item of the expected kind in it".into()
        }
        other => format!("{other:?}"),
    }
}

/// `sslrootcert=system` (libpq 16+): the operating system's trusted CAs
/// instead of a file, for servers with publicly signed certificates.
fn is_system(path: &Path) -> bool {
    path == Path::new("system")
}

/// The system's trusted CAs, as OpenSSL would find them (`SSL_CERT_FILE`
/// and `SSL_CERT_DIR` first, then the platform's bundle).
fn system_roots() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), |e| e.to_string());
        return Err(TlsError(format!(
            "sslrootcert=system: cannot load the system's trusted CA certificates ({why}); install the ca-certificates package, point SSL_CERT_FILE at a bundle, or set sslrootcert to a file"
        )));
    }
    Ok(found.certs)
}

fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "{what} {}: cannot read PEM certificates: {}",
                path.display(),
                pem_error(&e)
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// webpki chain verification, with the host name check optional
/// (verify-ca, and require/prefer with a root certificate).
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last: a name error
        // means the chain was good.
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any server certificate (sslmode prefer/require without a root
/// certificate), still checking the handshake signatures.
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Explains a failed TLS handshake: certificate problems in words an
/// operator can act on. None when the error is not a TLS one.
pub fn describe_handshake_error(e: &std::io::Error, mode: SslMode) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(c) => format!(
            "the server's TLS certificate was rejected (sslmode={mode}): {c}; check sslrootcert (the CA that signed the server certificate){}",
            if mode == SslMode::VerifyFull {
                " and that the certificate names the host you connect to (or use sslmode=verify-ca)"
            } else {
                ""
            }
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "the server ended the TLS handshake ({alert:?}): if it requires a client certificate, set sslcert and sslkey to one its ssl_ca_file trusts"
        ),
        other => format!("TLS handshake failed (sslmode={mode}): {other}"),
    })
}

/// A database to connect to: tokio-postgres's settings plus the TLS
/// settings tokio-postgres does not know. Derefs to the tokio-postgres
/// config for everything else (user, host, timeouts).
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub pg: tokio_postgres::Config,
    pub tls: TlsSettings,
}

impl std::ops::Deref for DatabaseConfig {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl std::ops::DerefMut for DatabaseConfig {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }
}

/// Anything a connection can be opened from: a [`DatabaseConfig`], or a
/// bare tokio-postgres config (its own sslmode, no certificate files).
pub trait DatabaseSource {
    fn pg_config(&self) -> &tokio_postgres::Config;
    fn tls_settings(&self) -> TlsSettings;
}

impl DatabaseSource for DatabaseConfig {
    fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }
    fn tls_settings(&self) -> TlsSettings {
        self.tls.clone()
    }
}

impl DatabaseSource for tokio_postgres::Config {
    fn pg_config(&self) -> &tokio_postgres::Config {
        self
    }
    fn tls_settings(&self) -> TlsSettings {
        TlsSettings::from_tokio_postgres(self)
    }
}

/// The SSL parameters found in a database URL or keyword string.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SslParams {
    pub mode: Option<SslMode>,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub require_auth: Option<RequireAuth>,
}

const OUR_KEYS: [&str; 5] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "require_auth",
];

impl SslParams {
    fn take(&mut self, key: &str, value: String) -> Result<(), String> {
        match key {
            "sslmode" => self.mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => self.root_cert = Some(PathBuf::from(value)),
            "sslcert" => self.cert = Some(PathBuf::from(value)),
            "sslkey" => self.key = Some(PathBuf::from(value)),
            "require_auth" => self.require_auth = Some(RequireAuth::parse(&value)?),
            _ => unreachable!("not an SSL key"),
        }
        Ok(())
    }
}

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of a libpq URL
/// or keyword string: (the rest, for tokio-postgres; what was taken). Errors
/// never quote the string (it may hold a password).
pub fn split_ssl_params(s: &str) -> Result<(String, SslParams), String> {
    let mut params = SslParams::default();
    let trimmed = s.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = trimmed.split_once('?') else {
            return Ok((trimmed.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k)?;
            if OUR_KEYS.contains(&key.as_str()) {
                params.take(&key, percent_decode(v)?)?;
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, params));
    }
    // Keyword string: key = value, values optionally 'quoted' with \ escapes.
    let mut rest = String::new();
    let mut chars = trimmed.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not key=value: let tokio-postgres report it.
            return Ok((trimmed.to_string(), SslParams::default()));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or("unterminated quoted value")?),
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted value".into()),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or("trailing backslash")?);
                } else {
                    value.push(c);
                }
            }
        }
        if OUR_KEYS.contains(&key.as_str()) {
            params.take(&key, value)?;
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&key);
            rest.push_str("='");
            rest.push_str(&value.replace('\\', "\\\\").replace('\'', "\\'"));
            rest.push('\'');
        }
    }
    Ok((rest, params))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("invalid percent-encoding in a URL parameter")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a URL parameter is not UTF-8".to_string())
}

fn first_host_is_unix(pg: &tokio_postgres::Config) -> bool {
    #[cfg(unix)]
    {
        matches!(pg.get_hosts().first(), Some(Host::Unix(_)))
    }
    #[cfg(not(unix))]
    {
        let _ = pg;
        false
    }
}

/// The connector of the SQL connections: rustls, or the reason it could not
/// be built (reported by tokio-postgres as a TLS error).
enum SqlTls {
    Ready(MakeRustlsConnect),
    Failed(String),
}

impl<S> MakeTlsConnect<S> for SqlTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, std::io::Error> {
        match self {
            SqlTls::Ready(m) => {
                match <MakeRustlsConnect as MakeTlsConnect<S>>::make_tls_connect(m, hostname) {
                    Ok(c) => Ok(c),
                    Err(never) => match never {},
                }
            }
            SqlTls::Failed(msg) => Err(std::io::Error::other(msg.clone())),
        }
    }
}

/// Opens an ordinary SQL connection with the database's TLS settings; the
/// connection runs on its own task (returned, ended when the client drops).
pub async fn connect_sql(
    db: &DatabaseConfig,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let mut pg = db.pg.clone();
    let mode = if first_host_is_unix(&pg) {
        SslMode::Disable
    } else {
        db.tls.mode
    };
    pg.ssl_mode(mode.for_tokio_postgres());
    let tls = match db.tls.client_config() {
        Ok(c) => SqlTls::Ready(MakeRustlsConnect::new((*c).clone())),
        Err(_) if mode == SslMode::Disable => SqlTls::Failed("TLS is disabled".into()),
        Err(e) => SqlTls::Failed(e.0),
    };
    let (client, connection) = pg.connect(tls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    });
    Ok((client, task))
}

/// The overrides of [`DatabaseConfig::resolve`], from the relay's options.
#[derive(Default)]
pub struct Overrides {
    pub ssl_mode: Option<SslMode>,
    pub ssl_root_cert: Option<PathBuf>,
    pub ssl_cert: Option<PathBuf>,
    pub ssl_key: Option<PathBuf>,
    /// From --database-password / OUTBOX_RELAY_DATABASE_PASSWORD.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `PGPASSWORD`, used only when nothing else gives a password.
    pub pgpassword: Option<String>,
}

impl DatabaseConfig {
    /// Parses a URL or keyword string and applies the options over it.
    /// Password precedence: the password file or password option (only
    /// one may be set), then the URL's, then `PGPASSWORD`. Errors
    /// (`(option, reason)`) never contain the URL or a password.
    pub fn resolve(url: &str, o: Overrides) -> Result<DatabaseConfig, (&'static str, String)> {
        const EXPECTED: &str =
            "expected postgres://user[:password]@host[:port]/dbname or host=… user=… dbname=…";
        let (rest, ssl) =
            split_ssl_params(url).map_err(|e| ("database_url", format!("{e}; {EXPECTED}")))?;
        let mut pg: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| ("database_url", format!("{e}; {EXPECTED}")))?;
        let root_cert = o.ssl_root_cert.or(ssl.root_cert);
        let system = root_cert.as_deref().is_some_and(is_system);
        // As libpq: sslrootcert=system implies verify-full, and refuses a
        // weaker mode (any site with a public certificate would pass).
        let mode = match o.ssl_mode.or(ssl.mode) {
            Some(m) => m,
            None if system => SslMode::VerifyFull,
            None => SslMode::default(),
        };
        if system && mode != SslMode::VerifyFull {
            return Err((
                "ssl_mode",
                format!("sslmode={mode} cannot be used with sslrootcert=system: the system's CAs vouch for every public host, so only sslmode=verify-full (the host name checked) means anything; set sslmode=verify-full or drop it"),
            ));
        }
        let tls = TlsSettings {
            mode,
            root_cert,
            cert: o.ssl_cert.or(ssl.cert),
            key: o.ssl_key.or(ssl.key),
            require_auth: ssl.require_auth.unwrap_or_default(),
        };
        let password = match (o.password, o.password_file) {
            (Some(_), Some(_)) => {
                return Err((
                    "database_password_file",
                    "set either database_password (OUTBOX_RELAY_DATABASE_PASSWORD) or database_password_file, not both".into(),
                ))
            }
            (Some(p), None) => Some(p.into_bytes()),
            (None, Some(path)) => Some(read_password_file(&path)?),
            (None, None) if pg.get_password().is_none() => {
                o.pgpassword.filter(|p| !p.is_empty()).map(String::into_bytes)
            }
            (None, None) => None,
        };
        if let Some(p) = password {
            pg.password(p);
        }
        let db = DatabaseConfig { pg, tls };
        // Read the certificate files now: a bad path is a configuration
        // error at start, not a connection error later.
        if db.tls.mode != SslMode::Disable {
            db.tls.client_config().map_err(|e| ("database_url", e.0))?;
        }
        Ok(db)
    }
}

fn read_password_file(path: &Path) -> Result<Vec<u8>, (&'static str, String)> {
    let mut bytes = std::fs::read(path).map_err(|e| {
        (
            "database_password_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err((
            "database_password_file",
            format!("{} is empty", path.display()),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
