//! Exactly-once: when a session ends on an error that is only the
//! consequence of a failed Kafka transaction, the delivery reports still
//! coming in say what the cause was (a record Kafka refused), and whether
//! the next session dead-letters it (`refused`) or the relay stops.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::pipeline::policy::ErrorKind;
use crate::pipeline::sink::transactions::TxnFailure;
use crate::pipeline::sink::SinkError;

use super::errors::PipelineError;
use super::state::State;
use super::window::Pending;

/// How long a failed Kafka transaction's remaining delivery reports are
/// waited for, to find the record that failed it. librdkafka fails them all
/// at once, so this is only reached when the broker does not answer.
const CAUSE_WAIT: Duration = Duration::from_secs(2);

/// Whether an error is only the consequence of a failed Kafka transaction
/// (librdkafka purges the records it had not sent yet), not its cause.
fn is_consequence(e: &PipelineError) -> bool {
    let purged = |k: &KafkaError| {
        matches!(
            k.rdkafka_error_code(),
            Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
        )
    };
    match e {
        PipelineError::Delivery(d) => purged(&d.error),
        PipelineError::Transaction(t) => t.kind == TxnFailure::Abortable,
        // A producer whose transaction failed refuses new records until it
        // is aborted, often before the failed record's report is read.
        PipelineError::Sink(SinkError::Enqueue { error, .. }) => {
            error.rdkafka_error_code() == Some(RDKafkaErrorCode::State)
        }
        _ => false,
    }
}

impl State {
    /// Exactly-once, a session ending on `first`: when that is only the
    /// consequence of a failed Kafka transaction, often reported before the
    /// record that failed it, the remaining reports say what the cause was.
    /// A record refused under a dead-letter policy is noted for the next
    /// session (and the session ends retriably); records refused together
    /// as too large are a batch (the topic's limit is below batch.size); a
    /// record refused under halt, or a dead letter refused, stops the relay.
    pub(super) async fn eos_cause(&mut self, first: PipelineError) -> PipelineError {
        if !self.delivery.is_exactly_once() || !is_consequence(&first) {
            return first;
        }
        let mut refused: Vec<(Pending, ErrorKind, String, KafkaError)> = self
            .dead
            .too_large
            .take_all()
            .into_iter()
            .map(|(p, topic, e)| (p, ErrorKind::TooLarge, topic, e))
            .collect();
        let mut halted = None;
        let deadline = tokio::time::Instant::now() + CAUSE_WAIT;
        while !self.out.window.is_empty() {
            let Ok(Some(ack)) = tokio::time::timeout_at(deadline, self.out.acks.recv()).await
            else {
                break;
            };
            let Some(p) = self.out.window.take(ack.tag) else {
                continue; // the progress record's, or one already settled
            };
            let Err(error) = ack.result else {
                continue;
            };
            match ErrorKind::of_kafka(&error) {
                Some(kind) if !p.dead_letter && self.dead.wants(kind) => {
                    refused.push((p, kind, ack.topic, error));
                }
                Some(_) if halted.is_none() => {
                    halted = Some(self.delivery_failure(p.txn, ack.topic, error));
                }
                _ => {}
            }
        }
        if let Some(h) = halted {
            return h;
        }
        let too_large = refused
            .iter()
            .filter(|(_, k, _, _)| *k == ErrorKind::TooLarge)
            .count();
        if too_large > 1 {
            let first = refused
                .iter()
                .position(|(_, k, _, _)| *k == ErrorKind::TooLarge)
                .unwrap_or(0);
            let (p, _, topic, error) = refused.swap_remove(first);
            return self.batch_too_large(p.txn, topic, error, too_large);
        }
        let mut cause = None;
        for (p, kind, topic, error) in refused {
            let e = self.refuse(&p, kind, topic, error);
            cause.get_or_insert(e);
        }
        cause.unwrap_or(first)
    }
}
