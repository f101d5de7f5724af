//! A bad event's way: a record the broker refused, a change that cannot
//! become a record, records refused together as too large. The policy
//! (`dead_letters`) says whether it is dead-lettered in its place or the
//! session stops; exactly-once notes it for the next session (`refused`).

use rdkafka::error::KafkaError;

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::policy::{ErrorKind, Failed};
use crate::pipeline::route::router::RouteError;

use super::errors::{PipelineError, RefusedInTransaction};
use super::state::State;
use super::window::{Pending, TooLargeVerdict};
use super::TOO_LARGE_SETTLE;

impl State {
    /// Replaces a record whose delivery failed with its dead-letter record,
    /// queued for `flush_redo`. The dead-letter record is counted before the
    /// failed one is released, so the transaction cannot be confirmed in
    /// between. False when the record was not kept (nothing to dead-letter).
    pub(super) fn dead_letter_delivery(
        &mut self,
        pending: &Pending,
        kind: ErrorKind,
        topic: &str,
        error: &KafkaError,
    ) -> Result<bool, PipelineError> {
        let Some(rec) = &pending.record else {
            return Ok(false);
        };
        self.checkpoint.add_event(pending.txn)?;
        self.checkpoint.ack(pending.txn)?;
        let reason = refusal_reason(topic, error);
        tracing::warn!(lsn = %pending.lsn, kind = %kind, "dead-lettering an event: {reason}");
        let dlq = self
            .dead
            .letter(Failed::from(rec), kind, &reason, pending.lsn);
        self.dead.queue(dlq, pending.txn, pending.lsn);
        Ok(true)
    }

    /// Exactly-once: notes a refused record for the next session to
    /// dead-letter, and ends this one (its Kafka transaction is lost).
    pub(super) fn refuse(
        &mut self,
        pending: &Pending,
        kind: ErrorKind,
        topic: String,
        error: KafkaError,
    ) -> PipelineError {
        let at = self.place(pending.txn, pending.lsn, pending.nth);
        self.dead
            .refused
            .note(at, kind, refusal_reason(&topic, &error));
        PipelineError::Refused(Box::new(RefusedInTransaction {
            lsn: pending.lsn,
            kind,
            topic,
            error,
        }))
    }

    /// Where a record of `txn` at `lsn` is in the stream (`refused::Place`).
    pub(super) fn place(&self, txn: TxnSeq, lsn: Lsn, nth: u32) -> super::refused::Place {
        let commit = self.checkpoint.commit_lsn_of(txn).unwrap_or(Lsn(u64::MAX));
        (commit, lsn, nth)
    }

    /// A change that cannot become a record: dead-letter it when the policy
    /// says so (counted in the open transaction), otherwise stop.
    pub(super) async fn unroutable(
        &mut self,
        source: RouteError,
        failed: Failed,
        lsn: Lsn,
    ) -> Result<(), PipelineError> {
        let kind = ErrorKind::of_route(&source).filter(|k| self.dead.wants(*k));
        let Some(kind) = kind else {
            return Err(PipelineError::Route { lsn, source });
        };
        let reason = source.to_string();
        tracing::warn!(
            lsn = %lsn,
            kind = %kind,
            event_id = %failed.event_id.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
            "dead-lettering an event: {reason}"
        );
        let dlq = self.dead.letter(failed, kind, &reason, lsn);
        let txn = self.checkpoint.event()?;
        // Exactly-once: in the same Kafka transaction as its neighbours.
        self.before_enqueue()?;
        self.enqueue_tracked(dlq, txn, lsn, true).await
    }

    /// Dead-letters records whose delivery failed, queued by `on_ack`.
    pub(super) async fn flush_redo(&mut self) -> Result<(), PipelineError> {
        // In the order the failures were reported.
        for (rec, txn, lsn) in self.dead.take_queued() {
            self.enqueue_tracked(rec, txn, lsn, true).await?;
        }
        Ok(())
    }

    /// Records the broker refused as too large, reported together: one alone
    /// was too large by itself and goes to the dead-letter topic; several
    /// were refused as a batch (the topic's max.message.bytes is below the
    /// producer's batch.size), which dead-lettering would turn into the loss
    /// of good events' payloads: stop, the slot before them, and say what to
    /// change. A lone report waits `TOO_LARGE_SETTLE` for the rest of its
    /// batch's (librdkafka reports a failed batch's records at once).
    pub(super) fn settle_too_large(&mut self) -> Result<(), PipelineError> {
        match self.dead.too_large.verdict(TOO_LARGE_SETTLE) {
            TooLargeVerdict::Wait => Ok(()),
            TooLargeVerdict::Batch((pending, topic, error), n) => {
                Err(self.batch_too_large(pending.txn, topic, error, n))
            }
            TooLargeVerdict::Alone((pending, topic, error)) => {
                if self.delivery.is_exactly_once() {
                    return Err(self.refuse(&pending, ErrorKind::TooLarge, topic, error));
                }
                // Only records kept for dead-lettering are set aside here.
                self.dead_letter_delivery(&pending, ErrorKind::TooLarge, &topic, &error)?;
                Ok(())
            }
        }
    }
}

/// Why a dead letter replaces a record the broker refused.
fn refusal_reason(topic: &str, error: &KafkaError) -> String {
    format!("Kafka refused the record for {topic}: {error}")
}
