//! Ordinary SQL connections (not replication), for the operator commands
//! and the heartbeat: one way to open them, with the configured TLS, and one
//! error that says what the relay was doing when Postgres said no.

use std::time::Duration;

use tokio_postgres::Client;

use super::config::DatabaseConfig;

use super::tls::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("{context}: {source}")]
    Statement {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// For `map_err`: a failed statement, with what it was for.
pub fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SqlError {
    let context = context.into();
    move |source| SqlError::Statement { context, source }
}

/// Opens a connection; it runs on a task of its own, which ends when the
/// client is dropped (await the handle to know the connection closed).
pub async fn connect(
    db: &DatabaseConfig,
) -> Result<(Client, tokio::task::JoinHandle<()>), SqlError> {
    connect_sql(db).await.map_err(SqlError::Connect)
}

/// As [`connect`], giving up after `limit` unless the URL sets its own
/// `connect_timeout`: for commands an operator waits on.
pub async fn connect_within(db: &DatabaseConfig, limit: Duration) -> Result<Client, SqlError> {
    let mut db = db.clone();
    if db.get_connect_timeout().is_none() {
        db.connect_timeout(limit);
    }
    Ok(connect(&db).await?.0)
}

pub(super) fn first_host_is_unix(pg: &tokio_postgres::Config) -> bool {
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
pub(super) enum SqlTls {
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
