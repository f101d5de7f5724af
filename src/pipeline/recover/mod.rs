//! Recovering a lost slot (`outbox-relay recover`, `run --recover-slot`):
//! a new slot after the old one was lost
//! (invalidated, dropped, missing after a restore or a failover), and the
//! events of the gap published from the outbox table.
//!
//! Why this loses nothing and, under exactly-once, repeats nothing:
//!
//! 1. The slot is created with an exported snapshot
//!    (`CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`). Every transaction
//!    committed before the slot's consistent point is in the snapshot; every
//!    one after it is streamed by `run` from the new slot. So the events the
//!    lost slot never delivered are, if their rows are still there, rows of
//!    the snapshot.
//! 2. What Kafka holds is read back read_committed, after the relay's
//!    transactional producer was fenced (`init_transactions` aborts what it
//!    left open), from the last transaction the progress topic records in
//!    Kafka minus `--look-back` (transactions still open when it committed
//!    may have smaller order values). Records of an aborted transaction are
//!    not "in Kafka": their rows are published again, which is right.
//! 3. The rows compared are bounded by the order column: from the first row
//!    of that window that is still in the table. A row of the snapshot whose
//!    `id` is not among the records read is published, in `--order-column`
//!    order (commit order per aggregate, as `backfill` publishes), through
//!    the same router as `run`. Under exactly-once they go out in one Kafka
//!    transaction together with a progress record at the new slot.
//! 4. The new progress record (a later epoch) is what lets `run` start on a
//!    slot behind or ahead of the old record without taking either for
//!    "already delivered".
//!
//! When the table no longer holds any event of that window (a retention
//! shorter than the gap deleted them), recover cannot tell which events
//! between the last one in Kafka and the oldest row left were deleted
//! unpublished: it publishes what is there, names the range it cannot
//! vouch for, and exits 1.

use std::time::{Duration, Instant};

use crate::pipeline::settings::RelayConfig;

use crate::lsn::Lsn;
use crate::observe::progress_line::ProgressLine;
use crate::pipeline::sink::progress::ProgressError;
use crate::pipeline::sink::publisher::Publisher;
use crate::pipeline::sink::read_back::ReadBackError;
mod gap;
mod records;
pub mod settings;
mod slot;

use gap::Gap;
use records::{read_back_from, read_record, write_marker, Names};
use slot::{clear_old_slot, create_slot, lock, OldSlot};

pub use settings::RecoverSettings;

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("replication slot {slot} is usable (wal_status {wal_status}, confirmed up to {confirmed}): there is nothing to recover, `outbox-relay run` streams from it. If a recover was interrupted after creating it, drop it (SELECT pg_drop_replication_slot('{slot}');) and run recover again")]
    SlotUsable {
        slot: String,
        wal_status: String,
        confirmed: String,
    },
    #[error("replication slot {slot} is missing and the progress topic has no record of a relay on it: if this is a new installation, run `outbox-relay setup`; if the relay did run on it (without a progress topic, or with another one), run `outbox-relay recover` by hand")]
    NeverRan { slot: String },
    #[error("another recover of replication slot {slot} is running (it holds the advisory lock): wait for it")]
    Running { slot: String },
    #[error("replication slot {slot} is in use by the process with PID {pid}: stop the relay first (recover replaces the slot)")]
    SlotActive { slot: String, pid: i32 },
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    ReadBack(#[from] ReadBackError),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("cannot create the replication slot {slot}: {reason}")]
    CreateSlot { slot: String, reason: String },
    #[error("{what}. The new slot {slot} was dropped again: fix the cause and run recover again (nothing it published is published twice: it compares with Kafka first)")]
    Aborted { what: String, slot: String },
}

/// What a recovery did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub slot: String,
    pub consistent_point: Lsn,
    /// Rows of the snapshot compared with Kafka.
    pub examined: u64,
    /// Of those, already in Kafka.
    pub in_kafka: u64,
    /// Published now (acknowledged).
    pub published: u64,
    /// Ranges that may have been deleted before they were published, one
    /// sentence each; non-empty means exit 1.
    pub unrecoverable: Vec<String>,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row(s) compared, {} already in Kafka, {} published in {:.1} s; slot {} starts at {}",
            self.examined,
            self.in_kafka,
            self.published,
            self.elapsed.as_secs_f64(),
            self.slot,
            self.consistent_point
        )
    }
}

impl RecoverError {
    /// Nothing to recover, or not now: the operator's call, not a failure.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RecoverError::Config(_)
                | RecoverError::SlotUsable { .. }
                | RecoverError::SlotActive { .. }
                | RecoverError::Running { .. }
                | RecoverError::NeverRan { .. }
        )
    }
}

/// Runs the recovery; `say` receives one line per step.
pub async fn run(
    cfg: &RelayConfig,
    args: &RecoverSettings,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, RecoverError> {
    cfg.refuse_picked("the new slot serves every table: recover them all (remove --table)")
        .map_err(RecoverError::Config)?;
    let started = Instant::now();
    let slot = cfg.slot.clone();
    let (client, _conn) = crate::pg::sql::connect(&cfg.database).await?;
    let names = Names::read(&client, cfg).await?;
    lock(&client, &slot).await?;
    // The old slot first without Kafka: a relay on it, or a usable slot,
    // is refused before anything is fenced or written.
    let old = OldSlot::read(&client, &slot).await?;
    if let Some(pid) = old.as_ref().and_then(|o| o.active_pid) {
        return Err(RecoverError::SlotActive { slot, pid });
    }
    let (sink, acks) = names.producer(cfg)?;
    let (recorded, written_at) = read_record(cfg, &names.key, args.read_timeout).await?;
    if args.only_after_a_relay && recorded.is_none() {
        return Err(RecoverError::NeverRan { slot });
    }
    let interrupted = recorded.as_ref().is_some_and(|p| p.recovering);
    clear_old_slot(&client, &slot, old, interrupted, say).await?;
    names.fence(&sink).await?;
    let since = read_back_from(&client, recorded.as_ref(), written_at, args.look_back, say).await;
    let mut publisher = Publisher::new(
        (sink, acks),
        &args.order_column,
        false,
        args.ack_timeout,
        cfg.max_inflight,
        ProgressLine::new("recover", None, args.progress_every),
    );
    // Said before the slot exists (`marker`).
    let marker = write_marker(&mut publisher, cfg, &names, recorded.as_ref()).await?;

    // The new slot and its snapshot. From here on a failure drops the slot
    // again, so that recover can simply be run again.
    let (repl, timeline, consistent_point, snapshot) = create_slot(cfg, &slot).await?;
    say(format!(
        "created logical replication slot {slot} (pgoutput) at {consistent_point}: rows committed before it are compared with Kafka here, rows committed after it are streamed by `run`"
    ));
    let mut summary = Summary {
        slot: slot.clone(),
        consistent_point,
        ..Summary::default()
    };
    let gap = Gap {
        cfg,
        args,
        client: &client,
        since,
        names: &names,
    };
    let done = async {
        gap.publish(&snapshot, &mut publisher, &mut summary, say)
            .await?;
        gap.close(&mut publisher, marker.as_ref(), timeline, consistent_point)
            .await
    }
    .await;
    drop(repl);
    if let Err(what) = done {
        let _ = client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        return Err(RecoverError::Aborted { what, slot });
    }
    let published = publisher
        .finish()
        .await
        .map_err(|what| RecoverError::Aborted {
            what,
            slot: slot.clone(),
        })?;
    summary.published = published.acked;
    summary.elapsed = started.elapsed();
    Ok(summary)
}
