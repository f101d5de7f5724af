//! Reading back what the relay published: every record of the routed
//! topics, from each partition's start (or the first record at or after a
//! time) to the high watermark captured before reading. `verify` compares it
//! with the outbox table; `recover` publishes only what it lacks.
//!
//! The reader is read_committed: records of an open or aborted Kafka
//! transaction are not "in Kafka" for a consumer, so they are not here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::client::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::pipeline::route::router::TopicTemplate;

#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("Kafka: {what}: {source}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading the topics up to their high watermarks took longer than {timeout:?}; still behind: {behind}")]
    ReadTimeout { timeout: Duration, behind: String },
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> ReadBackError {
    let what = what.into();
    move |source| ReadBackError::Kafka { what, source }
}

/// One record read from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl KafkaRecord {
    /// The owned copy of a record a consumer handed out.
    pub fn of(m: &BorrowedMessage<'_>) -> KafkaRecord {
        KafkaRecord {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The event id: the `id` header as text.
    pub fn event_id(&self) -> Option<String> {
        self.header("id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn location(&self) -> String {
        format!("{}[{}]@{}", self.topic, self.partition, self.offset)
    }

    pub fn same_content(&self, other: &KafkaRecord) -> bool {
        self.topic == other.topic
            && self.key == other.key
            && self.payload == other.payload
            && self.headers == other.headers
    }
}

/// What the Kafka side of the check read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub topics: Vec<String>,
    /// Topics the rows route to that the broker does not have.
    pub absent_topics: Vec<String>,
    pub partitions: u64,
    pub records: Vec<KafkaRecord>,
}

/// Which topics to read.
#[derive(Debug, Clone)]
pub enum TopicSelection {
    Names(BTreeSet<String>),
    /// Every broker topic the template could have produced.
    Matching(TopicTemplate),
}

/// Reads every record of the topics, from each partition's start (with
/// `since`, ms since the epoch: from its first record with a timestamp at or
/// after it) to the high watermark captured before reading. Blocking.
pub fn read_topics(
    brokers: &str,
    properties: &[(String, String)],
    selection: &TopicSelection,
    since: Option<i64>,
    timeout: Duration,
) -> Result<Snapshot, ReadBackError> {
    let consumer: BaseConsumer = client_config(brokers, "outbox-relay-verify", &[], properties)
        // Required by librdkafka for a consumer; nothing is ever committed.
        .set("group.id", "outbox-relay-verify")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(kafka("creating the consumer"))?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(kafka("fetching metadata"))?;
    let on_broker: HashMap<&str, Vec<i32>> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name(), t.partitions().iter().map(|p| p.id()).collect()))
        .collect();
    let (topics, absent_topics) = select_topics(&on_broker, selection);
    let mut ends = Ends::capture(&consumer, &topics, &on_broker, since)?;
    let records = ends.read(&consumer, timeout)?;
    Ok(Snapshot {
        topics,
        absent_topics,
        partitions: ends.partitions,
        records,
    })
}

/// The selected topics the broker has, and the named ones it lacks.
fn select_topics(
    on_broker: &HashMap<&str, Vec<i32>>,
    selection: &TopicSelection,
) -> (Vec<String>, Vec<String>) {
    match selection {
        TopicSelection::Names(names) => names
            .iter()
            .cloned()
            .partition(|t| on_broker.contains_key(t.as_str())),
        TopicSelection::Matching(t) => {
            let mut v: Vec<String> = on_broker
                .keys()
                .filter(|n| !n.starts_with("__") && t.matches(n))
                .map(|n| n.to_string())
                .collect();
            v.sort();
            (v, Vec::new())
        }
    }
}

/// Where reading stops: each partition's high watermark when the check
/// began, so records written while it reads do not keep it going.
struct Ends {
    high: HashMap<(String, i32), i64>,
    /// Partitions not yet read to their end.
    pending: HashSet<(String, i32)>,
    partitions: u64,
}

impl Ends {
    /// Captures the watermarks and assigns every non-empty partition from
    /// its low watermark, or from the offset of `since`.
    fn capture(
        consumer: &BaseConsumer,
        topics: &[String],
        on_broker: &HashMap<&str, Vec<i32>>,
        since: Option<i64>,
    ) -> Result<Ends, ReadBackError> {
        let mut ends = Ends {
            high: HashMap::new(),
            pending: HashSet::new(),
            partitions: 0,
        };
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            for &p in &on_broker[t.as_str()] {
                ends.partitions += 1;
                let (lo, hi) = consumer
                    .fetch_watermarks(t, p, Duration::from_secs(10))
                    .map_err(kafka(format!("watermarks of {t}[{p}]")))?;
                ends.high.insert((t.clone(), p), hi);
                if hi > lo {
                    ends.pending.insert((t.clone(), p));
                    tpl.add_partition_offset(t, p, Offset::Offset(lo))
                        .map_err(kafka("assigning"))?;
                }
            }
        }
        if let (Some(ms), false) = (since, ends.pending.is_empty()) {
            // A partition with nothing at or after the time is read already.
            for tp in Self::from_time(consumer, &tpl, ms)? {
                ends.pending.remove(&tp);
            }
            return Ok(ends);
        }
        if !ends.pending.is_empty() {
            consumer.assign(&tpl).map_err(kafka("assigning"))?;
        }
        Ok(ends)
    }

    /// Reassigns the partitions of `tpl` from their first records at or
    /// after `ms`; returns the partitions that have none.
    fn from_time(
        consumer: &BaseConsumer,
        tpl: &TopicPartitionList,
        ms: i64,
    ) -> Result<Vec<(String, i32)>, ReadBackError> {
        let mut asked = TopicPartitionList::new();
        for e in tpl.elements() {
            asked
                .add_partition_offset(e.topic(), e.partition(), Offset::Offset(ms))
                .map_err(kafka("asking offsets for a time"))?;
        }
        let found = consumer
            .offsets_for_times(asked, Duration::from_secs(10))
            .map_err(kafka("offsets for a time"))?;
        let mut assign = TopicPartitionList::new();
        let mut none = Vec::new();
        for e in found.elements() {
            match e.offset() {
                Offset::Offset(o) if o >= 0 => assign
                    .add_partition_offset(e.topic(), e.partition(), Offset::Offset(o))
                    .map_err(kafka("assigning"))?,
                _ => none.push((e.topic().to_string(), e.partition())),
            }
        }
        consumer.assign(&assign).map_err(kafka("assigning"))?;
        Ok(none)
    }

    /// Polls until every partition reached its end, or `timeout`.
    fn read(
        &mut self,
        consumer: &BaseConsumer,
        timeout: Duration,
    ) -> Result<Vec<KafkaRecord>, ReadBackError> {
        let mut records = Vec::new();
        let deadline = Instant::now() + timeout;
        while !self.pending.is_empty() {
            if Instant::now() > deadline {
                let mut behind: Vec<String> = self
                    .pending
                    .iter()
                    .map(|(t, p)| format!("{t}[{p}]"))
                    .collect();
                behind.sort();
                return Err(ReadBackError::ReadTimeout {
                    timeout,
                    behind: behind.join(", "),
                });
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => self.at_eof(consumer, p)?,
                Some(Err(e)) => return Err(kafka("reading")(e)),
                Some(Ok(m)) => {
                    let tp = (m.topic().to_string(), m.partition());
                    let Some(&hi) = self.high.get(&tp) else {
                        continue;
                    };
                    if m.offset() + 1 >= hi {
                        self.pending.remove(&tp);
                    }
                    // Beyond the end: written after the check started.
                    if m.offset() < hi {
                        records.push(KafkaRecord::of(&m));
                    }
                }
            }
        }
        Ok(records)
    }

    /// An end of partition `p` was reached. The EOF names no topic: ask where
    /// each partition numbered `p` stands.
    fn at_eof(&mut self, consumer: &BaseConsumer, p: i32) -> Result<(), ReadBackError> {
        let pos = consumer.position().map_err(kafka("reading positions"))?;
        for e in pos.elements() {
            let tp = (e.topic().to_string(), e.partition());
            if e.partition() != p {
                continue;
            }
            if let (Offset::Offset(o), Some(hi)) = (e.offset(), self.high.get(&tp)) {
                if o >= *hi {
                    self.pending.remove(&tp);
                }
            }
        }
        Ok(())
    }
}
