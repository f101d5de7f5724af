//! Kafka transactions for `--delivery exactly-once`: the transactional
//! producer's calls, off the runtime's threads (librdkafka's are blocking,
//! with no callback to wait on), and what each failure asks of the caller.
//!
//! librdkafka sorts a failed transactional call three ways: retriable (call
//! it again), abortable (abort, and rewind the input to where the
//! transaction began) and fatal (the producer is done). The relay rewinds by
//! ending the session: the next one builds a new producer, whose
//! `init_transactions` aborts whatever this one left open, and resumes from
//! the progress topic. So only "retriable" is handled here; everything else
//! ends the session.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::{Enqueued, KafkaSink, RelayProducer, SinkError};

/// The delivery tag of progress records: never a tag of the in-flight
/// tracker, whose tags count up from 0.
pub const PROGRESS_TAG: u64 = u32::MAX as u64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnFailure {
    /// Call the same operation again.
    Retriable,
    /// The transaction must be aborted; the producer lives on.
    Abortable,
    /// Another producer with the same transactional.id took over, or this
    /// transaction outlived transaction.timeout.ms (librdkafka cannot tell
    /// the two apart: it does not implement KIP-588).
    Fenced,
    /// The producer cannot be used any more.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {error}{hint}", hint = hint(*.kind))]
pub struct TxnError {
    pub kind: TxnFailure,
    pub what: &'static str,
    pub error: KafkaError,
}

fn hint(kind: TxnFailure) -> &'static str {
    match kind {
        TxnFailure::Fenced => ". Another relay with the same transactional.id started (it fences this one: check that only one relay per slot runs with --delivery exactly-once), or a Kafka transaction lasted longer than transaction.timeout.ms (lower --transaction-max-duration or raise the timeout)",
        _ => "",
    }
}

fn classify(error: &KafkaError) -> TxnFailure {
    match error {
        KafkaError::Transaction(e) if e.code() == RDKafkaErrorCode::Fenced => TxnFailure::Fenced,
        KafkaError::Transaction(e) if e.is_retriable() => TxnFailure::Retriable,
        KafkaError::Transaction(e) if e.txn_requires_abort() => TxnFailure::Abortable,
        // rust-rdkafka flushes before committing; a flush that ran out of
        // time leaves the commit to be called again.
        KafkaError::Flush(_) => TxnFailure::Retriable,
        _ => TxnFailure::Fatal,
    }
}

impl TxnError {
    fn of(what: &'static str, error: KafkaError) -> TxnError {
        TxnError {
            kind: classify(&error),
            what,
            error,
        }
    }
}

impl KafkaSink {
    /// Registers the transactional.id with its coordinator, fencing any
    /// earlier producer with the same id and aborting what it left open.
    pub async fn init_transactions(&self, timeout: Duration) -> Result<(), TxnError> {
        self.blocking("init_transactions", move |p| p.init_transactions(timeout))
            .await
    }

    /// Starts a transaction: a local state change, it does not block.
    pub fn begin_transaction(&self) -> Result<(), TxnError> {
        self.producer
            .begin_transaction()
            .map_err(|e| TxnError::of("begin_transaction", e))
    }

    /// Commits the open transaction (flushing its records first), on a
    /// blocking thread; the handle resolves when it is done.
    pub fn commit_transaction(
        &self,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<(), TxnError>> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .commit_transaction(timeout)
                .map_err(|e| TxnError::of("commit_transaction", e))
        })
    }

    /// Aborts the open transaction: its records are never shown to
    /// read_committed consumers.
    pub async fn abort_transaction(&self, timeout: Duration) -> Result<(), TxnError> {
        self.blocking("abort_transaction", move |p| p.abort_transaction(timeout))
            .await
    }

    /// The progress record of the open transaction, to partition 0 of the
    /// progress topic (whatever its partition count, so that reading it back
    /// needs no partitioner).
    pub fn enqueue_progress(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<Enqueued, SinkError> {
        let record = BaseRecord::with_opaque_to(topic, PROGRESS_TAG as usize)
            .partition(0)
            .key(key)
            .payload(value);
        match self.producer.send(record) {
            Ok(()) => Ok(Enqueued::Yes),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Ok(Enqueued::QueueFull)
            }
            Err((error, _)) => Err(SinkError::Enqueue {
                topic: topic.to_string(),
                error,
            }),
        }
    }
}

impl KafkaSink {
    /// A blocking call of the producer's, on a blocking thread; `what` names
    /// it in an error.
    async fn blocking(
        &self,
        what: &'static str,
        call: impl FnOnce(&RelayProducer) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), TxnError> {
        let producer = self.producer.clone();
        match tokio::task::spawn_blocking(move || call(&producer)).await {
            Ok(r) => r.map_err(|e| TxnError::of(what, e)),
            Err(_) => Err(TxnError {
                kind: TxnFailure::Fatal,
                what,
                error: KafkaError::Canceled,
            }),
        }
    }
}
