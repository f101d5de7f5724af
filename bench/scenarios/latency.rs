//! Latency: one-event transactions at a fixed rate, each publisher in a run of its
//! own, a consumer on the same host taking the time each record arrives. The
//! writers' clock and the consumer's are the same process's, so nothing here may
//! sleep or block on the hot path beyond what it measures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, Timestamp, TopicPartitionList};
use serde_json::{json, Value};

use super::pollers::{poller, PollerKind, CLASSIC, TUNED};
use super::{relay_headers, AGGREGATES, PAD};
use crate::report::stats::{bucketed_summary, histogram_summary, pct_curve, summary};
use crate::stack::kafka::{create_topic, hw_sum_async, producer_config, topic_name};
use crate::stack::pg::{connect, drop_slots, fresh_db};
use crate::stack::{Cfg, Relay};
use crate::{log, now_us};

/// Latency runs write to a new topic every this many seconds (see latency_run).
const LATENCY_WINDOW_S: u64 = 5;

/// One received record: seq, receive time (epoch µs), record timestamp (epoch ms), kind.
type Received = (i64, i64, i64, &'static str);

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

fn consume_until(
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

enum Publisher {
    Relay,
    Poller(PollerKind),
    /// Baseline: the writer itself produces each event right after its COMMIT
    /// returned, with the relay's producer settings. What is left of the latency is
    /// the Kafka path (linger, broker append and ack, consumer fetch) alone.
    Direct,
}

/// Delivery report times of the direct-produce baseline: (seq, µs since the epoch).
struct AckTimes {
    acks: std::sync::Mutex<Vec<(i64, i64)>>,
}

impl ClientContext for AckTimes {
    /// `BENCH_RDKAFKA_STATS=FILE`: the baseline producer's librdkafka
    /// statistics every second, one JSON document per line, to set beside
    /// the relay's (`--relay-arg=--kafka-property
    /// --relay-arg=statistics.interval.ms=1000`, in its log).
    fn stats_raw(&self, statistics: &[u8]) {
        if let Ok(path) = std::env::var("BENCH_RDKAFKA_STATS") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(statistics);
                let _ = f.write_all(b"\n");
            }
        }
    }
}

impl ProducerContext for AckTimes {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, seq: usize) {
        if r.is_ok() && seq != usize::MAX {
            let at = now_us();
            self.acks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((seq as i64, at));
        }
    }
}

/// Writers at `rate` events/s of one-event transactions for `secs`; `publisher` moves
/// them to Kafka; a consumer on the same host records when each becomes visible.
async fn latency_run(
    cfg: &Cfg,
    name: &str,
    publisher: Publisher,
    rate: u64,
    secs: u64,
) -> Result<Value> {
    let db = format!("bench_lat_{name}");
    let url = fresh_db(cfg, &db).await?;
    let shadow_every =
        Some(cfg.a.shadow_direct).filter(|n| *n > 0 && matches!(publisher, Publisher::Relay));
    let topics = Topics::create(cfg, name, secs, shadow_every.is_some()).await?;
    let mut publishing =
        Publishing::start(cfg, name, publisher, &url, &topics, shadow_every)?;
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let give_up = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (b, t, p, w) = (
            cfg.a.brokers.clone(),
            topics.consumed.clone(),
            cfg.a.partitions,
            cfg.a.fetch_wait_ms,
        );
        let (e, g) = (expected.clone(), give_up.clone());
        tokio::task::spawn_blocking(move || consume_until(b, t, p, w, e, g))
    };
    // Let the relay connect and the consumer join before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(r) = publishing.relay.as_mut() {
        r.check_alive()?;
    }
    let cpu0 = publishing
        .relay
        .as_ref()
        .map(|r| r.resources(cfg.clk_tck).0);

    let (writers, start, hs) = spawn_writers(name, &url, rate, secs, &publishing, &topics);
    let mut commits: HashMap<i64, i64> = HashMap::new();
    for h in hs {
        commits.extend(h.await??);
    }
    let write_s = (tokio::time::Instant::now() - start).as_secs_f64();
    expected.store(commits.len() as u64, Ordering::Relaxed);
    let gu = give_up.clone();
    let waiter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        gu.store(true, Ordering::Relaxed);
    });
    let got = consumer.await??;
    waiter.abort();
    let mut res = json!({});
    publishing
        .finish(cfg, &url, &commits, cpu0, &mut res)
        .await?;
    let (e2e, to_ts, ts_kind) = commit_to_consumer(&got, &commits);
    let mut verified = 0;
    for t in &topics.consumed {
        verified += hw_sum_async(&cfg.a.brokers, t).await?;
    }
    log(format!(
        "latency/{name}: {} committed ({:.0}/s achieved), {} received; e2e {}",
        commits.len(),
        commits.len() as f64 / write_s,
        got.len(),
        summary(e2e.clone())
    ));
    res["rate_target"] = json!(rate);
    res["seconds"] = json!(secs);
    res["writers"] = json!(writers);
    res["committed"] = json!(commits.len());
    res["achieved_rate"] = json!(commits.len() as f64 / write_s);
    res["received"] = json!(got.len());
    res["verified_in_kafka"] = json!(verified);
    res["commit_to_consumer_ms"] = summary(e2e.clone());
    res["commit_to_record_timestamp_ms"] = summary(to_ts);
    res["record_timestamp_type"] = json!(ts_kind);
    res["curve"] = json!(pct_curve(&e2e));
    Ok(res)
}

/// A latency run's topics.
struct Topics {
    /// What the publisher is given: routed by event_type, one topic per window.
    template: String,
    /// The windows' topics, which the consumer reads.
    consumed: Vec<String>,
    /// Where direct records go: the consumed topics, or beside them when they
    /// shadow the relay's (measured by their delivery reports only).
    direct_base: String,
}

impl Topics {
    async fn create(cfg: &Cfg, name: &str, secs: u64, shadow: bool) -> Result<Topics> {
        // One topic per 5-second window, routed by event_type (the relay's topic
        // template): on nisshi, the earlier test broker, fetches slowed down as a
        // partition filled with the many small batches a 2k-5k/s trickle makes, and
        // the consumer, not the publisher, became the bottleneck. Small topics keep
        // the consumer from ever being the bottleneck.
        let base = topic_name(&format!("latency.{name}"));
        let template = format!("{base}.{{event_type}}");
        let windows = secs.div_ceil(LATENCY_WINDOW_S).max(1);
        let consumed: Vec<String> = (0..windows).map(|w| format!("{base}.w{w}")).collect();
        for t in &consumed {
            create_topic(&cfg.a.brokers, t, cfg.a.partitions).await?;
        }
        let direct_base = if shadow {
            format!("{base}.direct")
        } else {
            base.clone()
        };
        if shadow {
            for w in 0..windows {
                create_topic(
                    &cfg.a.brokers,
                    &format!("{direct_base}.w{w}"),
                    cfg.a.partitions,
                )
                .await?;
            }
        }
        Ok(Topics {
            template,
            consumed,
            direct_base,
        })
    }
}

/// What moves a latency run's events to Kafka: the relay or a poller, and the
/// writers' own producer for the direct baseline or the relay's shadow.
struct Publishing {
    relay: Option<Relay>,
    poll: Option<tokio::task::JoinHandle<Result<u64>>>,
    stop_poll: Arc<AtomicBool>,
    direct: Option<Arc<ThreadedProducer<AckTimes>>>,
    /// Every how many events the writers also produce directly, beside the relay.
    shadow_every: Option<u64>,
}

impl Publishing {
    fn start(
        cfg: &Cfg,
        name: &str,
        publisher: Publisher,
        url: &str,
        topics: &Topics,
        shadow_every: Option<u64>,
    ) -> Result<Publishing> {
        let mut relay = None;
        let mut poll = None;
        let mut direct = None;
        let stop_poll = Arc::new(AtomicBool::new(false));
        if matches!(publisher, Publisher::Direct) || shadow_every.is_some() {
            direct = Some(Arc::new(direct_producer(cfg, &topics.direct_base)?));
        }
        let topic = &topics.template;
        match publisher {
            Publisher::Direct => {}
            Publisher::Relay => {
                Relay::setup(cfg, url, topic)?;
                let r = Relay::start(cfg, url, topic, &format!("latency-{name}"))?;
                relay = Some(r);
            }
            Publisher::Poller(kind) => {
                poll = Some(tokio::spawn(poller(
                    url.to_string(),
                    cfg.a.brokers.clone(),
                    topic.clone(),
                    kind,
                    stop_poll.clone(),
                    false,
                )));
            }
        }
        Ok(Publishing {
            relay,
            poll,
            stop_poll,
            direct,
            shadow_every,
        })
    }

    /// After the writers: the direct producer's and the relay's commit → ack
    /// figures into `res`, and every publisher stopped.
    async fn finish(
        mut self,
        cfg: &Cfg,
        url: &str,
        commits: &HashMap<i64, i64>,
        cpu0: Option<f64>,
        res: &mut Value,
    ) -> Result<()> {
        if let Some(p) = self.direct.take() {
            direct_ack_figures(&p, commits, self.shadow_every, res)?;
        }
        if let Some(r) = self.relay.take() {
            // Acknowledgement as the relay saw it: its delivery reports against the
            // commit timestamp in the WAL.
            let text = r.metrics()?;
            res["commit_to_ack_ms"] = histogram_summary(&text, "outbox_commit_to_ack_seconds");
            let (cpu, rss) = r.resources(cfg.clk_tck);
            let cpu_run = cpu - cpu0.unwrap_or(0.0);
            r.stop().await?;
            res["relay_cpu_s"] = json!(cpu_run);
            res["relay_cpu_us_per_event"] = json!(cpu_run * 1e6 / commits.len() as f64);
            res["relay_peak_rss_mb"] = json!(rss);
            drop_slots(url).await?;
        }
        if let Some(h) = self.poll.take() {
            self.stop_poll.store(true, Ordering::Relaxed);
            h.await??;
        }
        Ok(())
    }
}

/// The writers' own producer, with the relay's settings, warmed up.
fn direct_producer(cfg: &Cfg, direct_base: &str) -> Result<ThreadedProducer<AckTimes>> {
    let p: ThreadedProducer<AckTimes> =
        producer_config(&cfg.a.brokers).create_with_context(AckTimes {
            acks: std::sync::Mutex::new(Vec::new()),
        })?;
    // Warm up (metadata, producer id) as the relay does before its first
    // event; the consumer ignores a record without a seq.
    p.send(
        BaseRecord::with_opaque_to(&format!("{direct_base}.w0"), usize::MAX)
            .key("warmup")
            .payload("{\"seq\": -1}"),
    )
    .map_err(|(e, _)| anyhow!("warm-up produce: {e}"))?;
    p.flush(Duration::from_secs(10))?;
    Ok(p)
}

/// Commit → delivery report of the directly produced events, into `res`.
fn direct_ack_figures(
    p: &ThreadedProducer<AckTimes>,
    commits: &HashMap<i64, i64>,
    shadow_every: Option<u64>,
    res: &mut Value,
) -> Result<()> {
    p.flush(Duration::from_secs(30))?;
    let acks = std::mem::take(&mut *p.context().acks.lock().unwrap());
    let to_ack: Vec<f64> = acks
        .iter()
        .filter_map(|(seq, at)| commits.get(seq).map(|c| (at - c) as f64 / 1000.0))
        .collect();
    if let Some(every) = shadow_every {
        res["shadow_direct_every"] = json!(every);
        res["shadow_direct_commit_to_ack_bucketed_ms"] = bucketed_summary(&to_ack);
        res["shadow_direct_commit_to_ack_ms"] = summary(to_ack);
    } else {
        res["commit_to_ack_bucketed_ms"] = bucketed_summary(&to_ack);
        res["commit_to_ack_ms"] = summary(to_ack);
    }
    Ok(())
}

/// Per received record with a known commit: commit → consumer (ms), commit →
/// record timestamp (ms), and the timestamp's type.
fn commit_to_consumer(
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

/// One writer connection of a latency run.
struct Writer {
    url: String,
    /// This writer's number, of `writers`: it writes every `writers`-th seq.
    w: i32,
    writers: i32,
    total: u64,
    rate: u64,
    per_writer: f64,
    start: tokio::time::Instant,
    direct: Option<Arc<ThreadedProducer<AckTimes>>>,
    direct_base: String,
    /// Produce directly every this many events (1: every event).
    every: u64,
    pad: String,
}

/// A writer's task: (seq, commit time in epoch µs) of every event it wrote.
type WriterTask = tokio::task::JoinHandle<Result<Vec<(i64, i64)>>>;

/// The writers, paced from a common start 100 ms from now; returns how many there
/// are, the start, and their tasks.
fn spawn_writers(
    name: &str,
    url: &str,
    rate: u64,
    secs: u64,
    publishing: &Publishing,
    topics: &Topics,
) -> (i32, tokio::time::Instant, Vec<WriterTask>) {
    let writers = if rate >= 1000 { 4 } else { 1 };
    let per_writer = rate as f64 / writers as f64;
    let total = rate * secs;
    log(format!("latency/{name}: {rate} events/s of one-event transactions for {secs} s ({writers} writers)"));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut hs = Vec::new();
    for w in 0..writers {
        hs.push(tokio::spawn(write_events(Writer {
            url: url.to_string(),
            w,
            writers,
            total,
            rate,
            per_writer,
            start,
            direct: publishing.direct.clone(),
            direct_base: topics.direct_base.clone(),
            every: publishing.shadow_every.unwrap_or(1),
            pad: "x".repeat(PAD),
        })));
    }
    (writers, start, hs)
}

async fn write_events(wr: Writer) -> Result<Vec<(i64, i64)>> {
    let c = connect(&wr.url).await?;
    let stmt = c
        .prepare(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ($3, $1, jsonb_build_object('seq', $2::bigint, 'pad', repeat('x', {PAD})))"
        ))
        .await?;
    let mut commits: Vec<(i64, i64)> = Vec::new();
    let mut i = 0u64;
    loop {
        let seq = (i * wr.writers as u64 + wr.w as u64) as i64;
        if seq as u64 >= wr.total {
            break;
        }
        tokio::time::sleep_until(wr.start + Duration::from_secs_f64(i as f64 / wr.per_writer))
            .await;
        let key = format!("agg-{}", seq % AGGREGATES);
        let etype = format!("w{}", seq as u64 / (wr.rate * LATENCY_WINDOW_S));
        // Autocommit: the statement is the one-event transaction; when execute()
        // returns, COMMIT has returned.
        c.execute(&stmt, &[&key, &seq, &etype]).await?;
        commits.push((seq, now_us()));
        if let Some(p) = wr
            .direct
            .as_ref()
            .filter(|_| (seq as u64).is_multiple_of(wr.every))
        {
            produce_direct(p, &wr, &etype, &key, seq).await?;
        }
        i += 1;
    }
    Ok(commits)
}

/// Event `seq` straight from its writer, right after its COMMIT returned.
async fn produce_direct(
    p: &ThreadedProducer<AckTimes>,
    wr: &Writer,
    etype: &str,
    key: &str,
    seq: i64,
) -> Result<()> {
    let topic = format!("{}.{etype}", wr.direct_base);
    let payload = format!("{{\"pad\": \"{}\", \"seq\": {seq}}}", wr.pad);
    // The relay's headers for this table (event id, event type):
    // the same records, so the broker has the same work to do.
    let id = format!("00000000-0000-4000-8000-{seq:012}");
    let headers = relay_headers(&id, etype);
    let mut rec = BaseRecord::with_opaque_to(&topic, seq as usize)
        .key(key)
        .payload(&payload)
        .headers(headers);
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((e, r))
                if e.rdkafka_error_code()
                    == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
            {
                rec = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => bail!("direct produce: {e}"),
        }
    }
}

pub(crate) async fn scenario_latency(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let mut out = json!({});
    out["direct"] = latency_run(
        cfg,
        "direct",
        Publisher::Direct,
        cfg.latency_rate,
        cfg.a.latency_secs,
    )
    .await?;
    out["relay"] = latency_run(
        cfg,
        "relay",
        Publisher::Relay,
        cfg.latency_rate,
        cfg.a.latency_secs,
    )
    .await?;
    // The tuned poller moves at most 500 rows per 100 ms: the relay's rate is within it.
    out["tuned_poller"] = latency_run(
        cfg,
        "tuned",
        Publisher::Poller(TUNED),
        cfg.latency_rate.min(2000),
        cfg.poll_secs,
    )
    .await?;
    // The classic poller moves at most 20 events/s: run it at half that.
    out["classic_poller"] = latency_run(
        cfg,
        "classic",
        Publisher::Poller(CLASSIC),
        10,
        cfg.poll_secs,
    )
    .await?;
    report["latency"] = out;
    Ok(())
}
