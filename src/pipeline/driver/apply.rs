//! From a WAL message to the checkpoint and the producer: decoding, the
//! stream buffer for streamed transactions, routing, logical messages and the
//! error policy for rows that cannot become records.

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::decode::pgoutput::{self, Insert, LogicalMessage};
use crate::pipeline::history::Begins;
use crate::pipeline::policy::Failed;
use crate::pipeline::route::router::Routed;
use crate::pipeline::settings::RelayConfig;

use super::decoding::{Replayed, Step};
use super::errors::PipelineError;
use super::heartbeat::HEARTBEAT_PREFIX;
use super::state::State;
use super::tally::label;

impl State {
    pub(super) async fn on_xlog(
        &mut self,
        wal_start: Lsn,
        data: bytes::Bytes,
    ) -> Result<(), PipelineError> {
        match self.decoding.step(wal_start, data)? {
            Step::Apply(msg) => self.apply(msg, wal_start).await,
            Step::Nothing => Ok(()),
            Step::Committed {
                commit_lsn,
                xid,
                commit_time,
            } => {
                self.pos.commit_time = commit_time;
                self.delivery_begin(Begins::transaction(commit_lsn, xid, commit_time))?;
                self.checkpoint.begin(commit_lsn)?;
                Ok(())
            }
        }
    }

    /// Replays up to `budget` changes of a committed streamed transaction,
    /// as if they had arrived between Begin and Commit. Returns when the
    /// budget or the in-flight limit is reached, so backpressure holds.
    pub(super) async fn replay_some(
        &mut self,
        mut budget: usize,
        cfg: &RelayConfig,
    ) -> Result<(), PipelineError> {
        while budget > 0 && self.has_room(cfg) {
            match self.decoding.next_replayed()? {
                None => return Ok(()),
                Some(Replayed::Change(msg, lsn)) => {
                    self.apply(msg, lsn).await?;
                    budget -= 1;
                }
                Some(Replayed::End(end)) => {
                    self.on_commit(end)?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Acts on one decoded message of a committed transaction (or outside).
    pub(super) async fn apply(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
    ) -> Result<(), PipelineError> {
        match msg {
            LogicalMessage::Begin(b) => self.on_begin(b.final_lsn, b.xid, b.commit_time)?,
            LogicalMessage::Commit(c) => self.on_commit(c.end_lsn)?,
            LogicalMessage::Relation(rel) => {
                self.router
                    .on_relation(&rel)
                    .map_err(|source| PipelineError::Route {
                        lsn: wal_start,
                        source,
                    })?;
            }
            LogicalMessage::Insert(ins) => self.on_insert(ins, wal_start).await?,
            LogicalMessage::Message(m) if m.prefix == HEARTBEAT_PREFIX => {
                tracing::trace!(lsn = %m.lsn, "heartbeat");
            }
            LogicalMessage::Message(m) => self.on_message(m).await?,
            other @ (LogicalMessage::Origin(_)
            | LogicalMessage::Type(_)
            | LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_)
            | LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_)
            | LogicalMessage::StreamPrepare(_)) => {
                // Updates, deletes (the insert-then-delete outbox pattern),
                // truncates and the rest are not events.
                tracing::trace!(kind = other.kind(), lsn = %wal_start, "ignored change");
            }
        }
        Ok(())
    }

    fn on_begin(
        &mut self,
        final_lsn: Lsn,
        xid: u32,
        commit_time: i64,
    ) -> Result<(), PipelineError> {
        self.pos.commit_time = commit_time;
        let in_kafka = self.delivery_begin(Begins::transaction(final_lsn, xid, commit_time))?;
        if !in_kafka {
            self.pos.first_begin(final_lsn);
        }
        self.checkpoint.begin(final_lsn)?;
        Ok(())
    }

    fn on_commit(&mut self, end_lsn: Lsn) -> Result<(), PipelineError> {
        self.checkpoint.commit(end_lsn)?;
        self.delivery_commit(end_lsn);
        self.summary.transactions += 1;
        Ok(())
    }

    async fn on_insert(&mut self, ins: Insert, wal_start: Lsn) -> Result<(), PipelineError> {
        // Exactly-once: its transaction is in Kafka already.
        if self.skipping() {
            return Ok(());
        }
        let rec = match self.router.route(&ins) {
            Ok(Routed::Record(rec)) => rec,
            Ok(Routed::OtherTable(table)) => {
                // Not an event (a FOR ALL TABLES or shared publication);
                // counted so that it is visible.
                self.tally.skipped_row(table);
                return Ok(());
            }
            Err(source) => {
                let failed = self.router.salvage(&ins);
                return self.unroutable(source, failed, wal_start).await;
            }
        };
        let txn: TxnSeq = self.checkpoint.event()?;
        tracing::debug!(
            event_id = %String::from_utf8_lossy(&rec.event_id),
            event_type = %label(&rec.event_type),
            aggregate_id = %String::from_utf8_lossy(&rec.key),
            topic = %rec.topic,
            lsn = %wal_start,
            since_commit_ms = (crate::pipeline::source::pg_now() - self.pos.commit_time) / 1000,
            "event enqueued"
        );
        self.before_enqueue()?;
        self.enqueue_tracked(rec, txn, wal_start, false).await?;
        self.summary.events += 1;
        Ok(())
    }

    /// A logical decoding message with the configured prefix: an event.
    async fn on_message(&mut self, m: pgoutput::Message) -> Result<(), PipelineError> {
        let Some(route) = self.messages.as_ref().and_then(|c| c.route(&m)) else {
            tracing::trace!(prefix = %m.prefix, lsn = %m.lsn, "ignored logical decoding message");
            return Ok(());
        };
        // A non-transactional message is published at once; it is its own
        // unit for the checkpoint, confirmed at its own LSN (the end of its
        // record): that already keeps a restart from decoding it again, and
        // one byte more would skip a transaction whose commit record starts
        // right there.
        let standalone = !m.transactional();
        let mut in_kafka = self.skipping();
        if standalone {
            self.checkpoint.begin_standalone(m.lsn)?;
            // No commit time in the WAL for it: it counts from now.
            self.pos.commit_time = crate::pipeline::source::pg_now();
            // Exactly-once: its own unit, ordered by a position inside its
            // record (its LSN is where the next record starts, which may be
            // the commit of the transaction that emitted it).
            in_kafka = self.delivery_begin(Begins::message(Lsn(m.lsn.0.saturating_sub(1))))?;
        }
        let result = match route {
            _ if in_kafka => Ok(()),
            Ok(rec) => {
                let txn = self.checkpoint.event()?;
                self.summary.events += 1;
                self.before_enqueue()?;
                self.enqueue_tracked(rec, txn, m.lsn, false).await
            }
            Err(source) => {
                let failed = Failed {
                    payload: Some(m.content.clone()),
                    event_id: Some(bytes::Bytes::from(format!("lsn:{}", m.lsn))),
                    intended_topic: m.prefix.clone(),
                    ..Failed::default()
                };
                self.unroutable(source, failed, m.lsn).await
            }
        };
        if standalone {
            self.checkpoint.commit_standalone()?;
            self.delivery_commit(m.lsn);
        }
        result
    }
}
