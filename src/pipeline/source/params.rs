//! Where and how to connect: libpq-style connection settings resolved for
//! the replication connection (hosts, port, user, TLS, timeouts).

use std::time::Duration;

use tokio_postgres::config::Host;

use super::*;
use crate::pg::config::DatabaseSource;
use crate::pg::tls::TlsSettings;

/// What the relay needs to open a replication connection, taken from a
/// libpq-style URL or keyword string (parsed by tokio-postgres) and the TLS
/// settings.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: HostAddr,
    pub port: u16,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// How long written data may stay unacknowledged by the peer before the
    /// kernel gives up on the connection (TCP_USER_TIMEOUT); None leaves the
    /// kernel's retry time (about 15 minutes).
    pub tcp_user_timeout: Option<Duration>,
    /// libpq's `channel_binding` (from the URL): SCRAM-SHA-256-PLUS, which
    /// binds the password exchange to this TLS connection, is used when the
    /// server offers it over TLS (`prefer`), required (`require`) or never
    /// used (`disable`).
    pub channel_binding: tokio_postgres::config::ChannelBinding,
    pub tls: TlsSettings,
}

impl std::fmt::Debug for ConnectParams {
    // Hand-written so that a password can never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub enum HostAddr {
    Tcp(String),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

impl ConnectParams {
    /// From a [`crate::pg::config::DatabaseConfig`] (TLS settings included) or a
    /// bare `tokio_postgres::Config` (its sslmode, no certificate files).
    pub fn from_config<D: DatabaseSource + ?Sized>(db: &D) -> Result<Self, ReplicationError> {
        let cfg = db.pg_config();
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => HostAddr::Tcp(h.clone()),
            #[cfg(unix)]
            Some(Host::Unix(p)) => HostAddr::Unix(p.clone()),
            None => HostAddr::Tcp("localhost".to_string()),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .map(str::to_string)
            .ok_or_else(|| ReplicationError::Config("the database URL names no user".into()))?;
        let dbname = cfg
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        Ok(ConnectParams {
            host,
            port,
            user,
            password: cfg.get_password().map(<[u8]>::to_vec),
            dbname,
            application_name: cfg
                .get_application_name()
                .unwrap_or("outbox-relay")
                .to_string(),
            connect_timeout: cfg
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            tcp_user_timeout: None,
            channel_binding: cfg.get_channel_binding(),
            tls: db.tls_settings(),
        })
    }

    pub(super) fn target(&self) -> String {
        match &self.host {
            HostAddr::Tcp(h) => format!("{h}:{}", self.port),
            #[cfg(unix)]
            HostAddr::Unix(p) => format!("{}/.s.PGSQL.{}", p.display(), self.port),
        }
    }
}
