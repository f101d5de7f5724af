//! `outbox-relay tail`: prints records as they arrive in Kafka, with topic,
//! partition, offset, key, headers and payload. An operator's (and the
//! demo's) way to watch what the relay publishes, without a Kafka CLI.

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Debug, Clone, clap::Args)]
pub struct TailOptions {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: String,
    /// Follow every topic whose name starts with this prefix (new topics are
    /// picked up as they appear).
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Print what the topics already hold too, not only new records.
    #[arg(long)]
    pub from_beginning: bool,
}

/// Follows the topics until `stop` is set or `max` records were printed.
pub fn run(
    opts: &TailOptions,
    stop: Arc<AtomicBool>,
    out: &mut dyn Write,
) -> Result<u64, KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &opts.kafka_brokers)
        .set("group.id", "outbox-relay-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut assigned: HashSet<(String, i32)> = HashSet::new();
    let mut tpl = TopicPartitionList::new();
    let mut last_scan: Option<Instant> = None;
    let mut printed = 0u64;
    let mut first_scan = true;
    while !stop.load(Ordering::Relaxed) {
        if last_scan.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            last_scan = Some(Instant::now());
            if let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(3)) {
                let mut changed = false;
                for t in md.topics() {
                    if !t.name().starts_with(&opts.topic_prefix) || t.name().starts_with("__") {
                        continue;
                    }
                    for p in t.partitions() {
                        if assigned.insert((t.name().to_string(), p.id())) {
                            let offset = if first_scan && !opts.from_beginning {
                                let (_, high) = consumer.fetch_watermarks(
                                    t.name(),
                                    p.id(),
                                    Duration::from_secs(5),
                                )?;
                                Offset::Offset(high)
                            } else {
                                Offset::Beginning
                            };
                            tpl.add_partition_offset(t.name(), p.id(), offset)?;
                            changed = true;
                        }
                    }
                }
                if changed {
                    consumer.incremental_assign(&tpl)?;
                    tpl = TopicPartitionList::new();
                }
                if first_scan {
                    first_scan = false;
                    eprintln!(
                        "tail: following {} partitions{}; topics created from now on are read from their start",
                        assigned.len(),
                        if opts.from_beginning { " from their start" } else { " from their end" }
                    );
                }
            }
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let text = |b: Option<&[u8]>| match b {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => "∅".to_string(),
        };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| format!("{}={}", h.key, text(h.value)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}[{}]@{} key={} headers={{{}}} payload={}",
            m.topic(),
            m.partition(),
            m.offset(),
            text(m.key()),
            headers,
            text(m.payload())
        );
        let _ = out.flush();
        printed += 1;
        if opts.max.is_some_and(|max| printed >= max) {
            break;
        }
    }
    Ok(printed)
}
