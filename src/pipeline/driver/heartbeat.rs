//! The optional heartbeat: a non-transactional logical message written over
//! an ordinary SQL connection, so an idle database still moves the slot.

use std::sync::Arc;
use std::time::Duration;

use crate::observe::metrics::Metrics;
use crate::pipeline::settings::RelayConfig;

/// A heartbeat that takes longer than this is a connection to start again
/// (review N12: a black-holed connection would wait for ever, silently).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix of the relay's own heartbeat messages; never an event.
pub const HEARTBEAT_PREFIX: &str = "outbox-relay-heartbeat";

/// Writes a small non-transactional message into the relay's database every
/// `every`. On a server where other databases write all the WAL, the
/// walsender then has something of ours to decode and report, so the slot's
/// position keeps up even if keepalives alone would not move it.
pub(super) async fn heartbeat(cfg: RelayConfig, every: Duration, metrics: Arc<Metrics>) {
    let mut client = None;
    loop {
        tokio::time::sleep(every).await;
        if client.is_none() {
            match tokio::time::timeout(TIMEOUT, crate::pg::sql::connect(&cfg.database)).await {
                Ok(Ok((c, _connection))) => client = Some(c),
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {TIMEOUT:?}"),
                    };
                    metrics.heartbeat_failures.inc();
                    tracing::warn!(%error, "heartbeat: cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let sql = format!("SELECT pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')");
        let failed = match tokio::time::timeout(TIMEOUT, c.batch_execute(&sql)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {TIMEOUT:?}")),
        };
        if let Some(error) = failed {
            metrics.heartbeat_failures.inc();
            tracing::warn!(%error, "heartbeat failed; will reconnect");
            client = None;
        }
    }
}
