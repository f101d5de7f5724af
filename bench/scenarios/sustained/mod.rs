//! Sustained: writers inserting flat out while the relay keeps up, sampled every
//! 100 ms for lag in bytes and seconds; first, the same writers with pg_recvlogical
//! as the only reader (baseline.rs), the ceiling for any logical-decoding reader on
//! the machine. This file runs and samples; summarising is figures.rs's, so the
//! sampling loop stays as light as it can.

mod baseline;
mod figures;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;
use tokio_postgres::Client;

use super::{AGGREGATES, PAD};
use crate::log;
use crate::report::stats::metric_value;
use crate::stack::kafka::{create_topic, hw_sum_with, topic_name, wait_records, watermark_client};
use crate::stack::pg::{confirmed, connect, current_wal, drop_slots, fresh_db, parse_lsn};
use crate::stack::relay::relay_setting;
use crate::stack::{Cfg, Relay};
use baseline::sustained_baseline;
use figures::figures;
#[cfg(test)]
pub(crate) use figures::wal_age;

pub(crate) async fn scenario_sustained(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let baseline = sustained_baseline(cfg, cfg.sustained_secs).await?;
    let run = relay_run(cfg).await?;
    report["sustained"] = figures(baseline, run);
    Ok(())
}

/// What the relay's sustained run measured, before any summary.
struct RelayRun {
    secs: u64,
    writers: usize,
    max_inflight: f64,
    lag: LagSamples,
    /// Every 500 ms: (t s, records in Kafka).
    ksamples: Vec<(f64, i64)>,
    written: u64,
    write_s: f64,
    caught_up: Option<f64>,
    verified: i64,
    /// The relay's CPU seconds from the writers' start to its stop.
    cpu: f64,
    rss: f64,
}

/// The 100 ms samples of a sustained run.
struct LagSamples {
    /// (t s, events written, wal lsn, confirmed lsn).
    samples: Vec<(f64, u64, u64, u64)>,
    /// The relay's walsender's sent position and the relay's in-flight events, to tell
    /// a relay that does not read (window full: the broker is the limit) from a
    /// walsender that does not send (decoding is the limit).
    sent: Vec<u64>,
    inflight: Vec<f64>,
}

/// The relay under the flat-out writers for the scenario's length, then until it
/// has caught up.
async fn relay_run(cfg: &Cfg) -> Result<RelayRun> {
    let url = fresh_db(cfg, "bench_sustained").await?;
    let topic = &topic_name("sustained");
    create_topic(&cfg.a.brokers, topic, cfg.a.partitions).await?;
    Relay::setup(cfg, &url, topic)?;
    let mut relay = Relay::start(cfg, &url, topic, "sustained")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.check_alive()?;
    let cpu0 = relay.resources(cfg.clk_tck).0;
    let c = connect(&url).await?;
    let secs = cfg.sustained_secs;
    let nw = cfg.a.sustained_writers;
    log(format!(
        "sustained: {nw} writers inserting one-event transactions flat out for {secs} s"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let hs = flat_out_writers(&url, nw, &stop, &count);
    // Sample every 100 ms: (t s, events written, wal lsn, confirmed lsn).
    let t0 = Instant::now();
    // And every 500 ms the records in Kafka, to tell delivery lag from confirmation lag.
    let kstop = Arc::new(AtomicBool::new(false));
    let ksampler = kafka_sampler(&cfg.a.brokers, topic, t0, &kstop);
    let max_inflight = relay_setting(&cfg.a.relay_arg, "--max-inflight").unwrap_or(5000.0);
    let lag = sample_lag(&mut relay, &c, &count, t0, secs).await?;
    stop.store(true, Ordering::Relaxed);
    kstop.store(true, Ordering::Relaxed);
    for h in hs {
        h.await??;
    }
    let ksamples = ksampler.await??;
    let written = count.load(Ordering::Relaxed);
    let write_s = t0.elapsed().as_secs_f64();
    let end = current_wal(&c).await?;
    let caught_up = wait_caught_up(&mut relay, &c, end).await?;
    let (cpu, rss) = relay.resources(cfg.clk_tck);
    relay.stop().await?;
    let verified = wait_records(
        &cfg.a.brokers,
        topic,
        written as i64,
        Duration::from_secs(30),
    )
    .await?;
    drop_slots(&url).await?;
    Ok(RelayRun {
        secs,
        writers: nw,
        max_inflight,
        lag,
        ksamples,
        written,
        write_s,
        caught_up,
        verified,
        cpu: cpu - cpu0,
        rss,
    })
}

/// Every 500 ms until `stop`: (t s since `t0`, records in `topic`).
fn kafka_sampler(
    brokers: &str,
    topic: &str,
    t0: Instant,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<Vec<(f64, i64)>>> {
    let (b, t, stop) = (brokers.to_string(), topic.to_string(), stop.clone());
    tokio::task::spawn_blocking(move || -> Result<Vec<(f64, i64)>> {
        let c = watermark_client(&b)?;
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let n = hw_sum_with(&c, &t)?;
            out.push((t0.elapsed().as_secs_f64(), n));
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(out)
    })
}

/// Every 100 ms for `secs` from `t0`: the relay's slot and walsender against the WAL.
async fn sample_lag(
    relay: &mut Relay,
    c: &Client,
    count: &AtomicU64,
    t0: Instant,
    secs: u64,
) -> Result<LagSamples> {
    let mut samples: Vec<(f64, u64, u64, u64)> = Vec::new();
    let mut sent: Vec<u64> = Vec::new();
    let mut inflight: Vec<f64> = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        relay.check_alive()?;
        let srow = c.query_one(SENT_SQL, &[&"outbox_relay"]).await?;
        sent.push(parse_lsn(srow.get::<_, &str>(1))?);
        if let Ok(text) = relay.metrics() {
            inflight.push(metric_value(&text, "outbox_inflight_events").unwrap_or(f64::NAN));
        }
        let row = c
            .query_one(
                "SELECT pg_current_wal_lsn()::text, coalesce(confirmed_flush_lsn::text,'0/0') FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND database = current_database()",
                &[],
            )
            .await?;
        let wal = parse_lsn(row.get::<_, &str>(0))?;
        let conf = parse_lsn(row.get::<_, &str>(1))?;
        samples.push((
            t0.elapsed().as_secs_f64(),
            count.load(Ordering::Relaxed),
            wal,
            conf,
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(LagSamples {
        samples,
        sent,
        inflight,
    })
}

/// Catch-up after the writers stopped: seconds until everything up to `end` is
/// confirmed (the relay confirms the server's sent position once idle, so this
/// reaches `end`), None if not within 300 s.
async fn wait_caught_up(relay: &mut Relay, c: &Client, end: u64) -> Result<Option<f64>> {
    let tc = Instant::now();
    let mut caught_up = None;
    while tc.elapsed() < Duration::from_secs(300) {
        relay.check_alive()?;
        if confirmed(c, "outbox_relay").await? >= end {
            caught_up = Some(tc.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(caught_up)
}

/// `nw` connections inserting one-event transactions as fast as they can until `stop`.
fn flat_out_writers(
    url: &str,
    nw: usize,
    stop: &Arc<AtomicBool>,
    count: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Result<()>>> {
    (0..nw)
        .map(|w| {
            let (url, stop, count) = (url.to_string(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let c = connect(&url).await?;
                let stmt = c
                    .prepare(&format!(
                        "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('bench', $1, jsonb_build_object('seq', $2::bigint, 'pad', repeat('x', {PAD})))"
                    ))
                    .await?;
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let seq = i * nw as i64 + w as i64;
                    let key = format!("agg-{}", seq % AGGREGATES);
                    c.execute(&stmt, &[&key, &seq]).await?;
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                anyhow::Ok(())
            })
        })
        .collect()
}

/// What the walsender of `slot` has sent (pg_stat_replication.sent_lsn) and the WAL
/// insert position, in one query.
const SENT_SQL: &str = "SELECT pg_current_wal_lsn()::text, coalesce((SELECT r.sent_lsn::text FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1 AND s.database = current_database()), '0/0')";
