//! Debezium over the drain's backlog. Debezium creates its slot when it first starts
//! and, with `snapshot.mode=no_data` and no stored offset, begins at the WAL position
//! of that start. So it is started once before the backlog, on a warm-up row, until
//! Connect has stored an offset, and stopped: the next start resumes from that offset
//! and reads the backlog from the same WAL as the relay's and pg_recvlogical's slots.
//! The warm-up row is written before those slots exist and marked processed, so no
//! other reader or poller sees it.
//!
//! Its rate is taken over the stream alone, from the first backlog record in Kafka to
//! the last (the JVM's start-up is reported apart): generous to Debezium, since the
//! relay's figure includes its own start.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::log;
use crate::stack::kafka::{create_topic, hw_sum_with, topic_name, watermark_client};
use crate::stack::pg::{confirmed, current_wal, walsender_pid};
use crate::stack::proc::{broker_pids, proc_cpu_secs, CpuSplit};
use crate::stack::{Cfg, Debezium};

pub(super) const SLOT: &str = "bench_debezium";
/// Connect's directory (its offsets file, log and pid) for both starts.
const NAME: &str = "drain";

/// Debezium's slot and stored offset, made before the backlog.
pub(super) struct Prepared {
    database: String,
    template: String,
    topic: String,
}

impl Prepared {
    pub(super) async fn before_backlog(cfg: &Cfg, c: &Client, database: &str) -> Result<Prepared> {
        let base = topic_name("drain.debezium");
        let template = format!("{base}.{{event_type}}");
        // Every drain event's event_type is 'bench'.
        let topic = format!("{base}.bench");
        create_topic(&cfg.a.brokers, &topic, cfg.a.partitions).await?;
        log("drain: starting Debezium once before the backlog, for its slot and a stored offset");
        let d = Debezium::up(&cfg.a, database, SLOT, &template, NAME, false)?;
        c.batch_execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload, processed_at) \
             VALUES ('bench', 'warm-up', '{\"seq\": -1}', now())",
        )
        .await?;
        let lsn = current_wal(c).await?;
        let offsets = cfg
            .a
            .log_dir
            .join(format!("bench-debezium-{NAME}"))
            .join("offsets");
        let t = Instant::now();
        let wm = watermark_client(&cfg.a.brokers)?;
        loop {
            d.check_alive()?;
            let stored = std::fs::metadata(&offsets)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
            if hw_sum_with(&wm, &topic)? >= 1 && stored {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("Debezium did not publish the warm-up row and store its offset within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d.stop()?;
        // Its next start resumes from the stored offset, whatever its slot says;
        // the slot may lag by a status interval, which is only reported.
        let conf = confirmed(c, SLOT).await?;
        log(format!(
            "drain: Debezium's warm-up done (offset stored; slot at {conf:X}, warm-up at {lsn:X})"
        ));
        Ok(Prepared {
            database: database.to_string(),
            template,
            topic,
        })
    }

    /// Debezium started again, over the backlog, until all `n` records are in Kafka.
    pub(super) async fn drain(self, cfg: &Cfg, c: &Client, n: u64, end_lsn: u64) -> Result<Value> {
        log("drain: Debezium over the backlog (its own slot, created before the backlog)");
        let t0 = Instant::now();
        // The same directory as the warm-up's: Connect reads its stored offset there.
        let pidfile = cfg
            .a
            .log_dir
            .join(format!("bench-debezium-{NAME}"))
            .join("connect.pid");
        let _ = std::fs::remove_file(&pidfile);
        // `up` returns once the task runs; the stream may begin before that, so Kafka
        // is watched from the moment Connect is launched.
        let up = {
            let (db, t) = (self.database.clone(), self.template.clone());
            let a = cfg.a.clone();
            tokio::task::spawn_blocking(move || Debezium::up(&a, &db, SLOT, &t, NAME, true))
        };
        let wm = watermark_client(&cfg.a.brokers)?;
        let jvm_pid =
            || -> Option<u32> { std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok() };
        let mut first: Option<(f64, CpuSplit, f64)> = None;
        let mut up = Some(up);
        let mut dbz: Option<Debezium> = None;
        let want = n as i64 + 1;
        let mut last_log = Instant::now();
        let (secs, count) = loop {
            if let Some(h) = up.as_ref() {
                if h.is_finished() {
                    dbz = Some(up.take().context("up")?.await??);
                }
            }
            if let Some(d) = &dbz {
                d.check_alive()?;
            }
            let count = hw_sum_with(&wm, &self.topic)?;
            let t = t0.elapsed().as_secs_f64();
            if first.is_none() && count > 1 {
                let mut split = CpuSplit::start(cfg.clk_tck);
                let pid = jvm_pid();
                split.watch("debezium", pid.into_iter().collect());
                split.watch("broker", broker_pids());
                if let Some(p) = walsender_pid(c, SLOT).await? {
                    split.watch("walsender", vec![p]);
                }
                let cpu = pid
                    .and_then(|p| proc_cpu_secs(p, cfg.clk_tck))
                    .unwrap_or(f64::NAN);
                first = Some((t, split, cpu));
            }
            if count >= want {
                break (t, count);
            }
            if last_log.elapsed() > Duration::from_secs(10) {
                log(format!(
                    "drain: Debezium {t:.0} s, {} records in Kafka so far",
                    count - 1
                ));
                last_log = Instant::now();
            }
            if t > 1800.0 {
                bail!(
                    "Debezium did not drain the backlog within 30 min ({} of {n} records)",
                    count - 1
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let dbz = match dbz {
            Some(d) => d,
            None => up.context("up")?.await??,
        };
        let (t_first, split, cpu_first) = first.context("no first record")?;
        let split = split.finish();
        let (cpu_total, rss) = dbz.resources(cfg.clk_tck);
        let stream_s = secs - t_first;
        // Debezium confirms its slot after Connect flushed its offsets
        // (offset.flush.interval.ms), at the last change it processed: `end_lsn` is
        // inside the last transaction, after its last change.
        let tc = Instant::now();
        let mut slot_confirmed_s = None;
        while tc.elapsed() < Duration::from_secs(60) {
            if confirmed(c, SLOT).await? >= end_lsn.saturating_sub(1024) {
                slot_confirmed_s = Some(tc.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        dbz.stop()?;
        let cpu_stream = cpu_total - cpu_first;
        let out = json!({
            "seconds": stream_s,
            "events_per_s": n as f64 / stream_s,
            "startup_s": t_first,
            "seconds_with_startup": secs,
            "cpu_s": cpu_stream,
            "cpu_us_per_event": cpu_stream * 1e6 / n as f64,
            "cpu_s_with_startup": cpu_total,
            "peak_rss_mb": rss,
            "cpu_split": split,
            "verified_in_kafka": count - 1,
            "slot_confirmed_after_last_record_s": slot_confirmed_s,
            "jvm_opts": cfg.a.debezium_jvm_opts,
        });
        log(format!(
            "drain: Debezium {stream_s:.2} s streaming ({:.0} events/s; JVM start-up {t_first:.1} s), {} events in Kafka, cpu {cpu_stream:.2} s, peak RSS {rss:.0} MB",
            n as f64 / stream_s,
            count - 1
        ));
        Ok(out)
    }
}
