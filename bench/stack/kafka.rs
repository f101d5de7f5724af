//! Kafka of the stack: topics, counting the records in them, and the producer
//! settings every baseline shares with the relay (src/pipeline/sink/mod.rs). Kept
//! apart from the scenarios so a baseline cannot drift from the relay's producer by
//! accident.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::now_us;

/// Topics are per run (a memory broker keeps them until it stops).
pub(crate) fn topic_name(name: &str) -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| format!("{:x}", now_us() / 1_000_000));
    format!("bench.{run}.{name}")
}

pub(crate) async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("create topic {t}: {e}");
        }
    }
    Ok(())
}

/// Sum of the high watermarks of every partition of `topic`: records in the topic.
pub(crate) fn hw_sum(brokers: &str, topic: &str) -> Result<i64> {
    hw_sum_with(&watermark_client(brokers)?, topic)
}

pub(crate) fn watermark_client(brokers: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-bench-watermarks")
        .create()?)
}

pub(crate) fn hw_sum_with(c: &BaseConsumer, topic: &str) -> Result<i64> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow!("no metadata for {topic}"))?;
    let mut sum = 0;
    for p in t.partitions() {
        let (lo, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        sum += hi - lo;
    }
    Ok(sum)
}

pub(crate) async fn hw_sum_async(brokers: &str, topic: &str) -> Result<i64> {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || hw_sum(&b, &t)).await?
}

/// Waits until the topic holds `want` records (or `timeout`); returns the count.
pub(crate) async fn wait_records(
    brokers: &str,
    topic: &str,
    want: i64,
    timeout: Duration,
) -> Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = hw_sum_async(brokers, topic).await?;
        if n >= want || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--linger-ms`: given to the relay (`--kafka-property linger.ms=N`) and to every
/// producer of the bench; None keeps the relay's default (5 ms, src/pipeline/sink/mod.rs).
pub(crate) static LINGER_MS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

pub(crate) fn linger_ms() -> Option<u64> {
    LINGER_MS.get().copied().flatten()
}

pub(crate) fn producer_config(brokers: &str) -> ClientConfig {
    // The relay's own producer settings (src/pipeline/sink/mod.rs), so the baseline
    // differs only in where the records come from.
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger_ms().unwrap_or(5).to_string())
        .set("enable.idempotence", "true")
        .set("acks", "all");
    if std::env::var_os("BENCH_RDKAFKA_STATS").is_some() {
        c.set("statistics.interval.ms", "1000");
    }
    c
}
