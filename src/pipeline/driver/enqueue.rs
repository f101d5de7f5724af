//! A record on its way to the producer: tracked in the window for its
//! delivery report, or waiting, in order, while librdkafka's queue is full;
//! a record the producer refuses outright goes to the error policy.

use std::time::Instant;

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::policy::{ErrorKind, Failed};
use crate::pipeline::route::router::OutboxRecord;
use crate::pipeline::sink::{Enqueued, SinkError};

use super::errors::PipelineError;
use super::outlet::Waiting;
use super::reports::kafka_code;
use super::state::State;
use super::tally::label;
use super::window::{record_size, Pending};

impl State {
    /// Hands a record to the producer, tracked for its delivery report. The
    /// checkpoint must already count it as an event of `txn`. A record the
    /// producer refuses outright (too large, say) goes to the error policy.
    ///
    /// When librdkafka's local queue is full the record waits, in order, in
    /// `waiting`, and reading pauses until delivery reports make room: the
    /// loop goes on sending status updates and watching for a stop meanwhile
    /// (backpressure, never a wait inside this call).
    pub(super) async fn enqueue_tracked(
        &mut self,
        rec: OutboxRecord,
        txn: TxnSeq,
        lsn: Lsn,
        is_dead_letter: bool,
    ) -> Result<(), PipelineError> {
        // Exactly-once only (`refused`): several changes share a position
        // (a COPY's multi-insert), and the same records come in the same
        // order when streamed again.
        let mut nth = 0;
        if self.delivery.is_exactly_once() {
            let (commit, at, last) = self.dead.at;
            let here = self.place(txn, lsn, 0);
            if (here.0, here.1) == (commit, at) {
                nth = last + 1;
            }
            self.dead.at = (here.0, here.1, nth);
        }
        let w = Waiting {
            rec,
            txn,
            lsn,
            nth,
            is_dead_letter,
        };
        if !self.out.waiting.is_empty() {
            self.out.waiting.push_back(w);
            return Ok(());
        }
        if let Some(w) = self.try_enqueue(w)? {
            self.out.waiting.push_back(w);
        }
        Ok(())
    }

    /// Enqueues records that waited for room, oldest first, until the queue
    /// is full again.
    pub(super) fn pump_waiting(&mut self) -> Result<(), PipelineError> {
        while let Some(w) = self.out.waiting.pop_front() {
            if let Some(w) = self.try_enqueue(w)? {
                self.out.waiting.push_front(w);
                break;
            }
        }
        Ok(())
    }

    /// One attempt to hand a record to the producer; gives it back when the
    /// local queue is full.
    pub(super) fn try_enqueue(&mut self, w: Waiting) -> Result<Option<Waiting>, PipelineError> {
        let Waiting {
            mut rec,
            txn,
            lsn,
            nth,
            mut is_dead_letter,
        } = w;
        if !is_dead_letter && !self.dead.refused.is_empty() {
            if let Some(f) = self.dead.refused.get(self.place(txn, lsn, nth)) {
                tracing::warn!(lsn = %lsn, kind = %f.kind, "dead-lettering an event Kafka refused in an aborted transaction: {}", f.reason);
                let failed = Failed::from(&rec);
                rec = self.dead.letter(failed, f.kind, &f.reason, lsn);
                is_dead_letter = true;
            }
        }
        loop {
            let tag = self.out.window.push(Pending {
                txn,
                enqueued: Instant::now(),
                commit_time: self.pos.commit_time,
                event_type: rec.event_type.as_deref().map(|t| self.tally.event_type(t)),
                lsn,
                nth,
                record: (self.dead.keep_records && !is_dead_letter).then(|| rec.detached()),
                dead_letter: is_dead_letter,
                size: record_size(&rec),
            });
            let outcome = self.out.sink.enqueue(&rec, tag);
            if matches!(outcome, Ok(Enqueued::Yes)) {
                // The producer has asked about this topic itself by now, so
                // the probe may too (see Prober::probe).
                if self.tally.first_record_to(&rec.topic) {
                    self.out.sink.note_topic(&rec.topic);
                }
                return Ok(None);
            }
            // Not enqueued: forget the tracking entry (it is the newest).
            self.out.window.undo_push();
            let (topic, error) = match outcome {
                Ok(Enqueued::Yes) => unreachable!("handled above"),
                Ok(Enqueued::QueueFull) => {
                    return Ok(Some(Waiting {
                        rec,
                        txn,
                        lsn,
                        nth,
                        is_dead_letter,
                    }))
                }
                Err(SinkError::Enqueue { topic, error }) => (topic, error),
                Err(e) => return Err(e.into()),
            };
            self.metrics
                .publish_error(&label(&rec.event_type), &kafka_code(&error));
            let kind =
                ErrorKind::of_kafka(&error).filter(|k| !is_dead_letter && self.dead.wants(*k));
            let Some(kind) = kind else {
                return Err(SinkError::Enqueue { topic, error }.into());
            };
            let reason = format!("the producer refused the record for {topic}: {error}");
            tracing::warn!(lsn = %lsn, kind = %kind, "dead-lettering an event: {reason}");
            let failed = Failed::from(&rec);
            rec = self.dead.letter(failed, kind, &reason, lsn);
            is_dead_letter = true;
        }
    }
}
