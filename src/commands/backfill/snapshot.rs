//! The slot and its exported snapshot: the one point where what backfill
//! reads ends and what `run` streams begins. Owns the replication connection
//! that keeps the snapshot alive; reads no rows.

use crate::config::RelayConfig;
use crate::lsn::Lsn;
use crate::pipeline::source::{ConnectParams, ReplicationConnection};

use super::BackfillError;

/// Creates the slot over a replication connection of its own, exporting a
/// snapshot that lives while that connection stays open and idle: the slot's
/// consistent point is where the snapshot ends and the stream begins.
pub(super) async fn create_slot_with_snapshot(
    cfg: &RelayConfig,
    slot: &str,
) -> Result<(ReplicationConnection, Lsn, String), BackfillError> {
    let slot = slot.to_string();
    let params = ConnectParams::from_config(&cfg.database)
        .map_err(|e| BackfillError::Config(e.to_string()))?;
    let mut repl =
        ReplicationConnection::connect(&params)
            .await
            .map_err(|e| BackfillError::CreateSlot {
                slot: slot.clone(),
                reason: e.to_string(),
            })?;
    match repl.create_slot_exporting_snapshot(&slot).await {
        Ok((consistent_point, snapshot)) => Ok((repl, consistent_point, snapshot)),
        Err(e) if e.sqlstate() == Some("42710") => Err(BackfillError::SlotExists {
            slot,
            confirmed: "-".into(),
        }),
        Err(e) => Err(BackfillError::CreateSlot {
            slot,
            reason: e.to_string(),
        }),
    }
}
