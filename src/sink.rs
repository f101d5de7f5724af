//! The Kafka sink: an idempotent producer and its delivery reports.
//!
//! Records are enqueued in WAL order without awaiting each one; librdkafka
//! batches them. Delivery reports come back on the producer's polling thread
//! and are forwarded, tagged with the record's transaction, to the pipeline,
//! which feeds them to the checkpoint. With `enable.idempotence=true`
//! librdkafka keeps at most 5 requests in flight per partition and retries
//! without reordering, so a partition receives its records in commit order.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::checkpoint::TxnSeq;
use crate::router::OutboxRecord;

/// A delivery report: the transaction the record belonged to and the outcome.
#[derive(Debug)]
pub struct Ack {
    pub txn: TxnSeq,
    pub result: Result<Delivered, KafkaError>,
    pub topic: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid Kafka producer configuration: {0}")]
    Config(KafkaError),
    #[error("--kafka-property {key}={value} would break ordering or lose events: the relay requires {key}={required}; remove that property")]
    Weakened {
        key: String,
        value: String,
        required: String,
    },
    #[error("cannot enqueue a record for topic {topic}: {error}")]
    Enqueue { topic: String, error: KafkaError },
}

/// The producer settings the relay's guarantees depend on. A user property
/// may not weaken them.
const REQUIRED: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

struct AckContext {
    acks: mpsc::UnboundedSender<Ack>,
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, txn: usize) {
        let (topic, result) = match result {
            Ok(m) => (
                m.topic().to_string(),
                Ok(Delivered { partition: m.partition(), offset: m.offset() }),
            ),
            Err((e, m)) => (m.topic().to_string(), Err(e.clone())),
        };
        // The receiver is gone only when the pipeline stopped; the record's
        // transaction then stays unconfirmed, which is the safe outcome.
        let _ = self.acks.send(Ack { txn: txn as TxnSeq, result, topic });
    }
}

/// Outcome of handing one record to the producer.
pub enum Enqueued {
    Yes,
    /// librdkafka's local queue is full: wait for delivery reports, then retry.
    QueueFull,
}

pub struct KafkaSink {
    producer: ThreadedProducer<AckContext>,
}

impl KafkaSink {
    /// Builds the producer. The channel's size is bounded by the pipeline's
    /// in-flight limit: one report per enqueued record.
    pub fn new(
        brokers: &str,
        properties: &[(String, String)],
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ack>), SinkError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("client.id", "outbox-relay")
            // Kafka's default partitioner (murmur2, as the Java client): the
            // same key lands on the same partition whoever produces it.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        for (k, v) in REQUIRED {
            if let Some(user) = cfg.get(k) {
                if user != *v {
                    return Err(SinkError::Weakened {
                        key: k.to_string(),
                        value: user.to_string(),
                        required: v.to_string(),
                    });
                }
            }
            cfg.set(*k, *v);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let producer = cfg
            .create_with_context(AckContext { acks: tx })
            .map_err(SinkError::Config)?;
        Ok((KafkaSink { producer }, rx))
    }

    /// Enqueues one record; its delivery report will carry `txn`.
    pub fn enqueue(&self, rec: &OutboxRecord, txn: TxnSeq) -> Result<Enqueued, SinkError> {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (name, value) in &rec.headers {
            headers = headers.insert(Header { key: name, value: value.as_deref() });
        }
        let mut record = BaseRecord::with_opaque_to(&rec.topic, txn as usize)
            .key(&rec.key[..])
            .headers(headers);
        if let Some(p) = &rec.payload {
            record = record.payload(&p[..]);
        }
        match self.producer.send(record) {
            Ok(()) => Ok(Enqueued::Yes),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Ok(Enqueued::QueueFull)
            }
            Err((error, _)) => Err(SinkError::Enqueue { topic: rec.topic.clone(), error }),
        }
    }

    /// Waits until every enqueued record has a delivery report, or `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}
