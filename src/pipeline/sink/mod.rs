//! The Kafka sink: an idempotent producer and its delivery reports.
//!
//! Records are enqueued in WAL order without awaiting each one; librdkafka
//! batches them. Delivery reports come back on the producer's polling thread
//! and are forwarded, tagged with the record's transaction, to the pipeline,
//! which feeds them to the checkpoint. With `enable.idempotence=true`
//! librdkafka keeps at most 5 requests in flight per partition and retries
//! without reordering, so a partition receives its records in commit order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::pipeline::route::router::OutboxRecord;

mod partitions;
use partitions::KeyPartitions;
pub use partitions::Remapped;

/// The producer every sink builds: delivery reports to the pipeline, keys
/// mapped by [`KeyPartitions`].
type RelayProducer = ThreadedProducer<AckContext, KeyPartitions>;

/// A delivery report: the tag the record was enqueued with and the outcome.
#[derive(Debug)]
pub struct Ack {
    pub tag: u64,
    pub result: Result<Delivered, KafkaError>,
    /// The record's topic, filled only for a failed delivery.
    pub topic: String,
    /// When the delivery report came in: the acknowledgement's time as seen
    /// here, however long the pipeline takes to get to it.
    pub at: Instant,
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
    #[error("--kafka-property {key}={value} would break ordering or lose events ({why}): the relay requires {key}={required}; remove that property")]
    Weakened {
        key: String,
        value: String,
        required: String,
        why: &'static str,
    },
    #[error("cannot enqueue a record for topic {topic}: {error}")]
    Enqueue { topic: String, error: KafkaError },
}

/// The producer settings the relay's guarantees depend on, with what goes
/// wrong without them. A user property may not weaken them.
///
/// Deliveries never time out and are retried without limit: when an
/// idempotent librdkafka producer gives up on a record (message timeout,
/// retries exhausted) it bumps its epoch and goes on writing the records
/// behind it, so a partition can hold later events before the one that
/// failed. The pipeline abandons the producer on the first failed delivery,
/// but librdkafka may already have written the later ones by then. So the
/// relay waits for the broker instead: an outage fills the in-flight window,
/// WAL reading pauses, and delivery resumes in order when the broker is back.
const REQUIRED: &[(&str, &str, &str)] = &[
    (
        "enable.idempotence",
        "true",
        "a retried batch could be written twice or out of order",
    ),
    (
        "acks",
        "all",
        "a record acknowledged by the leader alone is lost if the leader fails",
    ),
    (
        "message.timeout.ms",
        "0",
        "a record that times out is skipped while later ones are still written, out of commit order",
    ),
    (
        "retries",
        "2147483647",
        "a record that runs out of retries is skipped while later ones are still written, out of commit order",
    ),
    (
        "partitioner",
        "murmur2_random",
        "another partitioner maps keys to partitions unlike Kafka's default (murmur2, as the Java client), and `random` spreads one aggregate over several partitions, out of commit order",
    ),
];

/// librdkafka's other names for the required properties.
pub mod client;
pub mod inflight;
pub mod progress;
pub mod publisher;
pub mod read_back;
pub mod transactions;

const ALIASES: &[(&str, &str)] = &[
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("message.send.max.retries", "retries"),
    ("request.required.acks", "acks"),
];

struct AckContext {
    acks: mpsc::UnboundedSender<Ack>,
    /// librdkafka reports a down broker many times a second; say it once per
    /// interval, with how many reports were folded into the line.
    quiet: Mutex<HashMap<String, (Instant, u64)>>,
    partitions: KeyPartitions,
}

const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

impl AckContext {
    /// True when a report of this kind should be logged now; otherwise counts it.
    fn should_log(&self, kind: &str) -> Option<u64> {
        let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        match quiet.get_mut(kind) {
            Some((at, suppressed)) if at.elapsed() < REPEAT_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = Instant::now();
                *suppressed = 0;
                Some(n)
            }
            None => {
                quiet.insert(kind.to_string(), (Instant::now(), 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for AckContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if let Some(suppressed) = self.should_log(fac) {
                    tracing::warn!(target: "librdkafka", facility = fac, suppressed, "{message}");
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}")
            }
        }
    }

    /// librdkafka's statistics (queue and request latencies, round trips,
    /// batch sizes per broker and partition), only when the operator sets
    /// `statistics.interval.ms`: one JSON document per line, as librdkafka
    /// wrote it, for tools that already read it.
    fn stats_raw(&self, statistics: &[u8]) {
        tracing::info!(target: "librdkafka::stats", "{}", String::from_utf8_lossy(statistics));
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(code) => format!("{code:?}"),
            None => error.to_string(),
        };
        if let Some(suppressed) = self.should_log(&kind) {
            tracing::warn!(
                suppressed,
                "Kafka client error: {error}: {reason}; undelivered events stay in flight and the slot does not move past them"
            );
        }
    }
}

impl ProducerContext<KeyPartitions> for AckContext {
    type DeliveryOpaque = usize;

    fn get_custom_partitioner(&self) -> Option<&KeyPartitions> {
        Some(&self.partitions)
    }

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        let settled = match result {
            Ok(m) => m.topic(),
            Err((_, m)) => m.topic(),
        };
        self.partitions.settled(settled);
        // The topic is only needed to explain a failure: no allocation per
        // successful delivery.
        let (topic, result) = match result {
            // librdkafka reports a send the broker called a duplicate of an
            // earlier one (DUPSEQ) as delivered, without an offset. Seen on a
            // partition just created: the earlier send was never written,
            // and the record was lost though reported delivered. Nothing
            // without an offset counts as written: the session starts again
            // from the slot, so at worst the record comes twice.
            Ok(m) if m.offset() < 0 => (
                m.topic().to_string(),
                Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::DuplicateSequenceNumber,
                )),
            ),
            Ok(m) => (
                String::new(),
                Ok(Delivered {
                    partition: m.partition(),
                    offset: m.offset(),
                }),
            ),
            Err((e, m)) => (m.topic().to_string(), Err(e.clone())),
        };
        // The receiver is gone only when the pipeline stopped; the record's
        // transaction then stays unconfirmed, which is the safe outcome.
        let _ = self.acks.send(Ack {
            tag: tag as u64,
            result,
            topic,
            at: Instant::now(),
        });
    }
}

fn canonical_name(key: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, name)| name)
}

/// Fails on the first `--kafka-property` that would weaken a setting in
/// [`REQUIRED`] (under its own name or an alias). The last value of a key
/// wins, as in librdkafka.
pub fn refuse_weakened(properties: &[(String, String)]) -> Result<(), SinkError> {
    for (k, v, why) in REQUIRED {
        refuse_one(properties, k, v, why)?;
    }
    Ok(())
}

fn refuse_one(
    properties: &[(String, String)],
    k: &str,
    v: &str,
    why: &'static str,
) -> Result<(), SinkError> {
    let user = properties
        .iter()
        .rev()
        .find(|(key, _)| canonical_name(key) == k)
        .map(|(_, value)| value.trim());
    if let Some(user) = user {
        let same = user.eq_ignore_ascii_case(v) || (k == "acks" && user == "-1");
        if !same {
            return Err(SinkError::Weakened {
                key: k.to_string(),
                value: user.to_string(),
                required: v.to_string(),
                why,
            });
        }
    }
    Ok(())
}

/// Outcome of handing one record to the producer.
pub enum Enqueued {
    Yes,
    /// librdkafka's local queue is full: wait for delivery reports, then retry.
    QueueFull,
}

/// A sink and the receiver of its delivery reports, as the constructors
/// return them.
pub type WithReports = (KafkaSink, mpsc::UnboundedReceiver<Ack>);

pub struct KafkaSink {
    producer: Arc<RelayProducer>,
    /// Topics records were delivered to, for the probe (bounded).
    topics: Arc<Mutex<Vec<String>>>,
}

/// Most topics whose partition counts the probe follows.
pub const MAX_PROBED_TOPICS: usize = 256;

impl KafkaSink {
    /// Builds the producer. The channel's size is bounded by the pipeline's
    /// in-flight limit: one report per enqueued record.
    pub fn new(
        brokers: &str,
        properties: &[(String, String)],
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ack>), SinkError> {
        Self::build(brokers, properties, None)
    }

    /// A transactional producer (`--delivery exactly-once`). Deliveries may
    /// time out here (librdkafka's default, the transaction timeout): a
    /// failed record fails its whole transaction, which is aborted and sent
    /// again, so a timed-out record cannot leave a gap that later records
    /// pass. An endless message timeout would instead let a commit wait
    /// forever on a broker that is down.
    pub fn transactional(
        brokers: &str,
        properties: &[(String, String)],
        transactional_id: &str,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ack>), SinkError> {
        Self::build(brokers, properties, Some(transactional_id))
    }

    fn build(
        brokers: &str,
        properties: &[(String, String)],
        transactional_id: Option<&str>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ack>), SinkError> {
        let mut cfg = client::client_config(
            brokers,
            "outbox-relay",
            &[
                ("linger.ms", "5"),
                // librdkafka's 10 s cap on the reconnect backoff is most of
                // the time to resume after a broker outage (the relay waits
                // it out); a connection attempt a second to a broker that is
                // down costs nothing.
                ("reconnect.backoff.max.ms", "1000"),
            ],
            properties,
        );
        let required = REQUIRED
            .iter()
            .filter(|(k, _, _)| transactional_id.is_none() || *k != "message.timeout.ms");
        for (k, v, why) in required.clone() {
            refuse_one(properties, k, v, why)?;
        }
        for (k, v, _) in required {
            cfg.set(*k, *v);
        }
        if let Some(id) = transactional_id {
            cfg.set("transactional.id", id);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let producer = cfg
            .create_with_context(AckContext {
                acks: tx,
                quiet: Mutex::new(HashMap::new()),
                partitions: KeyPartitions::default(),
            })
            .map_err(SinkError::Config)?;
        Ok((
            KafkaSink {
                producer: Arc::new(producer),
                topics: Arc::new(Mutex::new(Vec::new())),
            },
            rx,
        ))
    }

    /// Enqueues one record; its delivery report will carry `tag`.
    pub fn enqueue(&self, rec: &OutboxRecord, tag: u64) -> Result<Enqueued, SinkError> {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (name, value) in &rec.headers {
            headers = headers.insert(Header {
                key: name,
                value: value.as_deref(),
            });
        }
        let mut record = BaseRecord::with_opaque_to(&rec.topic, tag as usize)
            .key(&rec.key[..])
            .headers(headers);
        if let Some(p) = &rec.payload {
            record = record.payload(&p[..]);
        }
        let partitions = &self.producer.context().partitions;
        partitions.sending(&rec.topic);
        let sent = self.producer.send(record);
        if sent.is_err() {
            partitions.settled(&rec.topic);
        }
        match sent {
            Ok(()) => Ok(Enqueued::Yes),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Ok(Enqueued::QueueFull)
            }
            Err((error, _)) => Err(SinkError::Enqueue {
                topic: rec.topic.to_string(),
                error,
            }),
        }
    }

    /// Drops every record not yet delivered, queued or in flight. After a
    /// failed delivery nothing enqueued later may reach the broker before
    /// the failed record is sent again (that would break commit order), so
    /// the session abandons its producer at once and resumes from the slot.
    pub fn abandon(&self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }

    /// A handle for [`Prober::probe`] on another thread.
    pub fn prober(&self) -> Prober {
        Prober {
            producer: self.producer.clone(),
            topics: self.topics.clone(),
            partitions: HashMap::new(),
            round: 0,
        }
    }

    /// A topic a record was delivered to: from now on the probe asks about
    /// it (it exists, so asking never creates it) and follows its partition
    /// count.
    pub fn note_topic(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if topics.len() < MAX_PROBED_TOPICS && !topics.iter().any(|t| t == topic) {
            topics.push(topic.to_string());
        }
    }
}

/// What one probe found.
#[derive(Debug, Default)]
pub struct ProbeReport {
    pub reachable: bool,
    /// The topic asked about and its partition count, if one was.
    pub partitions: Option<(String, i32)>,
    /// Its count before, when it changed since the last time it was asked.
    pub changed_from: Option<i32>,
    /// Topics whose keys now map by a new partition count.
    pub remapped: Vec<Remapped>,
}

/// Asks the cluster for metadata to tell whether a broker answers. Blocking:
/// run it off the async runtime.
pub struct Prober {
    producer: Arc<RelayProducer>,
    topics: Arc<Mutex<Vec<String>>>,
    partitions: HashMap<String, i32>,
    round: usize,
}

impl Prober {
    /// One metadata request: about one topic records went to, in turn
    /// (light on a cluster with many topics, and it follows each topic's
    /// partition count: a topic that gains partitions moves keys to other
    /// partitions, review M10), or about all topics before any record was
    /// delivered (asking about a topic that does not exist would have some
    /// brokers create it).
    pub fn probe(&mut self, timeout: Duration) -> ProbeReport {
        let remapped = self.producer.context().partitions.take_remapped();
        let topic = {
            let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            (!topics.is_empty()).then(|| topics[self.round % topics.len()].clone())
        };
        self.round = self.round.wrapping_add(1);
        let Some(topic) = topic else {
            return ProbeReport {
                reachable: self.producer.client().fetch_metadata(None, timeout).is_ok(),
                remapped,
                ..ProbeReport::default()
            };
        };
        let Ok(md) = self.producer.client().fetch_metadata(Some(&topic), timeout) else {
            return ProbeReport {
                remapped,
                ..ProbeReport::default()
            };
        };
        let count = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0);
        let Some(count) = count else {
            return ProbeReport {
                reachable: true,
                remapped,
                ..ProbeReport::default()
            };
        };
        let before = self.partitions.insert(topic.clone(), count);
        ProbeReport {
            reachable: true,
            changed_from: before.filter(|b| *b != count),
            partitions: Some((topic, count)),
            remapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn guarantees_cannot_be_weakened() {
        let err = KafkaSink::new("127.0.0.1:1", &props(&[("enable.idempotence", "false")]))
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("enable.idempotence=false"),
            "{err}"
        );
        assert!(KafkaSink::new("127.0.0.1:1", &props(&[("acks", "1")])).is_err());
        assert!(KafkaSink::new(
            "127.0.0.1:1",
            &props(&[("acks", "-1"), ("compression.type", "zstd")])
        )
        .is_ok());
    }

    #[test]
    fn deliveries_may_not_time_out_or_run_out_of_retries() {
        for (k, v, named) in [
            ("message.timeout.ms", "10000", "message.timeout.ms=10000"),
            ("delivery.timeout.ms", "120000", "message.timeout.ms=120000"),
            ("retries", "5", "retries=5"),
            ("message.send.max.retries", "0", "retries=0"),
        ] {
            let err = KafkaSink::new("127.0.0.1:1", &props(&[(k, v)]))
                .err()
                .unwrap_or_else(|| panic!("{k}={v} accepted"));
            let msg = err.to_string();
            assert!(msg.contains(named), "{msg}");
            assert!(msg.contains("out of commit order"), "{msg}");
        }
        // Kafka's default partitioner (murmur2, as the Java client) is
        // required: the same key lands on the same partition whoever
        // produces it. review M4.
        for p in ["random", "consistent_random", "fnv1a"] {
            let err = KafkaSink::new("127.0.0.1:1", &props(&[("partitioner", p)]))
                .err()
                .unwrap_or_else(|| panic!("partitioner={p} accepted"));
            assert!(
                err.to_string().contains(&format!("partitioner={p}")),
                "{err}"
            );
        }
        assert!(
            KafkaSink::new("127.0.0.1:1", &props(&[("partitioner", "murmur2_random")])).is_ok()
        );
        // Stating the required value is allowed.
        assert!(KafkaSink::new("127.0.0.1:1", &props(&[("message.timeout.ms", "0")])).is_ok());
        assert!(KafkaSink::new("127.0.0.1:1", &props(&[("retries", "2147483647")])).is_ok());
    }

    #[test]
    fn unknown_properties_are_a_config_error() {
        let err = KafkaSink::new("127.0.0.1:1", &props(&[("no.such.property", "1")]))
            .err()
            .expect("refused");
        assert!(matches!(err, SinkError::Config(_)), "{err}");
    }
}
