//! The settings of every Postgres connection the relay opens: a libpq URL
//! or keyword string, with the TLS parameters tokio-postgres does not know
//! taken out of it, the `ssl_*` overrides and the password sources
//! (file, environment, URL, `PGPASSWORD`).

use std::path::{Path, PathBuf};

use super::tls::*;

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

pub(super) const OUR_KEYS: [&str; 5] = [
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

pub(super) fn percent_decode(s: &str) -> Result<String, String> {
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

pub(super) fn read_password_file(path: &Path) -> Result<Vec<u8>, (&'static str, String)> {
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
