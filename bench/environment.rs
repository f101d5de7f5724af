//! What the report records about the machine, the build and the command line, at the
//! start and the end of the run. Read-only: it looks at the machine and never
//! changes it, since the report must describe the run, not affect it.

use std::process::Command;

use serde_json::{json, Value};

use crate::stack::Cfg;

/// The report's "environment" section as it is at the start of the run.
pub(crate) fn at_start(cfg: &Cfg) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let args_str: Vec<String> = std::env::args()
        .skip(1)
        .filter(|s| s == "--quick" || s.starts_with("--events") || s.parse::<u64>().is_ok())
        .collect();
    json!({
        "started_utc": sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
        "args": std::env::var("BENCH_ARGS").unwrap_or(args_str.join(" ")),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "shared_machine": true,
        "loadavg_start": loadavg(),
        "git_head": std::env::var("BENCH_GIT_REV").unwrap_or_else(|_| sh("git", &["rev-parse", "--short", "HEAD"])),
        "src_dirty": std::env::var("BENCH_GIT_REV").is_err()
            && !sh("git", &["status", "--porcelain", "src", "Cargo.toml"]).is_empty(),
        "postgres": sh(cfg.a.pg_bin_dir.join("postgres").to_str().unwrap(), &["--version"]),
        "kafka": std::env::var("OUTBOX_RELAY_KAFKA_VERSION").map(|v| format!("Apache Kafka {v} (KRaft, one node)")).unwrap_or_default(),
        "librdkafka": rdkafka::util::get_rdkafka_version().1,
        "fetch_wait_ms": cfg.a.fetch_wait_ms,
        "linger_ms": cfg.a.linger_ms.unwrap_or(5),
        "relay_args": cfg.a.relay_arg.join(" "),
        "events": cfg.events, "latency_rate": cfg.latency_rate,
        "sustained_secs": cfg.sustained_secs, "poll_secs": cfg.poll_secs,
        "debezium": (!cfg.a.no_debezium).then_some(crate::stack::debezium::DEBEZIUM_VERSION),
        "kafka_connect": (!cfg.a.no_debezium).then_some(crate::stack::debezium::CONNECT_VERSION),
        "debezium_jvm_opts": cfg.a.debezium_jvm_opts,
        "debezium_offset_flush_ms": crate::stack::debezium::OFFSET_FLUSH_MS,
        "debezium_connector_args": cfg.a.debezium_connector,
    })
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Clock ticks per second (the unit of /proc CPU times).
pub(crate) fn clk_tck() -> f64 {
    sh("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
