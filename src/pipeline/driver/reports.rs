//! Delivery reports: what each means for the checkpoint, the counters and
//! the error policy, and the errors that end a session over one.

use rdkafka::error::KafkaError;

use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::policy::ErrorKind;
use crate::pipeline::sink::Ack;

use super::delivery::record::is_progress;
use super::errors::{BatchTooLarge, DeliveryFailure, PipelineError};
use super::state::State;
use super::tally::label;

impl State {
    pub(super) fn on_ack(&mut self, ack: Ack) -> Result<(), PipelineError> {
        if is_progress(ack.tag) {
            return self.progress_delivered(ack.result);
        }
        let pending = self
            .out
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
                let (now, pg_now) = self.out.ack_clock;
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
                let kind = ErrorKind::of_kafka(&error).filter(|k| self.dead.wants(*k));
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
                    self.dead.too_large.hold((pending, ack.topic, error));
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

    pub(super) fn drain_acks(&mut self) -> Result<(), PipelineError> {
        self.out.refresh_ack_clock();
        while let Ok(ack) = self.out.acks.try_recv() {
            self.on_ack(ack)?;
        }
        self.settle_too_large()
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
}

/// An error's code as a metrics label.
pub(super) fn kafka_code(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "Other".to_string(),
    }
}
