//! Ordinary SQL connections (not replication), for the operator commands
//! and the heartbeat: one way to open them, with the configured TLS, and one
//! error that says what the relay was doing when Postgres said no.

use std::time::Duration;

use tokio_postgres::Client;

use super::tls::DatabaseConfig;

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
    super::tls::connect_sql(db).await.map_err(SqlError::Connect)
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
