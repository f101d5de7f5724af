//! outbox-bench: the measurement side of issue 6.
//!
//! Runs against a stack that `scripts/bench` brings up (Postgres + Apache Kafka), with the
//! relay's release binary as a child process, and writes `report.md`, `report.json`
//! and SVG plots. Every scenario uses a database and topics of its own. Figures are
//! meant to be read as ratios against the baselines measured in the same run: the
//! machines this runs on are small and shared.
//!
//! Scenarios: backlog drain (relay vs `pg_recvlogical` vs a plain rdkafka producer
//! vs two polling publishers), latency (commit → record visible to a consumer), each
//! with the relay in `--delivery exactly-once` beside the default at-least-once,
//! sustained (lag in bytes and seconds while writers insert flat out), and the
//! relay's CPU time per event and peak RSS in each.
//!
//! Layout: `stack` talks to Postgres, Kafka and the relay's binary; `scenarios` has
//! one module per scenario; `report` turns the figures into report.json, report.md
//! and the plots; `environment` records the machine. This file is only the command
//! line and the order the scenarios run in (pollers read the drain's backlog), so
//! that each of those can be read, and changed, without the others.

mod environment;
mod report;
mod scenarios;
mod stack;

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Parser;
use serde_json::{json, Value};

use crate::stack::Cfg;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark of outbox-relay against its limits (issue 6)")]
pub(crate) struct Args {
    /// Backlog size for the drain scenario (default 200000 with --quick, the 1000000 otherwise).
    #[arg(long)]
    pub(crate) events: Option<u64>,
    /// Shorter runs: 200k-event drain, sustained 60 s, pollers 20 s.
    #[arg(long)]
    pub(crate) quick: bool,
    /// The relay's release binary.
    #[arg(long)]
    pub(crate) relay_bin: PathBuf,
    /// Where report.md, report.json and the plots go.
    #[arg(long, default_value = "docs/bench")]
    pub(crate) out: PathBuf,
    /// Admin URL of the stack (superuser, any database).
    #[arg(long, env = "OUTBOX_RELAY_DATABASE_URL")]
    pub(crate) database_url: String,
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS")]
    pub(crate) brokers: String,
    #[arg(long, env = "PG_BIN_DIR", default_value = "/usr/lib/postgresql/15/bin")]
    pub(crate) pg_bin_dir: PathBuf,
    /// Where the relay's logs go.
    #[arg(long, default_value = "/tmp")]
    pub(crate) log_dir: PathBuf,
    /// Latency scenario: events/s of one-event transactions (the 5000).
    #[arg(long)]
    pub(crate) latency_rate: Option<u64>,
    #[arg(long, default_value_t = 30)]
    pub(crate) latency_secs: u64,
    /// Sustained scenario length (default 60 with --quick, 300 otherwise).
    #[arg(long)]
    pub(crate) sustained_secs: Option<u64>,
    /// Writer connections in the sustained scenario.
    #[arg(long, default_value_t = 4)]
    pub(crate) sustained_writers: usize,
    /// Length of each poller run (default 20 with --quick, 60 otherwise).
    #[arg(long)]
    pub(crate) poll_secs: Option<u64>,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    pub(crate) partitions: i32,
    /// The latency consumer's fetch.wait.max.ms.
    #[arg(long, default_value_t = 1)]
    pub(crate) fetch_wait_ms: u64,
    /// linger.ms for the relay (as --kafka-property) and the bench's own producers;
    /// default: the relay's own default (5).
    #[arg(long)]
    pub(crate) linger_ms: Option<u64>,
    /// Extra argument for every `outbox-relay run` (repeat it), e.g.
    /// `--relay-arg=--max-inflight --relay-arg=5000`.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) relay_arg: Vec<String>,
    /// Latency scenario: during the relay's run, the writers also produce
    /// every N-th event straight after COMMIT to topics of their own, so the
    /// Kafka path alone is measured under the relay's own load (same moment,
    /// same CPU contention). Adds 1/N of the traffic to the broker. 0: off.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub(crate) shadow_direct: u64,
    /// Leave Debezium (Kafka Connect with the Outbox Event Router) out of the drain,
    /// latency and sustained scenarios.
    #[arg(long)]
    pub(crate) no_debezium: bool,
    /// The script that starts and stops Debezium.
    #[arg(long, default_value = "scripts/debezium")]
    pub(crate) debezium_script: PathBuf,
    /// The Connect JVM's options (default: those of Kafka's connect-standalone.sh).
    #[arg(long, default_value = stack::debezium::CONNECT_DEFAULT_JVM_OPTS, allow_hyphen_values = true)]
    pub(crate) debezium_jvm_opts: String,
    /// Length of Debezium's sustained run (default 60 s: where it cannot keep up
    /// with the writers, its lag only grows with the run's length, and catching up
    /// takes as long again).
    #[arg(long, default_value_t = 60)]
    pub(crate) debezium_sustained_secs: u64,
    /// Latency: a second, lower rate for the relay and Debezium (0: none), at which
    /// Debezium is not saturated on a small machine.
    #[arg(long, default_value_t = 1000)]
    pub(crate) latency_low_rate: u64,
    /// One more Debezium connector setting, K=V (repeat it), e.g.
    /// `--debezium-connector poll.interval.ms=10`.
    #[arg(long)]
    pub(crate) debezium_connector: Vec<String>,
    /// Run only these scenarios (comma-separated: drain,pollers,latency,sustained).
    #[arg(long, default_value = "drain,pollers,latency,sustained")]
    pub(crate) only: String,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench {}] {}", chrono_like(), msg.as_ref());
}

fn chrono_like() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 86400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let db = e
                .chain()
                .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
                .and_then(|p| p.as_db_error())
                .map(|d| format!(" (server: {}: {})", d.severity(), d.message()))
                .unwrap_or_default();
            eprintln!("outbox-bench: {e:#}{db}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let cfg = config(Args::parse());
    std::fs::create_dir_all(&cfg.a.out)?;
    let _ = stack::kafka::LINGER_MS.set(cfg.a.linger_ms);
    let mut report = json!({ "environment": environment::at_start(&cfg) });
    let t0 = Instant::now();
    run_scenarios(&cfg, &mut report).await?;
    report["environment"]["loadavg_end"] = json!(environment::loadavg());
    report["environment"]["bench_seconds"] = json!(t0.elapsed().as_secs_f64());
    report::write(&cfg.a.out, &report)?;
    log(format!(
        "report written to {} in {:.0} s",
        cfg.a.out.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The sizes `--quick` and the issue ask for, where the command line leaves them open.
fn config(a: Args) -> Cfg {
    let events = a
        .events
        .unwrap_or(if a.quick { 200_000 } else { 1_000_000 });
    Cfg {
        events,
        latency_rate: a.latency_rate.unwrap_or(5000),
        sustained_secs: a.sustained_secs.unwrap_or(if a.quick { 60 } else { 300 }),
        poll_secs: a.poll_secs.unwrap_or(if a.quick { 20 } else { 60 }),
        clk_tck: environment::clk_tck(),
        a,
    }
}

/// The scenarios `--only` names, always in this order: pollers read the drain's backlog.
async fn run_scenarios(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let only: Vec<&str> = cfg.a.only.split(',').map(str::trim).collect();
    if only.contains(&"drain") {
        scenarios::scenario_drain(cfg, report).await?;
    }
    if only.contains(&"pollers") {
        scenarios::scenario_pollers(cfg, report).await?;
    }
    if only.contains(&"latency") {
        scenarios::scenario_latency(cfg, report).await?;
    }
    if only.contains(&"sustained") {
        scenarios::scenario_sustained(cfg, report).await?;
    }
    Ok(())
}
