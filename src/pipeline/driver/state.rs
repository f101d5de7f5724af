//! The session's state, split by concern in its fields: what is in flight
//! (`window`, `waiting`), what is confirmed
//! (`checkpoint`), how bad events go (`policy`, `redo`, `too_large`) and the
//! metrics handles. This file handles delivery reports and enqueueing;
//! `apply` feeds it decoded messages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::checkpoint::{Checkpoint, TxnSeq};
use crate::pipeline::decode::stream_buffer::StreamBuffer;
use crate::pipeline::policy::{self, ErrorKind, ErrorPolicy, Failed, Policy};
use crate::pipeline::route::messages::MessageConfig;
use crate::pipeline::route::router::{OutboxRecord, RouteError, Router};
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::{Ack, Enqueued, KafkaSink, SinkError};

use super::decoding::Decoding;
pub(super) use super::decoding::Replaying;
use super::delivery::record::{is_progress, Recorder};
use super::delivery::Delivery;
use super::errors::{BatchTooLarge, DeliveryFailure, PipelineError, RefusedInTransaction};
use super::tally::{label, Tally};
pub(super) use super::window::Pending;
use super::window::{record_size, TooLarge, TooLargeVerdict, Window};
use super::{Summary, TOO_LARGE_SETTLE};

/// A record counted in the checkpoint that librdkafka's full queue could not
/// take yet.
pub(super) struct Waiting {
    pub(super) rec: OutboxRecord,
    pub(super) txn: TxnSeq,
    pub(super) lsn: Lsn,
    pub(super) nth: u32,
    pub(super) is_dead_letter: bool,
}

/// A committed streamed transaction being handed to the pipeline.
pub(super) struct State {
    /// Kafka transactions, with `--delivery exactly-once`.
    pub(super) delivery: Delivery,
    /// Records each position before it is confirmed (unless
    /// `--progress-topic off`).
    pub(super) recorder: Option<Recorder>,
    /// Buffers streamed in-progress transactions (with --streaming).
    pub(super) replaying: Option<Replaying>,
    /// The decoder, and the buffer of streamed transactions.
    pub(super) decoding: Decoding,
    /// The slot's confirmed position when this session started.
    pub(super) resumed_from: Lsn,
    pub(super) first_begin_seen: bool,
    pub(super) router: Router,
    pub(super) checkpoint: Checkpoint,
    pub(super) sink: KafkaSink,
    pub(super) acks: mpsc::UnboundedReceiver<Ack>,
    pub(super) summary: Summary,
    pub(super) metrics: Arc<Metrics>,
    /// Events in flight by delivery tag, and their bytes. Bounded by
    /// `max_inflight` and `max_inflight_bytes`.
    pub(super) window: Window,
    /// Commit timestamp of the open transaction (from Begin).
    pub(super) commit_time: i64,
    /// The newest server WAL position the walsender reported.
    pub(super) server_wal: Lsn,
    /// Counters, shared event types, topics for the probe.
    pub(super) tally: Tally,
    /// Clock readings shared by a batch of delivery reports.
    pub(super) ack_clock: (Instant, i64),
    /// Logical decoding messages as events, when configured.
    pub(super) messages: Option<MessageConfig>,
    pub(super) policy: ErrorPolicy,
    /// Keep records in flight, because a delivery failure may be dead-lettered.
    pub(super) keep_records: bool,
    /// Dead-letter records waiting to be enqueued (from delivery reports).
    pub(super) redo: Vec<(OutboxRecord, TxnSeq, Lsn)>,
    /// Records the producer's full queue could not take yet, in order;
    /// nothing more is read until they are enqueued.
    pub(super) waiting: VecDeque<Waiting>,
    /// Exactly-once: records Kafka refused in an earlier session's
    /// transaction, dead-lettered when they come again.
    pub(super) refused: super::refused::Refused,
    /// Where the last record enqueued was (`refused::Place`).
    pub(super) at: super::refused::Place,
    /// Records the broker refused as too large, until the reports that came
    /// with them are in (see `settle_too_large`).
    pub(super) too_large: TooLarge,
}

impl State {
    /// A session's state as it starts streaming from `confirmed`.
    pub(super) fn new(
        cfg: &RelayConfig,
        confirmed: Lsn,
        protocol: u32,
        (sink, acks): (KafkaSink, mpsc::UnboundedReceiver<Ack>),
        metrics: Arc<Metrics>,
        carry: &mut super::Carry,
    ) -> State {
        State {
            delivery: Delivery::AtLeastOnce,
            recorder: None,
            router: Router::with_column_types(cfg.tables.clone(), carry.column_types.clone()),
            refused: std::mem::take(&mut carry.refused),
            at: (Lsn(0), Lsn(0), 0),
            checkpoint: Checkpoint::new(confirmed),
            sink,
            acks,
            summary: Summary::default(),
            resumed_from: confirmed,
            first_begin_seen: false,
            tally: Tally::new(metrics.clone()),
            metrics,
            window: Window::default(),
            commit_time: 0,
            server_wal: confirmed,
            ack_clock: (Instant::now(), crate::pipeline::source::pg_now()),
            decoding: Decoding::new(
                protocol,
                cfg.streaming
                    .as_ref()
                    .map(|s| StreamBuffer::new(s.memory_budget, s.spill_dir.join(&cfg.slot))),
            ),
            replaying: None,
            messages: cfg.messages.clone(),
            policy: cfg.error_policy.clone(),
            // Exactly-once does not keep them: a refused record is dead-lettered
            // when the next session streams it again (`refused`).
            keep_records: cfg.error_policy.may_dead_letter_deliveries()
                && cfg.exactly_once.is_none(),
            redo: Vec::new(),
            waiting: VecDeque::new(),
            too_large: TooLarge::new(),
        }
    }

    pub(super) fn on_ack(&mut self, ack: Ack) -> Result<(), PipelineError> {
        if is_progress(ack.tag) {
            return self.progress_delivered(ack.result);
        }
        let pending = self
            .window
            .take(ack.tag)
            .ok_or(PipelineError::UnknownDelivery(ack.tag))?;
        match ack.result {
            Ok(d) => {
                tracing::trace!(partition = d.partition, offset = d.offset, "delivered");
                self.checkpoint.ack(pending.txn)?;
                self.metrics.set_broker_reachable(true);
                if pending.dead_letter {
                    // Counted once, as dead-lettered, not also as published.
                    self.metrics.dead_lettered.inc();
                } else {
                    let counter = self.tally.published(&pending.event_type);
                    counter.inc();
                }
                // Timed at the delivery report, not when the loop got to it:
                // the figures are the broker's, without the pipeline's queue.
                let (now, pg_now) = self.ack_clock;
                let acked_pg = pg_now - now.saturating_duration_since(ack.at).as_micros() as i64;
                self.metrics.publish_duration.observe(
                    ack.at
                        .saturating_duration_since(pending.enqueued)
                        .as_secs_f64(),
                );
                let since_commit = (acked_pg - pending.commit_time) as f64 / 1e6;
                self.metrics.commit_to_ack.observe(since_commit.max(0.0));
                Ok(())
            }
            Err(error) => {
                self.metrics
                    .publish_error(&label(&pending.event_type), &kafka_code(&error));
                let kind = ErrorKind::of_kafka(&error)
                    .filter(|k| self.policy.for_kind(*k) == Policy::DeadLetter);
                // The broker judges max.message.bytes per record batch: a
                // refused batch fails every record in it, small ones too.
                // Decide once the reports that came together are in
                // (`settle_too_large`): one record alone was too large by
                // itself; several were a batch.
                if kind == Some(ErrorKind::TooLarge)
                    && (pending.record.is_some() || self.delivery.is_exactly_once())
                    && !pending.dead_letter
                    && matches!(
                        error.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
                    )
                {
                    self.too_large.hold((pending, ack.topic, error));
                    return Ok(());
                }
                if let (Some(kind), false) = (kind, pending.dead_letter) {
                    if self.delivery.is_exactly_once() {
                        return Err(self.refuse(&pending, kind, ack.topic, error));
                    }
                    if self.dead_letter_delivery(&pending, kind, &ack.topic, &error)? {
                        return Ok(());
                    }
                }
                Err(self.delivery_failure(pending.txn, ack.topic, error))
            }
        }
    }

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
        let dlq = policy::dead_letter(
            Failed::from(rec),
            kind,
            &reason,
            pending.lsn,
            &self.policy.dead_letter_topic,
        );
        self.redo.push((dlq, pending.txn, pending.lsn));
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
        self.refused.note(at, kind, refusal_reason(&topic, &error));
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

    /// A delivery that failed for good: the session ends, the slot before it.
    pub(super) fn delivery_failure(
        &self,
        txn: TxnSeq,
        topic: String,
        error: KafkaError,
    ) -> PipelineError {
        PipelineError::Delivery(Box::new(DeliveryFailure {
            topic,
            commit_lsn: self.commit_lsn_text(txn),
            error,
            confirmed: self.confirmable(),
        }))
    }

    /// `records` refused together as too large: a batch over the topic's
    /// max.message.bytes.
    pub(super) fn batch_too_large(
        &self,
        txn: TxnSeq,
        topic: String,
        error: KafkaError,
        records: usize,
    ) -> PipelineError {
        PipelineError::BatchTooLarge(Box::new(BatchTooLarge {
            topic,
            records,
            commit_lsn: self.commit_lsn_text(txn),
            error,
            confirmed: self.confirmable(),
        }))
    }

    /// A tracked transaction's commit LSN for an error message.
    pub(super) fn commit_lsn_text(&self, txn: TxnSeq) -> String {
        self.checkpoint
            .commit_lsn_of(txn)
            .map(|l| l.to_string())
            .unwrap_or_else(|| "?".into())
    }

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
            let (commit, at, last) = self.at;
            let here = self.place(txn, lsn, 0);
            if (here.0, here.1) == (commit, at) {
                nth = last + 1;
            }
            self.at = (here.0, here.1, nth);
        }
        let w = Waiting {
            rec,
            txn,
            lsn,
            nth,
            is_dead_letter,
        };
        if !self.waiting.is_empty() {
            self.waiting.push_back(w);
            return Ok(());
        }
        if let Some(w) = self.try_enqueue(w)? {
            self.waiting.push_back(w);
        }
        Ok(())
    }

    /// Enqueues records that waited for room, oldest first, until the queue
    /// is full again.
    pub(super) fn pump_waiting(&mut self) -> Result<(), PipelineError> {
        while let Some(w) = self.waiting.pop_front() {
            if let Some(w) = self.try_enqueue(w)? {
                self.waiting.push_front(w);
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
        if !is_dead_letter && !self.refused.is_empty() {
            if let Some(f) = self.refused.get(self.place(txn, lsn, nth)) {
                tracing::warn!(lsn = %lsn, kind = %f.kind, "dead-lettering an event Kafka refused in an aborted transaction: {}", f.reason);
                let failed = Failed::from(&rec);
                rec = policy::dead_letter(
                    failed,
                    f.kind,
                    &f.reason,
                    lsn,
                    &self.policy.dead_letter_topic,
                );
                is_dead_letter = true;
            }
        }
        loop {
            let tag = self.window.push(Pending {
                txn,
                enqueued: Instant::now(),
                commit_time: self.commit_time,
                event_type: rec.event_type.as_deref().map(|t| self.tally.event_type(t)),
                lsn,
                nth,
                record: (self.keep_records && !is_dead_letter).then(|| rec.detached()),
                dead_letter: is_dead_letter,
                size: record_size(&rec),
            });
            let outcome = self.sink.enqueue(&rec, tag);
            if matches!(outcome, Ok(Enqueued::Yes)) {
                // The producer has asked about this topic itself by now, so
                // the probe may too (see Prober::probe).
                if self.tally.first_record_to(&rec.topic) {
                    self.sink.note_topic(&rec.topic);
                }
                return Ok(None);
            }
            // Not enqueued: forget the tracking entry (it is the newest).
            self.window.undo_push();
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
            let kind = ErrorKind::of_kafka(&error)
                .filter(|k| !is_dead_letter && self.policy.for_kind(*k) == Policy::DeadLetter);
            let Some(kind) = kind else {
                return Err(SinkError::Enqueue { topic, error }.into());
            };
            let reason = format!("the producer refused the record for {topic}: {error}");
            tracing::warn!(lsn = %lsn, kind = %kind, "dead-lettering an event: {reason}");
            let failed = Failed::from(&rec);
            rec = policy::dead_letter(failed, kind, &reason, lsn, &self.policy.dead_letter_topic);
            is_dead_letter = true;
        }
    }

    /// A change that cannot become a record: dead-letter it when the policy
    /// says so (counted in the open transaction), otherwise stop.
    pub(super) async fn unroutable(
        &mut self,
        source: RouteError,
        failed: Failed,
        lsn: Lsn,
    ) -> Result<(), PipelineError> {
        let kind =
            ErrorKind::of_route(&source).filter(|k| self.policy.for_kind(*k) == Policy::DeadLetter);
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
        let dlq = policy::dead_letter(failed, kind, &reason, lsn, &self.policy.dead_letter_topic);
        let txn = self.checkpoint.event()?;
        // Exactly-once: in the same Kafka transaction as its neighbours.
        self.before_enqueue()?;
        self.enqueue_tracked(dlq, txn, lsn, true).await
    }

    /// Dead-letters records whose delivery failed, queued by `on_ack`.
    pub(super) async fn flush_redo(&mut self) -> Result<(), PipelineError> {
        // In the order the failures were reported.
        for (rec, txn, lsn) in std::mem::take(&mut self.redo) {
            self.enqueue_tracked(rec, txn, lsn, true).await?;
        }
        Ok(())
    }

    /// Whether another change may be read (or replayed): the in-flight
    /// window has room in events and bytes, and no record waits for room in
    /// the producer's queue. The window also bounds the bookkeeping behind
    /// the oldest unacknowledged event, which grows while that one event is
    /// stuck even though few are in flight: the delivery slots since it
    /// (`pending`, holes included) and the transactions since the confirmed
    /// position (the checkpoint's, empty ones included: PostgreSQL before
    /// 15 sends Begin and Commit for every transaction).
    pub(super) fn has_room(&self, cfg: &RelayConfig) -> bool {
        let span = 2 * cfg.max_inflight;
        self.checkpoint.inflight() < cfg.max_inflight
            && self.window.bytes() < cfg.max_inflight_bytes
            && self.waiting.is_empty()
            && (self.window.span() as u64) < span
            && self.checkpoint.tracked() < span
    }

    /// Refreshes the gauges that describe the stream's state.
    pub(super) fn update_gauges(&mut self) {
        let confirmed = self.confirmable();
        self.metrics.confirmed_lsn.set(confirmed.0 as i64);
        self.metrics
            .inflight_events
            .set(self.checkpoint.inflight() as i64);
        self.metrics
            .replication_lag_bytes
            .set(self.server_wal.0.saturating_sub(confirmed.0) as i64);
        if let Some(b) = self.decoding.stream() {
            self.metrics
                .stream_buffer_bytes
                .set(b.memory_bytes() as i64);
            self.tally.spilled(b.spilled_bytes_total());
        }
    }

    /// Reads the clocks once for the delivery reports about to be handled.
    pub(super) fn refresh_ack_clock(&mut self) {
        self.ack_clock = (Instant::now(), crate::pipeline::source::pg_now());
    }

    pub(super) fn drain_acks(&mut self) -> Result<(), PipelineError> {
        self.refresh_ack_clock();
        while let Ok(ack) = self.acks.try_recv() {
            self.on_ack(ack)?;
        }
        self.settle_too_large()
    }

    /// Records the broker refused as too large, reported together: one alone
    /// was too large by itself and goes to the dead-letter topic; several
    /// were refused as a batch (the topic's max.message.bytes is below the
    /// producer's batch.size), which dead-lettering would turn into the loss
    /// of good events' payloads: stop, the slot before them, and say what to
    /// change. A lone report waits `TOO_LARGE_SETTLE` for the rest of its
    /// batch's (librdkafka reports a failed batch's records at once).
    pub(super) fn settle_too_large(&mut self) -> Result<(), PipelineError> {
        match self.too_large.verdict(TOO_LARGE_SETTLE) {
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

/// An error's code as a metrics label.
pub(super) fn kafka_code(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "Other".to_string(),
    }
}
