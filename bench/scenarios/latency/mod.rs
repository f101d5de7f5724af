//! Latency: one-event transactions at a fixed rate, each publisher in a run of its
//! own, a consumer taking the time each record arrives. Commit and receive times
//! are read from the same clock in this process (now_us), so the writers and the
//! consumer must both stay in it.

mod consumer;
mod publishing;
mod writers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use super::committed::read_committed;
use super::pollers::{PollerKind, CLASSIC, TUNED};
use crate::log;
use crate::report::stats::{pct_curve, summary};
use crate::stack::kafka::{create_topic, hw_sum_async, topic_name};
use crate::stack::pg::fresh_db;
use crate::stack::relay::{has_exactly_once, Mode};
use crate::stack::Cfg;
use consumer::{commit_to_consumer, consume_until};
use publishing::Publishing;
use writers::spawn_writers;

/// Latency runs write to a new topic every this many seconds (see latency_run).
const LATENCY_WINDOW_S: u64 = 5;

enum Publisher {
    /// The relay, at-least-once or exactly-once.
    Relay(Mode),
    Poller(PollerKind),
    /// Debezium's connector and Outbox Event Router in Kafka Connect.
    Debezium,
    /// Baseline: the writer itself produces each event right after its COMMIT
    /// returned, with the relay's producer settings. What is left of the latency is
    /// the Kafka path (linger, broker append and ack, consumer fetch) alone.
    Direct,
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
        Some(cfg.a.shadow_direct).filter(|n| *n > 0 && matches!(publisher, Publisher::Relay(_)));
    let topics = Topics::create(cfg, name, secs, shadow_every.is_some()).await?;
    let exactly_once = matches!(&publisher, Publisher::Relay(m) if m.is_exactly_once());
    let mut publishing =
        Publishing::start(cfg, name, publisher, &db, &url, &topics, shadow_every).await?;
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
    publishing.check_alive()?;
    let cpu0 = publishing.cpu(cfg.clk_tck);

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
    if exactly_once {
        // The high watermarks count the transactions' commit markers too.
        let rc = read_committed(
            &cfg.a.brokers,
            &topics.consumed,
            cfg.a.partitions,
            Duration::from_secs(120),
        )
        .await?;
        verified = rc["distinct"].as_i64().unwrap_or(0);
        res["read_committed"] = rc;
    } else {
        for t in &topics.consumed {
            verified += hw_sum_async(&cfg.a.brokers, t).await?;
        }
        // Debezium's warm-up events are in the first window's topic.
        verified -= res["debezium_warm_up_events"].as_i64().unwrap_or(0);
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

pub(crate) async fn scenario_latency(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let (rate, secs) = (cfg.latency_rate, cfg.a.latency_secs);
    let at_least_once = || Publisher::Relay(Mode::default());
    let mut out = json!({});
    out["direct"] = latency_run(cfg, "direct", Publisher::Direct, rate, secs).await?;
    out["relay"] = latency_run(cfg, "relay", at_least_once(), rate, secs).await?;
    // The same run with --delivery exactly-once: records become visible at the
    // Kafka commit (the consumer reads read_committed), after their
    // acknowledgements, so only commit → consumer compares with the relay's.
    if has_exactly_once(cfg) {
        let progress = topic_name("latency.relay_exactly_once.progress");
        let exactly_once = Publisher::Relay(Mode::exactly_once(progress));
        out["relay_exactly_once"] =
            latency_run(cfg, "relay_exactly_once", exactly_once, rate, secs).await?;
    }
    if !cfg.a.no_debezium {
        out["debezium"] = latency_run(cfg, "debezium", Publisher::Debezium, rate, secs).await?;
    }
    // A lower rate for the relay and Debezium: on a small machine Debezium is
    // saturated at the main rate, where its latency is mostly queueing.
    let low = cfg.a.latency_low_rate;
    if low > 0 && low != rate {
        out["relay_low_rate"] = latency_run(cfg, "relay_low", at_least_once(), low, secs).await?;
        if !cfg.a.no_debezium {
            out["debezium_low_rate"] =
                latency_run(cfg, "debezium_low", Publisher::Debezium, low, secs).await?;
        }
    }
    // The tuned poller moves at most 500 rows per 100 ms: the relay's rate is within it.
    let tuned = Publisher::Poller(TUNED);
    out["tuned_poller"] = latency_run(cfg, "tuned", tuned, rate.min(2000), cfg.poll_secs).await?;
    // The classic poller moves at most 20 events/s: run it at half that.
    let classic = Publisher::Poller(CLASSIC);
    out["classic_poller"] = latency_run(cfg, "classic", classic, 10, cfg.poll_secs).await?;
    report["latency"] = out;
    Ok(())
}
