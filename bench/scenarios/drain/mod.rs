//! Backlog drain: a backlog written with the relay stopped, then read by
//! pg_recvlogical (Postgres's decode rate), the relay (at-least-once, then
//! exactly-once, each on a slot of its own created before the backlog, so all three
//! read the same WAL), and a plain producer (the broker's intake). Must leave its
//! database and its unprocessed rows behind: the pollers scenario drains the same
//! backlog. Debezium (debezium.rs) drains it too, from a slot it created before the
//! backlog.

mod debezium;

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::committed::{exactly_once_figures, read_committed};
use super::{relay_headers, AGGREGATES, PAD};
use crate::log;
use crate::stack::kafka::{create_topic, hw_sum_async, producer_config, topic_name, wait_records};
use crate::stack::pg::{
    confirmed, connect, current_wal, drop_slots, fmt_lsn, fresh_db, recvlogical, walsender_pid,
};
use crate::stack::proc::proc_cpu_secs;
use crate::stack::proc::{broker_pids, proc_exited, CpuSplit};
use crate::stack::relay::{has_exactly_once, Mode};
use crate::stack::{Cfg, Relay};

pub(crate) fn backlog_sql() -> String {
    format!(
        "INSERT INTO outbox (event_type, aggregate_id, payload) \
         SELECT 'bench', 'agg-' || (g % {AGGREGATES}), jsonb_build_object('seq', g, 'pad', repeat('x', {PAD})) \
         FROM generate_series($1::bigint, $2::bigint) g"
    )
}

/// Writes `n` events in 100-event transactions; returns (seconds, LSN inside the last
/// transaction after its inserts, i.e. just before its commit record).
async fn write_backlog(url: &str, n: u64) -> Result<(f64, u64)> {
    let c = connect(url).await?;
    let stmt = c.prepare(&backlog_sql()).await?;
    let t0 = Instant::now();
    let txns = n.div_ceil(100);
    let mut last_lsn = 0;
    for t in 0..txns {
        let lo = (t * 100) as i64;
        let hi = ((t * 100 + 100).min(n) - 1) as i64;
        if t + 1 < txns {
            c.execute(&stmt, &[&lo, &hi]).await?;
        } else {
            c.batch_execute("BEGIN").await?;
            c.execute(&stmt, &[&lo, &hi]).await?;
            last_lsn = current_wal(&c).await?;
            c.batch_execute("COMMIT").await?;
        }
    }
    Ok((t0.elapsed().as_secs_f64(), last_lsn))
}

pub(crate) async fn scenario_drain(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let n = cfg.events;
    let url = fresh_db(cfg, "bench_drain").await?;
    let c = connect(&url).await?;
    let topic = &topic_name("drain");
    create_topic(&cfg.a.brokers, topic, cfg.a.partitions).await?;
    // Debezium creates its slot when it first starts: started and stopped here, before
    // every other slot, so that it reads the same WAL.
    let dbz = if cfg.a.no_debezium {
        None
    } else {
        Some(debezium::Prepared::before_backlog(cfg, &c, "bench_drain").await?)
    };
    Relay::setup(cfg, &url, topic)?;
    // The exactly-once relay: its own slot (created here, before the backlog, as the
    // at-least-once relay's is), its own topic, and a progress topic of this run's
    // own, which the relay creates.
    let eos_topic = &topic_name("drain.exactly_once");
    let eos = Mode::exactly_once(topic_name("drain.progress"));
    if has_exactly_once(cfg) {
        create_topic(&cfg.a.brokers, eos_topic, cfg.a.partitions).await?;
        Relay::setup_as(cfg, &url, eos_topic, &eos)?;
    }
    c.batch_execute("SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')")
        .await?;
    let backlog = Backlog::write(&c, &url, n).await?;

    // Baseline 1: Postgres's own decode rate.
    let recv = recvlogical_drain(cfg, &url, &c, n, backlog.end_lsn).await?;

    // The relay, at-least-once (the default), then exactly-once over the same WAL.
    let relay = relay_drain(cfg, &url, &c, topic, n, backlog.end_lsn, &Mode::default()).await?;
    let relay_eos = if has_exactly_once(cfg) {
        relay_drain(cfg, &url, &c, eos_topic, n, backlog.end_lsn, &eos).await?
    } else {
        Value::Null
    };
    let debezium = match dbz {
        Some(p) => p.drain(cfg, &c, n, backlog.end_lsn).await?,
        None => Value::Null,
    };

    // Baseline 2: the broker's intake, same number of records, same size, same producer settings.
    log("drain: plain rdkafka producer, same records");
    let intake = broker_intake(cfg, n).await?;
    log(format!(
        "drain: broker intake {:.0} records/s",
        intake["events_per_s"].as_f64().unwrap_or(0.0)
    ));

    drop_slots(&url).await?;
    report["drain"] = json!({
        "events": n,
        "payload_bytes": backlog.payload_bytes,
        "wal_bytes": backlog.wal_bytes,
        "write": {"seconds": backlog.write_s, "events_per_s": n as f64 / backlog.write_s},
        "end_lsn": fmt_lsn(backlog.end_lsn),
        "pg_recvlogical": recv,
        "relay": relay,
        "debezium": debezium,
        "relay_exactly_once": relay_eos,
        "broker_intake": intake,
    });
    Ok(())
}

/// The backlog as written, with the relay stopped.
struct Backlog {
    write_s: f64,
    /// Inside the last transaction, just before its commit record.
    end_lsn: u64,
    wal_bytes: u64,
    payload_bytes: f64,
}

impl Backlog {
    async fn write(c: &Client, url: &str, n: u64) -> Result<Backlog> {
        log(format!(
            "drain: writing a backlog of {n} events (100-event transactions) with the relay stopped"
        ));
        let wal0 = current_wal(c).await?;
        let (write_s, end_lsn) = write_backlog(url, n).await?;
        let wal1 = current_wal(c).await?;
        let payload_bytes: f64 = c
            .query_one("SELECT avg(octet_length(payload::text))::float8 FROM (SELECT payload FROM outbox LIMIT 1000) s", &[])
            .await?
            .get(0);
        log(format!(
            "drain: wrote {n} events in {write_s:.1} s ({:.0}/s), {:.1} MB of WAL, payload {payload_bytes:.0} B; last commit after {}",
            n as f64 / write_s,
            (wal1 - wal0) as f64 / 1e6,
            fmt_lsn(end_lsn)
        ));
        Ok(Backlog {
            write_s,
            end_lsn,
            wal_bytes: wal1 - wal0,
            payload_bytes,
        })
    }
}

/// pg_recvlogical over the backlog up to `end_lsn`: seconds, events/s and the CPU
/// split between it and its walsender.
async fn recvlogical_drain(
    cfg: &Cfg,
    url: &str,
    c: &Client,
    n: u64,
    end_lsn: u64,
) -> Result<Value> {
    log("drain: pg_recvlogical over the same backlog (its own slot, created before the backlog)");
    let t0 = Instant::now();
    let mut split = CpuSplit::start(cfg.clk_tck);
    let mut child = recvlogical(cfg, url)
        .args([
            "-E",
            &fmt_lsn(end_lsn),
            "-f",
            "/dev/null",
            "-F",
            "0",
            "--no-loop",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("run pg_recvlogical")?;
    split.watch("pg_recvlogical", vec![child.id()]);
    let (st, cpu) = loop {
        if !split.watching("walsender") {
            if let Some(p) = walsender_pid(c, "bench_recvlogical").await? {
                split.watch("walsender", vec![p]);
            }
        }
        if proc_exited(child.id()) {
            let cpu = split.finish();
            break (child.wait()?, cpu);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let recv_s = t0.elapsed().as_secs_f64();
    if !st.success() {
        bail!("pg_recvlogical failed: {st}");
    }
    let recv_rate = n as f64 / recv_s;
    log(format!(
        "drain: pg_recvlogical {recv_s:.2} s, {recv_rate:.0} events/s; cpu {cpu}"
    ));
    Ok(json!({"seconds": recv_s, "events_per_s": recv_rate, "cpu_split": cpu}))
}

/// The relay over the backlog until its slot confirms `end_lsn`; the report's
/// "relay" figures, or "relay_exactly_once"'s with `--delivery exactly-once`.
async fn relay_drain(
    cfg: &Cfg,
    url: &str,
    c: &Client,
    topic: &str,
    n: u64,
    end_lsn: u64,
    mode: &Mode,
) -> Result<Value> {
    let (what, name) = if mode.is_exactly_once() {
        ("relay (exactly-once)", "drain-exactly-once")
    } else {
        ("relay", "drain")
    };
    log(format!("drain: starting the {what} over the backlog"));
    let t0 = Instant::now();
    let mut relay = Relay::start_as(cfg, url, topic, name, mode)?;
    let mut split = CpuSplit::start(cfg.clk_tck);
    split.watch("relay", vec![relay.pid()]);
    split.watch("broker", broker_pids());
    let mut last_progress = Instant::now();
    loop {
        relay.check_alive()?;
        if !split.watching("walsender") {
            if let Some(p) = walsender_pid(c, mode.slot()).await? {
                split.watch("walsender", vec![p]);
            }
        }
        if confirmed(c, mode.slot()).await? >= end_lsn {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            log(format!(
                "drain: {:.0} s, {} offsets in Kafka so far",
                t0.elapsed().as_secs_f64(),
                hw_sum_async(&cfg.a.brokers, topic).await.unwrap_or(-1)
            ));
            last_progress = Instant::now();
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("the {what} did not drain the backlog within 30 min");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay_s = t0.elapsed().as_secs_f64();
    let cpu_split = split.finish();
    let (cpu, rss) = relay.resources(cfg.clk_tck);
    let metrics = if mode.is_exactly_once() {
        relay.metrics().ok()
    } else {
        None
    };
    relay.stop().await?;
    let relay_rate = n as f64 / relay_s;
    let mut out = json!({
        "seconds": relay_s, "events_per_s": relay_rate,
        "cpu_s": cpu, "cpu_us_per_event": cpu * 1e6 / n as f64, "peak_rss_mb": rss,
        "cpu_split": cpu_split,
    });
    let verified = if mode.is_exactly_once() {
        // A transactional producer's topic: the high watermarks also count the
        // commit markers, so count what a read_committed consumer reads.
        let rc = read_committed(
            &cfg.a.brokers,
            &[topic.to_string()],
            cfg.a.partitions,
            Duration::from_secs(300),
        )
        .await?;
        out["delivery"] = json!("exactly-once");
        out["progress_topic"] = json!(mode.progress_topic);
        out["read_committed"] = rc.clone();
        exactly_once_figures(metrics.as_deref().unwrap_or(""), n, &mut out);
        rc["distinct"].as_i64().unwrap_or(0)
    } else {
        wait_records(&cfg.a.brokers, topic, n as i64, Duration::from_secs(30)).await?
    };
    out["verified_in_kafka"] = json!(verified);
    log(format!(
        "drain: {what} {relay_s:.2} s, {relay_rate:.0} events/s, {verified} events in Kafka{}, cpu {cpu:.2} s, peak RSS {rss:.1} MB",
        out.get("read_committed")
            .map(|r| format!(" (read_committed: {} records, {} duplicates; {} Kafka transactions)", r["records"], r["duplicates"], out["kafka_transactions_committed"]))
            .unwrap_or_default()
    ));
    Ok(out)
}

struct CountCtx {
    ok: AtomicU64,
    err: AtomicU64,
}

impl ClientContext for CountCtx {}
impl ProducerContext for CountCtx {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.err.fetch_add(1, Ordering::Relaxed),
        };
    }
}

async fn broker_intake(cfg: &Cfg, n: u64) -> Result<Value> {
    let topic_s = topic_name("intake");
    create_topic(&cfg.a.brokers, &topic_s, cfg.a.partitions).await?;
    let brokers = cfg.a.brokers.clone();
    let topic_b = topic_s.clone();
    let clk = cfg.clk_tck;
    let r = tokio::task::spawn_blocking(move || -> Result<Value> {
        let p: ThreadedProducer<CountCtx> =
            producer_config(&brokers).create_with_context(CountCtx {
                ok: AtomicU64::new(0),
                err: AtomicU64::new(0),
            })?;
        let payload = format!("{{\"pad\": \"{}\", \"seq\": 1234567}}", "x".repeat(PAD));
        let cpu0 = proc_cpu_secs(std::process::id(), clk).unwrap_or(0.0);
        let t0 = Instant::now();
        for i in 0..n {
            let key = format!("agg-{}", i as i64 % AGGREGATES);
            let id = format!("00000000-0000-4000-8000-{i:012}");
            let headers = relay_headers(&id, "bench");
            let mut rec = BaseRecord::to(&topic_b)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        r,
                    )) => {
                        rec = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => bail!("produce: {e}"),
                }
            }
        }
        p.flush(Duration::from_secs(120))?;
        let secs = t0.elapsed().as_secs_f64();
        let cpu = proc_cpu_secs(std::process::id(), clk).unwrap_or(0.0) - cpu0;
        let ok = p.context().ok.load(Ordering::Relaxed);
        let err = p.context().err.load(Ordering::Relaxed);
        Ok(
            json!({"seconds": secs, "events_per_s": n as f64 / secs, "acked": ok, "failed": err,
                  "bench_process_cpu_s": cpu}),
        )
    })
    .await??;
    let verified =
        wait_records(&cfg.a.brokers, &topic_s, n as i64, Duration::from_secs(10)).await?;
    let mut r = r;
    r["verified_in_kafka"] = json!(verified);
    Ok(r)
}
