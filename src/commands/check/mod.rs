//! `outbox-relay check`: a preflight of everything `run` needs, one line per
//! requirement (PASS, WARN or FAIL), each failing line with its fix.
//!
//! It reads Postgres over an ordinary SQL connection and asks the brokers for
//! metadata; it changes nothing. The answer it gives is "would `run` start and
//! stream now?", so a missing publication or slot is a FAIL whose fix is
//! `outbox-relay setup`.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::RelayConfig;
use crate::pipeline::route::router::TableName;

mod failover;
mod kafka;
mod postgres;
mod transactions;

use kafka::kafka_checks;
use postgres::postgres_checks;

/// How long the broker has to answer a metadata request.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        })
    }
}

/// One requirement and how it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// Stable short name, e.g. `wal_level`, `publication`, `kafka brokers`.
    pub name: String,
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about it (set on every FAIL, and on WARNs with advice).
    pub fix: Option<String>,
}

impl CheckResult {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        CheckResult {
            name: name.into(),
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &str, detail: impl Into<String>, fix: Option<String>) -> Self {
        CheckResult {
            name: name.into(),
            outcome: Outcome::Warn,
            detail: detail.into(),
            fix,
        }
    }
    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        CheckResult {
            name: name.into(),
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn unknown(name: &str, e: tokio_postgres::Error) -> Self {
        Self::fail(
            name,
            format!("could not check: {}", pg_error(&e)),
            "run the check as the relay's role with read access to the pg_catalog views",
        )
    }
}

fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// An identifier as it would be typed in SQL: bare when that is unambiguous.
fn ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        crate::pg::quote_ident(s)
    }
}

fn table_sql(t: &TableName) -> String {
    format!("{}.{}", ident(&t.schema), ident(&t.name))
}

/// Runs every check. Never fails: problems are FAIL lines.
pub async fn run(cfg: &RelayConfig) -> Vec<CheckResult> {
    let mut results = match connect(cfg).await {
        Ok(client) => postgres_checks(&client, cfg).await,
        Err(e) => vec![CheckResult::fail(
            "postgres connection",
            format!("cannot connect: {e}"),
            "check --database-url (host, port, database, user, password) and that pg_hba.conf admits this user to this database",
        )],
    };
    results.insert(1.min(results.len()), server_identity(cfg));
    let owned = cfg.clone();
    match tokio::task::spawn_blocking(move || kafka_checks(&owned)).await {
        Ok(mut r) => results.append(&mut r),
        Err(e) => results.push(CheckResult::fail(
            "kafka brokers",
            format!("the broker check did not complete: {e}"),
            "run the check again",
        )),
    }
    // Without brokers that answer there is nothing more to ask Kafka.
    let brokers_answered = results
        .iter()
        .any(|r| r.name == "kafka brokers" && r.outcome == Outcome::Pass);
    if brokers_answered {
        results.extend(transactions::progress_and_transaction_checks(cfg).await);
    }
    results
}

/// Whether the relay verifies whom it talks to. libpq's default (`prefer`)
/// verifies nothing and may fall back to plain text: whoever sits in the
/// path could read every event and feed the relay forged changes, which it
/// would publish under its own Kafka identity.
fn server_identity(cfg: &RelayConfig) -> CheckResult {
    use crate::pg::tls::SslMode;
    use tokio_postgres::config::Host;
    const NAME: &str = "postgres identity";
    let mode = cfg.database.tls.mode;
    let local = cfg.database.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    });
    if mode == SslMode::VerifyFull {
        return CheckResult::pass(
            NAME,
            "sslmode=verify-full: the server's certificate chain and host name are verified",
        );
    }
    if local {
        return CheckResult::pass(
            NAME,
            format!("sslmode={mode}, and the server is on this host (loopback or a Unix socket): nothing in between to verify"),
        );
    }
    let what = match mode {
        SslMode::VerifyCa => "the certificate chain is verified but not the host name, so any server with a certificate from that CA is accepted".to_string(),
        SslMode::Prefer => "the server is not verified and the connection falls back to plain text if the server (or anything in between) declines TLS".to_string(),
        _ => format!("sslmode={mode} does not verify the server"),
    };
    CheckResult::warn(
        NAME,
        format!("{what}: whoever is in the path could read every event and feed the relay forged changes"),
        Some("add sslmode=verify-full&sslrootcert=/path/to/ca.pem to --database-url (or --ssl-mode verify-full --ssl-root-cert), and require_auth=scram-sha-256 so no password goes out in a weaker form".into()),
    )
}

async fn connect(cfg: &RelayConfig) -> Result<Client, String> {
    use crate::pg::sql::{connect_within, SqlError};
    connect_within(&cfg.database, Duration::from_secs(10))
        .await
        .map_err(|e| match e {
            SqlError::Connect(e) => pg_error(&e),
            other => other.to_string(),
        })
}

/// One line per result: `OUTCOME  name  detail; fix: …`, then a summary.
pub fn render(results: &[CheckResult]) -> String {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in results {
        out.push_str(&format!("{}  {:<width$}  {}", r.outcome, r.name, r.detail));
        if let Some(fix) = &r.fix {
            out.push_str(&format!("; fix: {fix}"));
        }
        out.push('\n');
    }
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
    out.push_str(&format!(
        "{} passed, {} warning(s), {} failed\n",
        count(Outcome::Pass),
        count(Outcome::Warn),
        count(Outcome::Fail)
    ));
    out
}

/// `outbox-relay check`: prints the results; exit code 1 if any failed.
pub async fn command(config: Option<&std::path::Path>, options: crate::config::Options) -> u8 {
    super::Entry::new("check", super::Kafka::Optional)
        .with_config(config, options, |cfg| async move { report(&cfg).await })
        .await
}

/// Every check run and printed; 1 on any FAIL.
pub async fn report(cfg: &RelayConfig) -> u8 {
    let results = run(cfg).await;
    print!("{}", render(&results));
    u8::from(results.iter().any(|r| r.outcome == Outcome::Fail))
}

#[cfg(test)]
mod tests;
