//! Sustained: writers inserting flat out while the relay keeps up, sampled every
//! 100 ms for lag in bytes and seconds, then the same writers with pg_recvlogical as
//! the only reader (the ceiling for any logical-decoding reader on the machine).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{AGGREGATES, PAD};
use crate::log;
use crate::report::stats::{metric_value, summary};
use crate::stack::kafka::{create_topic, hw_sum_with, topic_name, wait_records, watermark_client};
use crate::stack::pg::{
    confirmed, connect, current_wal, drop_slots, fresh_db, parse_lsn, pg_err, recvlogical,
};
use crate::stack::proc::proc_cpu_secs;
use crate::stack::relay::relay_setting;
use crate::stack::{Cfg, Relay};

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

/// How long ago (s) at sample `i` the WAL insert position was at `pos`, interpolated
/// between the (t, WAL position) samples up to `i`.
pub(crate) fn wal_age(samples: &[(f64, u64)], i: usize, pos: u64) -> f64 {
    let t = samples[i].0;
    if pos >= samples[i].1 {
        return 0.0;
    }
    match samples[..=i].iter().position(|s| s.1 >= pos) {
        None | Some(0) => t,
        Some(j) => {
            let ((ta, wa), (tb, wb)) = (samples[j - 1], samples[j]);
            let f = if wb > wa {
                pos.saturating_sub(wa) as f64 / (wb - wa) as f64
            } else {
                1.0
            };
            t - (ta + f * (tb - ta))
        }
    }
}

/// What the walsender of `slot` has sent (pg_stat_replication.sent_lsn) and the WAL
/// insert position, in one query.
const SENT_SQL: &str = "SELECT pg_current_wal_lsn()::text, coalesce((SELECT r.sent_lsn::text FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1 AND s.database = current_database()), '0/0')";

/// The sustained writers again, with `pg_recvlogical` as the only reader: how far
/// Postgres's own decoding falls behind the same writers on the same machine. Its lag
/// is the walsender's sent position against the WAL insert position (it confirms only
/// when it syncs its output, so its confirmed position says little).
async fn sustained_baseline(cfg: &Cfg, secs: u64) -> Result<Value> {
    let url = fresh_db(cfg, "bench_sustained_recv").await?;
    let c = connect(&url).await?;
    c.batch_execute("CREATE PUBLICATION outbox_pub FOR TABLE outbox")
        .await?;
    c.batch_execute("SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')")
        .await?;
    let mut child = recvlogical(cfg, &url)
        .args(["-f", "/dev/null", "-F", "1", "-s", "1", "--no-loop"])
        .spawn()
        .context("run pg_recvlogical")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = proc_cpu_secs(child.id(), cfg.clk_tck).unwrap_or(f64::NAN);
    let nw = cfg.a.sustained_writers;
    log(format!("sustained/pg_recvlogical: {nw} writers flat out for {secs} s, pg_recvlogical the only reader"));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let hs = flat_out_writers(&url, nw, &stop, &count);
    let t0 = Instant::now();
    let mut wal: Vec<(f64, u64)> = Vec::new();
    let mut sent: Vec<u64> = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        if let Some(st) = child.try_wait()? {
            bail!("pg_recvlogical exited during the run: {st}");
        }
        let row = c.query_one(SENT_SQL, &[&"bench_recvlogical"]).await?;
        wal.push((
            t0.elapsed().as_secs_f64(),
            parse_lsn(row.get::<_, &str>(0))?,
        ));
        sent.push(parse_lsn(row.get::<_, &str>(1))?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.await??;
    }
    let written = count.load(Ordering::Relaxed);
    let write_s = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_secs(child.id(), cfg.clk_tck).unwrap_or(f64::NAN) - cpu0;
    let _ = child.kill();
    let _ = child.wait();
    // The walsender outlives its client for a moment.
    let t = Instant::now();
    while let Err(e) = c
        .batch_execute("SELECT pg_drop_replication_slot('bench_recvlogical')")
        .await
    {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(pg_err(e));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lag: Vec<f64> = (0..wal.len())
        .filter(|&i| wal[i].0 >= 1.0)
        .map(|i| wal_age(&wal, i, sent[i]))
        .collect();
    let lag_b: Vec<f64> = (0..wal.len())
        .filter(|&i| wal[i].0 >= 1.0)
        .map(|i| wal[i].1.saturating_sub(sent[i]) as f64)
        .collect();
    let out = json!({
        "seconds": secs, "writers": nw, "written": written,
        "insert_rate": written as f64 / write_s,
        "sent_lag_s": summary(lag), "sent_lag_bytes": summary(lag_b),
        "cpu_us_per_event": cpu * 1e6 / written as f64,
    });
    log(format!(
        "sustained/pg_recvlogical: {written} events ({:.0}/s), sent lag {}",
        written as f64 / write_s,
        out["sent_lag_s"]
    ));
    Ok(out)
}

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

/// The report's "sustained" section.
fn figures(baseline: Value, run: RelayRun) -> Value {
    let RelayRun {
        secs,
        writers: nw,
        max_inflight,
        lag: LagSamples {
            samples,
            sent,
            inflight,
        },
        ksamples,
        written,
        write_s,
        caught_up,
        verified,
        cpu,
        rss,
    } = run;
    let (wal_t, series) = lag_series(&samples);
    let delivery = delivery_lag(&ksamples, &samples);
    let delivery_steady: Vec<f64> = delivery
        .iter()
        .filter(|x| x.0 >= 1.0)
        .map(|x| x.1)
        .collect();
    let per_sec = per_second(&series, secs);
    // Ignore the first second (writers connecting) for the "throughout" figures.
    let steady: Vec<f64> = series.iter().filter(|x| x.0 >= 1.0).map(|x| x.3).collect();
    let steady_b: Vec<f64> = series
        .iter()
        .filter(|x| x.0 >= 1.0)
        .map(|x| x.2 as f64)
        .collect();
    log(format!(
        "sustained: {written} events ({:.0}/s), lag max {:.2} s, caught up {:?} s after stop, verified {verified}",
        written as f64 / write_s,
        steady.iter().cloned().fold(0.0, f64::max),
        caught_up
    ));
    let sent_lag: Vec<f64> = (0..wal_t.len().min(sent.len()))
        .filter(|&i| wal_t[i].0 >= 1.0)
        .map(|i| wal_age(&wal_t, i, sent[i]))
        .collect();
    let at_limit = inflight
        .iter()
        .filter(|&&v| v >= 0.95 * max_inflight)
        .count();
    json!({
        "baseline_pg_recvlogical": baseline,
        "sent_lag_s": summary(sent_lag),
        "inflight": summary(inflight.clone()),
        "inflight_at_limit_fraction": at_limit as f64 / inflight.len().max(1) as f64,
        "max_inflight": max_inflight,
        "seconds": secs, "writers": nw, "written": written,
        "insert_rate": written as f64 / write_s,
        "lag_s": summary(steady), "lag_bytes": summary(steady_b),
        "delivery_lag_s": summary(delivery_steady),
        "delivery_samples": delivery.iter().map(|x| json!([x.0, x.1])).collect::<Vec<_>>(),
        "caught_up_after_stop_s": caught_up,
        "verified_in_kafka": verified,
        "relay_cpu_s": cpu,
        "relay_cpu_us_per_event": cpu * 1e6 / written as f64,
        "relay_peak_rss_mb": rss,
        "per_second": per_sec,
        "samples": series.iter().map(|x| json!([x.0, x.1, x.2, x.3])).collect::<Vec<_>>(),
    })
}

/// Per sample: (t s, events written, lag bytes, lag s).
type LagPoint = (f64, u64, u64, f64);

/// The WAL position over time, and the lag at each sample.
fn lag_series(samples: &[(f64, u64, u64, u64)]) -> (Vec<(f64, u64)>, Vec<LagPoint>) {
    // Lag in seconds at sample i: how long ago the WAL insert position was where the
    // confirmed position is now (linear between samples).
    let wal_t: Vec<(f64, u64)> = samples.iter().map(|s| (s.0, s.2)).collect();
    let series: Vec<LagPoint> = samples
        .iter()
        .enumerate()
        .map(|(i, &(t, n, wal, conf))| (t, n, wal.saturating_sub(conf), wal_age(&wal_t, i, conf)))
        .collect();
    (wal_t, series)
}

/// Delivery lag: how long ago the writers had committed as many events as Kafka holds.
fn delivery_lag(ksamples: &[(f64, i64)], samples: &[(f64, u64, u64, u64)]) -> Vec<(f64, f64)> {
    ksamples
        .iter()
        .map(|&(t, n)| {
            let n = n.max(0) as u64;
            let j = samples.iter().position(|s| s.1 >= n);
            let lag = match j {
                Some(0) => 0.0,
                None => samples.last().map(|l| t - l.0).unwrap_or(0.0),
                Some(j) => {
                    let (ta, na, _, _) = samples[j - 1];
                    let (tb, nb, _, _) = samples[j];
                    let f = if nb > na {
                        (n - na) as f64 / (nb - na) as f64
                    } else {
                        1.0
                    };
                    (t - (ta + f * (tb - ta))).max(0.0)
                }
            };
            (t, lag)
        })
        .collect()
}

/// Per second: max lag in that second and inserts in that second.
fn per_second(series: &[LagPoint], secs: u64) -> Vec<Value> {
    let mut per_sec: Vec<Value> = Vec::new();
    let mut prev_n = 0;
    for s in 0..secs {
        let in_sec: Vec<_> = series
            .iter()
            .filter(|x| x.0 >= s as f64 && x.0 < (s + 1) as f64)
            .collect();
        if in_sec.is_empty() {
            continue;
        }
        let last_n = in_sec.last().unwrap().1;
        per_sec.push(json!({
            "t": s + 1,
            "inserts_per_s": last_n - prev_n,
            "lag_bytes_max": in_sec.iter().map(|x| x.2).max().unwrap(),
            "lag_s_max": in_sec.iter().map(|x| x.3).fold(0.0, f64::max),
        }));
        prev_n = last_n;
    }
    per_sec
}
