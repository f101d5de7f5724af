//! The optional heartbeat: a non-transactional logical message written over
//! an ordinary SQL connection, so an idle database still moves the slot.

use std::time::Duration;

use crate::config::RelayConfig;

/// Prefix of the relay's own heartbeat messages; never an event.
pub const HEARTBEAT_PREFIX: &str = "outbox-relay-heartbeat";

/// Writes a small non-transactional message into the relay's database every
/// `every`. On a server where other databases write all the WAL, the
/// walsender then has something of ours to decode and report, so the slot's
/// position keeps up even if keepalives alone would not move it.
pub(super) async fn heartbeat(cfg: RelayConfig, every: Duration) {
    let mut client = None;
    loop {
        tokio::time::sleep(every).await;
        if client.is_none() {
            match crate::pg::sql::connect(&cfg.database).await {
                Ok((c, _connection)) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat: cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let sql = format!("SELECT pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')");
        if let Err(e) = c.batch_execute(&sql).await {
            tracing::warn!(error = %e, "heartbeat failed; will reconnect");
            client = None;
        }
    }
}
