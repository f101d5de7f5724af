//! What moves a latency run's events to Kafka (the relay, a poller, or the writers'
//! own producer) and the commit → acknowledgement figures the publishers report
//! themselves. Starts and stops publishers only; pacing the writers is writers.rs's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde_json::{json, Value};

use super::{Publisher, Topics};
use crate::log;
use crate::now_us;
use crate::report::stats::{bucketed_summary, histogram_summary, summary};
use crate::scenarios::committed::exactly_once_figures;
use crate::scenarios::pollers::poller;
use crate::stack::kafka::hw_sum_async;
use crate::stack::kafka::producer_config;
use crate::stack::pg::connect;
use crate::stack::pg::drop_slots;
use crate::stack::{Cfg, Debezium, Relay};

/// Events Debezium publishes before the clock starts, so that the JVM's JIT has
/// compiled its hot path, as in a Connect worker that has been running for a while.
const DEBEZIUM_WARM_UP: i64 = 5000;

/// Delivery report times of the direct-produce baseline: (seq, µs since the epoch).
pub(super) struct AckTimes {
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

/// What moves a latency run's events to Kafka: the relay or a poller, and the
/// writers' own producer for the direct baseline or the relay's shadow.
pub(super) struct Publishing {
    pub(super) relay: Option<Relay>,
    debezium: Option<Debezium>,
    poll: Option<tokio::task::JoinHandle<Result<u64>>>,
    stop_poll: Arc<AtomicBool>,
    pub(super) direct: Option<Arc<ThreadedProducer<AckTimes>>>,
    /// Every how many events the writers also produce directly, beside the relay.
    pub(super) shadow_every: Option<u64>,
    /// The relay runs with --delivery exactly-once.
    exactly_once: bool,
}

impl Publishing {
    pub(super) async fn start(
        cfg: &Cfg,
        name: &str,
        publisher: Publisher,
        database: &str,
        url: &str,
        topics: &Topics,
        shadow_every: Option<u64>,
    ) -> Result<Publishing> {
        let mut relay = None;
        let mut debezium = None;
        let mut poll = None;
        let mut direct = None;
        let stop_poll = Arc::new(AtomicBool::new(false));
        if matches!(publisher, Publisher::Direct) || shadow_every.is_some() {
            direct = Some(Arc::new(direct_producer(cfg, &topics.direct_base)?));
        }
        let topic = &topics.template;
        let mut exactly_once = false;
        match publisher {
            Publisher::Direct => {}
            Publisher::Relay(mode) => {
                Relay::setup_as(cfg, url, topic, &mode)?;
                let r = Relay::start_as(cfg, url, topic, &format!("latency-{name}"), &mode)?;
                exactly_once = mode.is_exactly_once();
                relay = Some(r);
            }
            Publisher::Debezium => {
                let d = Debezium::up(
                    &cfg.a,
                    database,
                    "bench_debezium",
                    topic,
                    &format!("latency-{name}"),
                    false,
                )?;
                warm_up_debezium(cfg, url, &topics.consumed[0], &d).await?;
                debezium = Some(d);
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
            debezium,
            poll,
            stop_poll,
            direct,
            shadow_every,
            exactly_once,
        })
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        if let Some(r) = self.relay.as_mut() {
            r.check_alive()?;
        }
        if let Some(d) = &self.debezium {
            d.check_alive()?;
        }
        Ok(())
    }

    /// CPU seconds so far of the publisher that is a process of its own.
    pub(super) fn cpu(&self, clk_tck: f64) -> Option<f64> {
        self.relay
            .as_ref()
            .map(|r| r.resources(clk_tck).0)
            .or_else(|| self.debezium.as_ref().map(|d| d.resources(clk_tck).0))
    }

    /// After the writers: the direct producer's and the relay's commit → ack
    /// figures into `res`, and every publisher stopped.
    pub(super) async fn finish(
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
            let text = r.metrics()?;
            if self.exactly_once {
                // Acknowledgements come before the Kafka commit that makes the
                // records visible: commit → consumer is the figure, and the
                // relay's transactions are reported instead.
                res["delivery"] = json!("exactly-once");
                exactly_once_figures(&text, commits.len() as u64, res);
            } else {
                // Acknowledgement as the relay saw it: its delivery reports against
                // the commit timestamp in the WAL.
                res["commit_to_ack_ms"] = histogram_summary(&text, "outbox_commit_to_ack_seconds");
            }
            let (cpu, rss) = r.resources(cfg.clk_tck);
            let cpu_run = cpu - cpu0.unwrap_or(0.0);
            r.stop().await?;
            res["relay_cpu_s"] = json!(cpu_run);
            res["relay_cpu_us_per_event"] = json!(cpu_run * 1e6 / commits.len() as f64);
            res["relay_peak_rss_mb"] = json!(rss);
            drop_slots(url).await?;
        }
        if let Some(d) = self.debezium.take() {
            let (cpu, rss) = d.resources(cfg.clk_tck);
            let cpu_run = cpu - cpu0.unwrap_or(0.0);
            d.stop()?;
            res["debezium_cpu_s"] = json!(cpu_run);
            res["debezium_cpu_us_per_event"] = json!(cpu_run * 1e6 / commits.len() as f64);
            res["debezium_peak_rss_mb"] = json!(rss);
            res["debezium_warm_up_events"] = json!(DEBEZIUM_WARM_UP);
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

/// `DEBEZIUM_WARM_UP` events (seq -1, which the consumer skips) through Debezium,
/// waited for in Kafka.
async fn warm_up_debezium(cfg: &Cfg, url: &str, topic: &str, d: &Debezium) -> Result<()> {
    let c = connect(url).await?;
    let w = topic.rsplit('.').next().unwrap_or("w0");
    for _ in 0..DEBEZIUM_WARM_UP / 100 {
        c.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload) \
             SELECT $1, 'warm-up-' || g, '{\"seq\": -1}' FROM generate_series(1, 100) g",
            &[&w],
        )
        .await?;
    }
    let t = std::time::Instant::now();
    while hw_sum_async(&cfg.a.brokers, topic).await? < DEBEZIUM_WARM_UP {
        d.check_alive()?;
        if t.elapsed() > Duration::from_secs(120) {
            return Err(anyhow!(
                "Debezium did not publish its {DEBEZIUM_WARM_UP} warm-up events within 120 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log(format!(
        "latency: Debezium warmed up with {DEBEZIUM_WARM_UP} events in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}
