//! The slots of a recover: the old one (refused while a relay streams from
//! it or while it is usable, dropped when lost), the lock that lets one
//! recover of a slot run at a time, and the new slot with its snapshot.

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::pg::sql::sql;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::source::{ConnectParams, ReplicationConnection};

use super::RecoverError;

/// The old slot, as `pg_replication_slots` shows it.
pub(super) struct OldSlot {
    pub(super) active_pid: Option<i32>,
    pub(super) confirmed: Option<String>,
    pub(super) wal_status: Option<String>,
    pub(super) invalidation_reason: Option<String>,
}

impl OldSlot {
    pub(super) async fn read(client: &Client, slot: &str) -> Result<Option<OldSlot>, RecoverError> {
        // to_jsonb: invalidation_reason is PostgreSQL 17+, conflicting 16+.
        let row = client
            .query_opt(
                "SELECT active_pid, confirmed_flush_lsn::text, wal_status,
                        coalesce(to_jsonb(s)->>'invalidation_reason',
                                 CASE WHEN (to_jsonb(s)->>'conflicting')::bool THEN 'conflicting' END)
                   FROM pg_replication_slots s WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql("reading pg_replication_slots"))?;
        Ok(row.map(|r| OldSlot {
            active_pid: r.get(0),
            confirmed: r.get(1),
            wal_status: r.get(2),
            invalidation_reason: r.get(3),
        }))
    }

    pub(super) fn lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }
}

/// One recover of a slot at a time (relays with --recover-slot may all
/// try): held by this connection until it ends, so a killed recover lets go
/// of it. Holding it is also what makes a slot found under an unfinished
/// recover's record that one's leftover, safe to drop.
pub(super) async fn lock(client: &Client, slot: &str) -> Result<(), RecoverError> {
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('outbox-relay recover ' || $1, 0))",
            &[&slot],
        )
        .await
        .map_err(sql("taking the recover's advisory lock"))?
        .get(0);
    match locked {
        true => Ok(()),
        false => Err(RecoverError::Running {
            slot: slot.to_string(),
        }),
    }
}

/// The old slot goes when it is lost, or an unfinished recover's; a usable
/// one is refused (nothing to recover).
pub(super) async fn clear_old_slot(
    client: &Client,
    slot: &str,
    old: Option<OldSlot>,
    interrupted: bool,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), RecoverError> {
    match old {
        None => say(format!(
            "replication slot {slot} does not exist: the events committed since the last one in Kafka are published from the table"
        )),
        Some(old) if old.lost() || interrupted => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(sql(format!("dropping the slot {slot}")))?;
            say(if interrupted {
                format!("dropped replication slot {slot}: an earlier recover created it and did not finish")
            } else {
                format!(
                    "dropped replication slot {slot}: it was invalidated ({}) and can never stream again",
                    old.invalidation_reason
                        .or(old.wal_status)
                        .unwrap_or_else(|| "lost".into())
                )
            });
        }
        Some(old) => {
            return Err(RecoverError::SlotUsable {
                slot: slot.to_string(),
                wal_status: old.wal_status.unwrap_or_else(|| "-".into()),
                confirmed: old.confirmed.unwrap_or_else(|| "-".into()),
            })
        }
    }
    Ok(())
}

/// The new slot with its exported snapshot, over a replication connection
/// that must stay open (and idle) while the snapshot is used; the server's
/// timeline.
pub(super) async fn create_slot(
    cfg: &RelayConfig,
    slot: &str,
) -> Result<(ReplicationConnection, u32, Lsn, String), RecoverError> {
    let params = ConnectParams::from_config(&cfg.database)
        .map_err(|e| RecoverError::Config(e.to_string()))?;
    let create = |reason: String| RecoverError::CreateSlot {
        slot: slot.to_string(),
        reason,
    };
    let mut repl = ReplicationConnection::connect(&params)
        .await
        .map_err(|e| create(e.to_string()))?;
    let system = repl
        .identify_system()
        .await
        .map_err(|e| create(e.to_string()))?;
    let (consistent_point, snapshot) = repl
        .create_slot_exporting_snapshot(slot)
        .await
        .map_err(|e| create(e.to_string()))?;
    Ok((repl, system.timeline, consistent_point, snapshot))
}
