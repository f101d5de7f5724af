//! What the exactly-once runs add: a `read_committed` consumer's count of the
//! topics the relay wrote (the records of committed Kafka transactions, and how
//! many distinct events they are), and the relay's own transaction figures. The
//! high watermarks the other runs are verified with count each Kafka transaction's
//! commit marker too (one offset per partition it wrote), so they would read high
//! for these topics.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::now_us;
use crate::report::stats::{histogram_summary, metric_value};

/// Reads every partition of `topics` from the beginning to its end (one topic at a
/// time, so that an end-of-partition event names its partition) with
/// `isolation.level=read_committed`; at most `timeout` in all. The JSON has
/// `records` (committed records read), `distinct` (distinct `seq`s among them) and
/// `duplicates` (their difference).
pub(crate) async fn read_committed(
    brokers: &str,
    topics: &[String],
    partitions: i32,
    timeout: Duration,
) -> Result<Value> {
    let (b, t) = (brokers.to_string(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        let (mut records, mut seqs) = (0u64, HashSet::new());
        for topic in &t {
            records += read_topic(&b, topic, partitions, deadline, &mut seqs)?;
        }
        let distinct = seqs.len() as u64;
        Ok(json!({
            "records": records, "distinct": distinct,
            "duplicates": records.saturating_sub(distinct),
        }))
    })
    .await?
}

fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    deadline: Instant,
    seqs: &mut HashSet<i64>,
) -> Result<u64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("outbox-bench-committed-{}", now_us()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut at_end = HashSet::new();
    let mut records = 0;
    // The relay has stopped: nothing is added, so a partition at its end stays there.
    while (at_end.len() as i32) < partitions && Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                records += 1;
                if let Some(seq) = m.payload().and_then(parse_seq) {
                    seqs.insert(seq);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(records)
}

/// The exactly-once relay's own figures from its /metrics: Kafka transactions
/// committed and aborted, events per transaction, and how long a commit took.
pub(crate) fn exactly_once_figures(metrics: &str, events: u64, out: &mut Value) {
    let txns = metric_value(metrics, "outbox_kafka_transactions_committed_total");
    out["kafka_transactions_committed"] = json!(txns);
    out["kafka_transactions_aborted"] = json!(metric_value(
        metrics,
        "outbox_kafka_transactions_aborted_total"
    ));
    out["events_per_kafka_transaction"] = json!(txns.map(|t| events as f64 / t.max(1.0)));
    out["kafka_commit_ms"] = histogram_summary(metrics, "outbox_kafka_commit_duration_seconds");
}

/// The `seq` of a bench payload (`{"seq": N, …}`), without parsing the JSON.
pub(crate) fn parse_seq(payload: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(payload).ok()?;
    let i = s.find("\"seq\":")? + 6;
    let digits: String = s[i..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}
