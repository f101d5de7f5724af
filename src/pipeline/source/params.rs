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
    /// The host this attempt connects to: the first of `hosts` until
    /// [`ReplicationConnection::connect`] tries the others.
    pub host: HostAddr,
    pub port: u16,
    /// Every host of the URL with its port (libpq's `host=a,b` and
    /// `port=5432,5433`), tried in order, as libpq does.
    pub hosts: Vec<(HostAddr, u16)>,
    /// libpq's `target_session_attrs`: `read-write` skips a server in
    /// recovery or read-only (a standby), `read-only` takes only one.
    pub target_session_attrs: tokio_postgres::config::TargetSessionAttrs,
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
    /// libpq's `options` (from the URL): command-line options for the
    /// walsender, e.g. `-c wal_sender_timeout=10s`, which bounds how long a
    /// standby waits for the slot after the active relay's host is lost.
    pub options: Option<String>,
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
        let ports = cfg.get_ports();
        let mut hosts: Vec<(HostAddr, u16)> = Vec::new();
        for (i, h) in cfg.get_hosts().iter().enumerate() {
            // One port for every host, or one per host (libpq's rule).
            let port = match ports.len() {
                0 => 5432,
                1 => ports[0],
                _ => *ports.get(i).ok_or_else(|| {
                    ReplicationError::Config(format!(
                        "the database URL names {} hosts but {} ports: give one port, or one per host",
                        cfg.get_hosts().len(),
                        ports.len()
                    ))
                })?,
            };
            let addr = match h {
                Host::Tcp(h) => HostAddr::Tcp(h.clone()),
                #[cfg(unix)]
                Host::Unix(p) => HostAddr::Unix(p.clone()),
            };
            hosts.push((addr, port));
        }
        if hosts.is_empty() {
            hosts.push((
                HostAddr::Tcp("localhost".to_string()),
                ports.first().copied().unwrap_or(5432),
            ));
        }
        let (host, port) = hosts[0].clone();
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
            hosts,
            target_session_attrs: cfg.get_target_session_attrs(),
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
            options: cfg.get_options().map(str::to_string),
        })
    }

    /// These parameters for one host of the list.
    pub(super) fn for_host(&self, host: &HostAddr, port: u16) -> ConnectParams {
        ConnectParams {
            host: host.clone(),
            port,
            ..self.clone()
        }
    }

    pub(super) fn target(&self) -> String {
        match &self.host {
            HostAddr::Tcp(h) => format!("{h}:{}", self.port),
            #[cfg(unix)]
            HostAddr::Unix(p) => format!("{}/.s.PGSQL.{}", p.display(), self.port),
        }
    }
}
