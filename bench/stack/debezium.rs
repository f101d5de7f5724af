//! Debezium's Postgres connector with its Outbox Event Router in Kafka Connect, as one
//! more publisher of the benchmark (issue 14): started and stopped through
//! `scripts/debezium`, the same script the differential test uses, so the benchmark
//! measures the very set-up whose output the test proves identical to the relay's.
//! Its CPU and peak RSS are the Connect JVM's, read from /proc as the relay's are.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use super::kafka::linger_ms;
use super::pg::conninfo_parts;
use super::proc::{log_tail, proc_cpu_secs, proc_status_kb};
use crate::{log, Args};

/// The JVM options Kafka's own `connect-standalone.sh` starts Connect with (its
/// KAFKA_HEAP_OPTS and kafka-run-class.sh's G1 settings): what an operator who
/// follows Kafka's docs runs. Overridden with `--debezium-jvm-opts`.
pub(crate) const CONNECT_DEFAULT_JVM_OPTS: &str = "-Xms256m -Xmx2g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true";

/// What scripts/debezium fetches (stated in the report; the script is the source).
pub(crate) const DEBEZIUM_VERSION: &str = "3.6.1.Final";
pub(crate) const CONNECT_VERSION: &str = "4.3.1";

/// Connect's offset flush interval in the benchmark: Debezium confirms the slot only
/// after Connect flushed its offsets, so this bounds how far its slot trails.
pub(crate) const OFFSET_FLUSH_MS: u64 = 1000;

/// Kafka Connect running Debezium on one database's classic outbox table.
pub(crate) struct Debezium {
    dir: PathBuf,
    pid: u32,
    script: PathBuf,
}

impl Debezium {
    /// `scripts/debezium up` on `database`'s `public.outbox`, slot `slot`, routed by
    /// event_type into `topic_template` (the relay's `{event_type}` placeholder).
    /// Returns once the connector's task runs and holds its slot. Connect's offsets
    /// are in a directory per `name`, under the log directory, which outlives a run:
    /// the offsets a run left there are removed first (they name WAL of another
    /// run's cluster), unless `resume` says that this start continues the previous
    /// one's.
    pub(crate) fn up(
        a: &Args,
        database: &str,
        slot: &str,
        topic_template: &str,
        name: &str,
        resume: bool,
    ) -> Result<Debezium> {
        let (_, _, port, _) = conninfo_parts(&a.database_url)?;
        let dir = a.log_dir.join(format!("bench-debezium-{name}"));
        let script = a.debezium_script.clone();
        if !resume {
            match std::fs::remove_file(dir.join("offsets")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    bail!("remove Connect's old offsets in {}: {e}", dir.display())
                }
                _ => {}
            }
        }
        let linger = linger_ms().unwrap_or(5).to_string();
        let flush = OFFSET_FLUSH_MS.to_string();
        let topic = topic_template.replace("{event_type}", "${routedByValue}");
        let mut cmd = Command::new(&script);
        cmd.arg("up")
            .arg("--dir")
            .arg(&dir)
            .args(["--brokers", &a.brokers, "--pg-port", &port])
            .args(["--database", database, "--slot", slot, "--topic", &topic])
            .args(["--table", "public.outbox"])
            .args(["--linger-ms", &linger, "--offset-flush-ms", &flush]);
        // The classic table's columns, mapped as the relay's classic preset maps them:
        // key aggregate_id, value payload, `id` header event_id, routed by event_type.
        for kv in [
            "transforms.outbox.table.field.event.id=event_id",
            "transforms.outbox.table.field.event.key=aggregate_id",
            "transforms.outbox.table.field.event.payload=payload",
            "transforms.outbox.route.by.field=event_type",
        ] {
            cmd.args(["--connector", kv]);
        }
        for kv in &a.debezium_connector {
            cmd.args(["--connector", kv]);
        }
        cmd.env("DEBEZIUM_JVM_OPTS", &a.debezium_jvm_opts);
        let out = cmd.output().context("run scripts/debezium up")?;
        if !out.status.success() {
            bail!(
                "scripts/debezium up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let pid = std::fs::read_to_string(dir.join("connect.pid"))
            .context("Connect's pid file")?
            .trim()
            .parse()
            .map_err(|e| anyhow!("Connect's pid file: {e}"))?;
        log(format!(
            "debezium/{name}: Kafka Connect running (pid {pid}, log {})",
            dir.join("connect.log").display()
        ));
        Ok(Debezium { dir, pid, script })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if proc_cpu_secs(self.pid, 100.0).is_none() {
            bail!(
                "Kafka Connect exited; last lines of its log:\n{}",
                log_tail(&self.dir.join("connect.log"), 20)
            );
        }
        Ok(())
    }

    /// CPU seconds and peak RSS (MB) of the Connect JVM so far.
    pub(crate) fn resources(&self, clk_tck: f64) -> (f64, f64) {
        (
            proc_cpu_secs(self.pid, clk_tck).unwrap_or(f64::NAN),
            proc_status_kb(self.pid, "VmHWM:")
                .map(|k| k as f64 / 1024.0)
                .unwrap_or(f64::NAN),
        )
    }

    /// `scripts/debezium down`: Connect stops its task, flushes its offsets and exits.
    pub(crate) fn stop(mut self) -> Result<()> {
        let r = self.down();
        self.pid = 0;
        r
    }

    fn down(&self) -> Result<()> {
        let out = Command::new(&self.script)
            .arg("down")
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .context("run scripts/debezium down")?;
        if !out.status.success() {
            bail!(
                "scripts/debezium down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        if self.pid != 0 {
            let _ = self.down();
        }
    }
}
