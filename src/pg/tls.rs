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
//! the `ssl_*` options (`pg::config` takes them apart). tokio-postgres knows only `disable`/`prefer`/`require`
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

    pub(super) fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
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
        let chain = if verify_chain {
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
            Some(webpki)
        } else {
            // prefer/require without a root certificate: encrypted, not
            // authenticated (libpq's semantics).
            None
        };
        let verifier = Arc::new(ServerCheck {
            chain,
            check_name: self.mode == SslMode::VerifyFull,
            provider: provider.clone(),
        });
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
pub(super) fn is_system(path: &Path) -> bool {
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

/// The server certificate check of an sslmode: webpki's chain verification
/// with the host name check optional (verify-ca, and require/prefer with a
/// root certificate), or none (prefer/require without one: encrypted, not
/// authenticated). The handshake signatures are checked either way, with the
/// provider's algorithms (what webpki's verifier checks them with).
#[derive(Debug)]
struct ServerCheck {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain first and the name last: a name error
        // means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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

#[cfg(test)]
mod tests;
