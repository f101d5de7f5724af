//! Polling publishers as commonly written (classic and tuned), time-boxed over the
//! drain scenario's backlog; the latency scenario runs them too. They are the
//! comparison the relay must beat, so they stay as plain as their real-world models.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use super::relay_headers;
use crate::log;
use crate::stack::kafka::{create_topic, producer_config, topic_name, wait_records};
use crate::stack::pg::{connect, db_url};
use crate::stack::Cfg;

#[derive(Clone, Copy)]
pub(crate) struct PollerKind {
    name: &'static str,
    interval: Duration,
    batch: i64,
    skip_locked: bool,
}

pub(crate) const CLASSIC: PollerKind = PollerKind {
    name: "classic",
    interval: Duration::from_secs(5),
    batch: 100,
    skip_locked: false,
};

pub(crate) const TUNED: PollerKind = PollerKind {
    name: "tuned",
    interval: Duration::from_millis(100),
    batch: 500,
    skip_locked: true,
};

/// A polling publisher as commonly written: every `interval`, in one transaction,
/// select up to `batch` unprocessed rows in id order, publish them, wait for every
/// acknowledgement, mark them processed, commit. Runs until `stop` or until the table
/// has nothing left when `until_empty`. Returns rows published.
pub(crate) async fn poller(
    url: String,
    brokers: String,
    topic: String,
    kind: PollerKind,
    stop: Arc<AtomicBool>,
    until_empty: bool,
) -> Result<u64> {
    let mut c = connect(&url).await?;
    let producer: FutureProducer = producer_config(&brokers).create()?;
    let sel = format!(
        "SELECT id, event_id::text, event_type, aggregate_id, payload::text FROM outbox \
         WHERE processed_at IS NULL ORDER BY id LIMIT $1{}",
        if kind.skip_locked {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        }
    );
    let mut published = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let tx = c.transaction().await?;
        let rows = tx.query(sel.as_str(), &[&kind.batch]).await?;
        if rows.is_empty() && until_empty {
            tx.commit().await?;
            break;
        }
        let mut futs = Vec::with_capacity(rows.len());
        let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.push(r.get(0));
            let event_id: String = r.get(1);
            let event_type: String = r.get(2);
            let key: String = r.get(3);
            let payload: String = r.get(4);
            let headers = relay_headers(&event_id, &event_type);
            let topic = topic.replace("{event_type}", &event_type);
            let rec = FutureRecord::to(&topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            match producer.send_result(rec) {
                Ok(f) => futs.push(f),
                Err((e, _)) => bail!("poller produce: {e}"),
            }
        }
        for f in futs {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("poller delivery: {e}"),
                Err(_) => bail!("poller delivery canceled"),
            }
        }
        if !ids.is_empty() {
            tx.execute(
                "UPDATE outbox SET processed_at = now() WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        }
        tx.commit().await?;
        published += ids.len() as u64;
        // Sleep in small steps so a stop is seen promptly.
        let wake = Instant::now() + kind.interval;
        while Instant::now() < wake && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep((wake - Instant::now()).min(Duration::from_millis(50))).await;
        }
    }
    Ok(published)
}

/// Throughput of both pollers, time-boxed, over the drain scenario's backlog (the same
/// rows the relay drained, unprocessed as far as a poller can tell).
pub(crate) async fn scenario_pollers(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let url = db_url(&cfg.a.database_url, "bench_drain");
    let c = connect(&url).await?;
    let backlog: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE processed_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    if backlog == 0 {
        bail!("pollers need the drain scenario's backlog");
    }
    let mut out = json!({});
    for kind in [CLASSIC, TUNED] {
        let topic = topic_name(&format!("poll.{}", kind.name));
        create_topic(&cfg.a.brokers, &topic, cfg.a.partitions).await?;
        log(format!(
            "pollers: {} poller ({} ms, {} rows) over the backlog for {} s",
            kind.name,
            kind.interval.as_millis(),
            kind.batch,
            cfg.poll_secs
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let h = tokio::spawn(poller(
            url.clone(),
            cfg.a.brokers.clone(),
            topic.clone(),
            kind,
            stop.clone(),
            true,
        ));
        while t0.elapsed() < Duration::from_secs(cfg.poll_secs) && !h.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let published = h.await??;
        let secs = t0.elapsed().as_secs_f64();
        let verified = wait_records(
            &cfg.a.brokers,
            &topic,
            published as i64,
            Duration::from_secs(10),
        )
        .await?;
        log(format!(
            "pollers: {} published {published} in {secs:.1} s ({:.0}/s)",
            kind.name,
            published as f64 / secs
        ));
        out[kind.name] = json!({
            "interval_ms": kind.interval.as_millis() as u64, "batch": kind.batch,
            "skip_locked": kind.skip_locked, "seconds": secs, "published": published,
            "events_per_s": published as f64 / secs, "verified_in_kafka": verified,
        });
    }
    report["pollers"] = out;
    Ok(())
}
