//! Sustained: writers inserting flat out while the relay keeps up, sampled every
//! 100 ms for lag in bytes and seconds; first, the same writers with pg_recvlogical
//! as the only reader (baseline.rs), the ceiling for any logical-decoding reader on
//! the machine; then, unless left out, the same writers with Debezium as the
//! reader. This file runs and samples; summarising is figures.rs's, so the sampling
//! loop stays as light as it can.

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
use crate::stack::pg::{
    confirmed, connect, current_wal, drop_slots, fresh_db, parse_lsn, walsender_pid,
};
use crate::stack::proc::{broker_pids, CpuSplit};
use crate::stack::relay::relay_setting;
use crate::stack::{Cfg, Debezium, Relay};
use baseline::sustained_baseline;
use figures::figures;
#[cfg(test)]
pub(crate) use figures::wal_age;

pub(crate) async fn scenario_sustained(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let baseline = sustained_baseline(cfg, cfg.sustained_secs).await?;
    let run = reader_run(cfg, Kind::Relay).await?;
    let mut out = figures(baseline, run, "relay");
    if !cfg.a.no_debezium {
        let mut d = figures(
            Value::Null,
            reader_run(cfg, Kind::Debezium).await?,
            "debezium",
        );
        if let Some(m) = d.as_object_mut() {
            m.remove("baseline_pg_recvlogical");
            m.remove("samples");
        }
        out["debezium"] = d;
    }
    report["sustained"] = out;
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Relay,
    Debezium,
}

/// What reads the sustained writers' WAL: the relay, or Debezium in Kafka Connect.
enum Reader {
    Relay(Relay),
    Debezium(Debezium),
}

impl Reader {
    fn check_alive(&mut self) -> Result<()> {
        match self {
            Reader::Relay(r) => r.check_alive(),
            Reader::Debezium(d) => d.check_alive(),
        }
    }

    fn slot(&self) -> &'static str {
        match self {
            Reader::Relay(_) => "outbox_relay",
            Reader::Debezium(_) => DEBEZIUM_SLOT,
        }
    }

    /// The relay's in-flight events (Debezium exposes no such figure here).
    fn inflight(&self) -> Option<f64> {
        match self {
            Reader::Relay(r) => r
                .metrics()
                .ok()
                .map(|t| metric_value(&t, "outbox_inflight_events").unwrap_or(f64::NAN)),
            Reader::Debezium(_) => None,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Reader::Relay(r) => r.pid(),
            Reader::Debezium(d) => d.pid(),
        }
    }

    fn resources(&self, clk_tck: f64) -> (f64, f64) {
        match self {
            Reader::Relay(r) => r.resources(clk_tck),
            Reader::Debezium(d) => d.resources(clk_tck),
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            Reader::Relay(r) => r.stop().await,
            Reader::Debezium(d) => d.stop(),
        }
    }
}

const DEBEZIUM_SLOT: &str = "bench_debezium";

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
    /// Over the writers' run: the reader, its walsender and the broker.
    cpu_split: Value,
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

/// The relay (or Debezium) under the flat-out writers for the scenario's length, then
/// until it has caught up.
async fn reader_run(cfg: &Cfg, kind: Kind) -> Result<RelayRun> {
    let (db, name) = match kind {
        Kind::Relay => ("bench_sustained", "sustained"),
        Kind::Debezium => ("bench_sustained_debezium", "sustained.debezium"),
    };
    let url = fresh_db(cfg, db).await?;
    let topic = &topic_name(name);
    create_topic(&cfg.a.brokers, topic, cfg.a.partitions).await?;
    let mut relay = match kind {
        Kind::Relay => {
            Relay::setup(cfg, &url, topic)?;
            Reader::Relay(Relay::start(cfg, &url, topic, "sustained")?)
        }
        // A template without a placeholder: every event to the one topic.
        Kind::Debezium => Reader::Debezium(Debezium::up(
            &cfg.a,
            db,
            DEBEZIUM_SLOT,
            topic,
            "sustained",
            false,
        )?),
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.check_alive()?;
    let cpu0 = relay.resources(cfg.clk_tck).0;
    let c = connect(&url).await?;
    let secs = match kind {
        Kind::Relay => cfg.sustained_secs,
        Kind::Debezium => cfg.a.debezium_sustained_secs,
    };
    let mut split = CpuSplit::start(cfg.clk_tck);
    split.watch(
        if kind == Kind::Relay {
            "relay"
        } else {
            "debezium"
        },
        vec![relay.pid()],
    );
    split.watch("broker", broker_pids());
    if let Some(p) = walsender_pid(&c, relay.slot()).await? {
        split.watch("walsender", vec![p]);
    }
    let nw = cfg.a.sustained_writers;
    let who = if kind == Kind::Relay {
        "relay"
    } else {
        "Debezium"
    };
    log(format!(
        "sustained: {nw} writers inserting one-event transactions flat out for {secs} s, {who} reading"
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
    let cpu_split = split.finish();
    let written = count.load(Ordering::Relaxed);
    let write_s = t0.elapsed().as_secs_f64();
    let end = current_wal(&c).await?;
    let caught_up = wait_caught_up(&mut relay, &c, end, &cfg.a.brokers, topic, written).await?;
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
        cpu_split,
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
    relay: &mut Reader,
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
        let srow = c.query_one(SENT_SQL, &[&relay.slot()]).await?;
        sent.push(parse_lsn(srow.get::<_, &str>(1))?);
        if let Some(v) = relay.inflight() {
            inflight.push(v);
        }
        let row = c
            .query_one(
                "SELECT pg_current_wal_lsn()::text, coalesce(confirmed_flush_lsn::text,'0/0') FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                &[&relay.slot()],
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
/// reaches `end`), None if not within 300 s. Debezium confirms the last change it
/// processed, never the end of the WAL: it has caught up when Kafka holds every
/// event written.
async fn wait_caught_up(
    relay: &mut Reader,
    c: &Client,
    end: u64,
    brokers: &str,
    topic: &str,
    written: u64,
) -> Result<Option<f64>> {
    let tc = Instant::now();
    let mut caught_up = None;
    let wm = watermark_client(brokers)?;
    while tc.elapsed() < Duration::from_secs(300) {
        relay.check_alive()?;
        let done = match relay {
            Reader::Relay(_) => confirmed(c, relay.slot()).await? >= end,
            Reader::Debezium(_) => hw_sum_with(&wm, topic)? >= written as i64,
        };
        if done {
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
