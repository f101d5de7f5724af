//! The latency consumer: reads the run's topics from the beginning in this process
//! and takes the time each record arrives, on the clock the writers take commit
//! times from. It only reads; it must not commit offsets or join a shared group,
//! so that runs never see each other's records. It reads `read_committed`, as
//! the exactly-once relay's consumers must.

use crate::scenarios::committed::parse_seq;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, Timestamp, TopicPartitionList};

use crate::now_us;

/// One received record: seq, receive time (epoch µs), record timestamp (epoch ms), kind.
pub(super) type Received = (i64, i64, i64, &'static str);

pub(super) fn consume_until(
    brokers: String,
    topics: Vec<String>,
    partitions: i32,
    fetch_wait_ms: u64,
    expected: Arc<AtomicU64>,
    give_up: Arc<AtomicBool>,
) -> Result<Vec<Received>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("outbox-bench-{}", now_us()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        // librdkafka's default, stated: the exactly-once relay's records are
        // visible at its Kafka commit, and the other publishers' at once.
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in &topics {
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    c.assign(&tpl)?;
    let mut got: Vec<Received> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        if let Some(m) = c.poll(Duration::from_millis(20)) {
            let recv = now_us();
            let m = m?;
            let (ts, kind) = match m.timestamp() {
                Timestamp::CreateTime(t) => (t, "CreateTime"),
                Timestamp::LogAppendTime(t) => (t, "LogAppendTime"),
                Timestamp::NotAvailable => (0, "none"),
            };
            if let Some(seq) = m.payload().and_then(parse_seq) {
                if seen.insert(seq) {
                    got.push((seq, recv, ts, kind));
                }
            }
        }
        if seen.len() as u64 >= expected.load(Ordering::Relaxed) || give_up.load(Ordering::Relaxed)
        {
            return Ok(got);
        }
    }
}

/// Per received record with a known commit: commit → consumer (ms), commit →
/// record timestamp (ms), and the timestamp's type.
pub(super) fn commit_to_consumer(
    got: &[Received],
    commits: &HashMap<i64, i64>,
) -> (Vec<f64>, Vec<f64>, &'static str) {
    let mut e2e = Vec::new();
    let mut to_ts = Vec::new();
    let mut ts_kind = "none";
    for (seq, recv, ts, kind) in got {
        if let Some(c) = commits.get(seq) {
            e2e.push((recv - c) as f64 / 1000.0);
            if *ts > 0 {
                to_ts.push((ts * 1000 - c) as f64 / 1000.0);
                ts_kind = kind;
            }
        }
    }
    (e2e, to_ts, ts_kind)
}
