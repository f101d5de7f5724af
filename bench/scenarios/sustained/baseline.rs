//! The sustained baseline: the same flat-out writers with pg_recvlogical as the only
//! reader, in a database of its own, so that the relay's lag can be read against
//! what Postgres's own decoding manages on the same machine. It must not share the
//! relay run's database or slot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::figures::wal_age;
use super::{flat_out_writers, SENT_SQL};
use crate::log;
use crate::report::stats::summary;
use crate::stack::pg::{connect, fresh_db, parse_lsn, pg_err, recvlogical};
use crate::stack::proc::proc_cpu_secs;
use crate::stack::Cfg;

/// The sustained writers again, with `pg_recvlogical` as the only reader: how far
/// Postgres's own decoding falls behind the same writers on the same machine. Its lag
/// is the walsender's sent position against the WAL insert position (it confirms only
/// when it syncs its output, so its confirmed position says little).
pub(super) async fn sustained_baseline(cfg: &Cfg, secs: u64) -> Result<Value> {
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
