//! outbox-bench: the measurement side of issue 6.
//!
//! Runs against a stack that `scripts/bench` brings up (Postgres + Apache Kafka), with the
//! relay's release binary as a child process, and writes `report.md`, `report.json`
//! and SVG plots. Every scenario uses a database and topics of its own. Figures are
//! meant to be read as ratios against the baselines measured in the same run: the
//! machines this runs on are small and shared.
//!
//! Scenarios: backlog drain (relay vs `pg_recvlogical` vs a plain rdkafka producer
//! vs two polling publishers), latency (commit → record visible to a consumer),
//! sustained (lag in bytes and seconds while writers insert flat out), and the
//! relay's CPU time per event and peak RSS in each.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
    ThreadedProducer,
};
use rdkafka::{ClientContext, Message, Offset, Timestamp, TopicPartitionList};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

const CLASSIC_TABLE: &str = include_str!("../sql/01_outbox_classic.sql");
/// `repeat('x', PAD)` in a `{"pad": …, "seq": n}` jsonb gives ~500 B of JSON text.
const PAD: usize = 473;
const AGGREGATES: i64 = 1000;
/// Latency runs write to a new topic every this many seconds (see latency_run).
const LATENCY_WINDOW_S: u64 = 5;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark of outbox-relay against its limits (issue 6)")]
struct Args {
    /// Backlog size for the drain scenario (default 200000 with --quick, the issue's 1000000 otherwise).
    #[arg(long)]
    events: Option<u64>,
    /// Shorter runs: 200k-event drain, sustained 60 s, pollers 20 s.
    #[arg(long)]
    quick: bool,
    /// The relay's release binary.
    #[arg(long)]
    relay_bin: PathBuf,
    /// Where report.md, report.json and the plots go.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Admin URL of the stack (superuser, any database).
    #[arg(long, env = "OUTBOX_RELAY_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS")]
    brokers: String,
    #[arg(long, env = "PG_BIN_DIR", default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin_dir: PathBuf,
    /// Where the relay's logs go.
    #[arg(long, default_value = "/tmp")]
    log_dir: PathBuf,
    /// Latency scenario: events/s of one-event transactions (the issue's 5000).
    #[arg(long)]
    latency_rate: Option<u64>,
    #[arg(long, default_value_t = 30)]
    latency_secs: u64,
    /// Sustained scenario length (default 60 with --quick, 300 otherwise).
    #[arg(long)]
    sustained_secs: Option<u64>,
    /// Writer connections in the sustained scenario.
    #[arg(long, default_value_t = 4)]
    sustained_writers: usize,
    /// Length of each poller run (default 20 with --quick, 60 otherwise).
    #[arg(long)]
    poll_secs: Option<u64>,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// The latency consumer's fetch.wait.max.ms.
    #[arg(long, default_value_t = 1)]
    fetch_wait_ms: u64,
    /// linger.ms for the relay (as --kafka-property) and the bench's own producers;
    /// default: the relay's own default (5).
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Extra argument for every `outbox-relay run` (repeat it), e.g.
    /// `--relay-arg=--max-inflight --relay-arg=5000`.
    #[arg(long, allow_hyphen_values = true)]
    relay_arg: Vec<String>,
    /// Latency scenario: during the relay's run, the writers also produce
    /// every N-th event straight after COMMIT to topics of their own, so the
    /// Kafka path alone is measured under the relay's own load (same moment,
    /// same CPU contention). Adds 1/N of the traffic to the broker. 0: off.
    #[arg(long, value_name = "N", default_value_t = 10)]
    shadow_direct: u64,
    /// Run only these scenarios (comma-separated: drain,pollers,latency,sustained).
    #[arg(long, default_value = "drain,pollers,latency,sustained")]
    only: String,
}

struct Cfg {
    a: Args,
    events: u64,
    latency_rate: u64,
    sustained_secs: u64,
    poll_secs: u64,
    clk_tck: f64,
}

/// Topics are per run (a memory broker keeps them until it stops).
fn topic_name(name: &str) -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| format!("{:x}", now_us() / 1_000_000));
    format!("bench.{run}.{name}")
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn parse_lsn(s: &str) -> Result<u64> {
    let (hi, lo) = s.split_once('/').ok_or_else(|| anyhow!("bad LSN {s}"))?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

fn fmt_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
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

// ------------------------------------------------------------------ Postgres helpers

fn db_url(admin: &str, db: &str) -> String {
    match admin.rfind('/') {
        Some(i) => format!("{}/{db}", &admin[..i]),
        None => panic!("database URL must end in /dbname: {admin}"),
    }
}

/// tokio-postgres errors print as "db error"; keep the server's message.
fn pg_err(e: tokio_postgres::Error) -> anyhow::Error {
    match e.as_db_error() {
        Some(db) => anyhow!("{}: {}", db.severity(), db.message()),
        None => anyhow!(e),
    }
}

async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A fresh database with the classic outbox table; returns its URL.
async fn fresh_db(cfg: &Cfg, name: &str) -> Result<String> {
    let admin = connect(&cfg.a.database_url).await?;
    for sql in [
        format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}' AND NOT active"),
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).await.map_err(pg_err).with_context(|| sql.clone())?;
    }
    let url = db_url(&cfg.a.database_url, name);
    connect(&url).await?.batch_execute(CLASSIC_TABLE).await?;
    Ok(url)
}

async fn drop_slots(url: &str) -> Result<()> {
    let c = connect(url).await?;
    c.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.batch_execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = current_database()",
    )
    .await?;
    Ok(())
}

async fn current_wal(c: &Client) -> Result<u64> {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    parse_lsn(&s)
}

async fn confirmed(c: &Client, slot: &str) -> Result<u64> {
    let s: String = c
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?
        .get(0);
    parse_lsn(&s)
}

// ------------------------------------------------------------------ Kafka helpers

async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("create topic {t}: {e}");
        }
    }
    Ok(())
}

/// Sum of the high watermarks of every partition of `topic`: records in the topic.
fn hw_sum(brokers: &str, topic: &str) -> Result<i64> {
    hw_sum_with(&watermark_client(brokers)?, topic)
}

fn watermark_client(brokers: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-bench-watermarks")
        .create()?)
}

fn hw_sum_with(c: &BaseConsumer, topic: &str) -> Result<i64> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow!("no metadata for {topic}"))?;
    let mut sum = 0;
    for p in t.partitions() {
        let (lo, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        sum += hi - lo;
    }
    Ok(sum)
}

async fn hw_sum_async(brokers: &str, topic: &str) -> Result<i64> {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || hw_sum(&b, &t)).await?
}

/// Waits until the topic holds `want` records (or `timeout`); returns the count.
async fn wait_records(brokers: &str, topic: &str, want: i64, timeout: Duration) -> Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = hw_sum_async(brokers, topic).await?;
        if n >= want || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--linger-ms`: given to the relay (`--kafka-property linger.ms=N`) and to every
/// producer of the bench; None keeps the relay's default (5 ms, src/sink.rs).
static LINGER_MS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

fn linger_ms() -> Option<u64> {
    LINGER_MS.get().copied().flatten()
}

fn producer_config(brokers: &str) -> ClientConfig {
    // The relay's own producer settings (src/sink.rs), so the baseline differs only in
    // where the records come from.
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger_ms().unwrap_or(5).to_string())
        .set("enable.idempotence", "true")
        .set("acks", "all");
    if std::env::var_os("BENCH_RDKAFKA_STATS").is_some() {
        c.set("statistics.interval.ms", "1000");
    }
    c
}

// ------------------------------------------------------------------ processes

fn proc_cpu_secs(pid: u32, clk_tck: f64) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after "pid (comm) ": state is [0], utime is field 14 overall -> [11], stime [12]
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Relay {
    child: Child,
    log: PathBuf,
    /// The relay's /metrics endpoint, for its commit → acknowledgement histogram.
    http: String,
}

impl Relay {
    fn args(url: &str, brokers: &str, topic: &str) -> Vec<String> {
        [
            "--database-url",
            url,
            "--kafka-brokers",
            brokers,
            "--topic",
            topic,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn setup(cfg: &Cfg, url: &str, topic: &str) -> Result<()> {
        let out = Command::new(&cfg.a.relay_bin)
            .arg("setup")
            .args(Relay::args(url, &cfg.a.brokers, topic))
            .env_remove("OUTBOX_RELAY_DATABASE_URL")
            .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
            .output()?;
        if !out.status.success() {
            bail!(
                "outbox-relay setup failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn start(cfg: &Cfg, url: &str, topic: &str, name: &str) -> Result<Relay> {
        let log = cfg.a.log_dir.join(format!("bench-relay-{name}.log"));
        let http = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.to_string()
        };
        let child = Command::new(&cfg.a.relay_bin)
            .arg("run")
            .args(Relay::args(url, &cfg.a.brokers, topic))
            .args(["--http-address", &http])
            .args(&cfg.a.relay_arg)
            .args(
                linger_ms()
                    .map(|l| vec!["--kafka-property".to_string(), format!("linger.ms={l}")])
                    .unwrap_or_default(),
            )
            .env_remove("OUTBOX_RELAY_DATABASE_URL")
            .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
            .env_remove("OUTBOX_RELAY_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn outbox-relay run")?;
        Ok(Relay { child, log, http })
    }

    /// The relay's Prometheus exposition text.
    fn metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.http)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            bail!(
                "the relay exited ({st}); last lines of {}:\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// CPU seconds and peak RSS (MB) so far.
    fn resources(&self, clk_tck: f64) -> (f64, f64) {
        (
            proc_cpu_secs(self.pid(), clk_tck).unwrap_or(f64::NAN),
            proc_status_kb(self.pid(), "VmHWM:")
                .map(|k| k as f64 / 1024.0)
                .unwrap_or(f64::NAN),
        )
    }

    async fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    log(format!(
                        "relay exited with {st} on SIGTERM (log {})",
                        self.log.display()
                    ));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("relay did not stop within 40 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------------ statistics

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    json!({
        "n": v.len(),
        "p50": pct(&v, 0.50), "p90": pct(&v, 0.90), "p99": pct(&v, 0.99),
        "p999": pct(&v, 0.999), "max": v.last().copied().unwrap_or(f64::NAN),
        "mean": if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 },
    })
}

/// A sample without labels from Prometheus text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The value of a numeric option passed with --relay-arg, if it was.
fn relay_setting(args: &[String], flag: &str) -> Option<f64> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.parse().ok()
}

/// Percentiles (in ms) of a Prometheus histogram in seconds, interpolated linearly
/// inside the bucket that holds each rank, as `histogram_quantile()` does. The
/// relay's latency buckets grow by √2, so a figure can be off by part of a bucket's
/// width; "max" is the upper bound of the highest non-empty bucket.
fn histogram_summary(text: &str, name: &str) -> Value {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        buckets.push((le, count.trim().parse().unwrap_or(f64::NAN)));
    }
    bucket_summary(&buckets)
}

/// Exact latencies (ms) put into the relay's histogram buckets, so that a baseline
/// measured exactly can be compared with the relay's histogram at equal precision.
fn bucketed_summary(values_ms: &[f64]) -> Value {
    let bounds: Vec<f64> = (0..39)
        .map(|i| 0.0001 * std::f64::consts::SQRT_2.powi(i))
        .chain([f64::INFINITY])
        .collect();
    let buckets: Vec<(f64, f64)> = bounds
        .iter()
        .map(|&le| {
            (
                le,
                values_ms.iter().filter(|&&v| v / 1000.0 <= le).count() as f64,
            )
        })
        .collect();
    bucket_summary(&buckets)
}

/// Cumulative (upper bound in seconds, count) buckets → percentiles in ms.
fn bucket_summary(buckets: &[(f64, f64)]) -> Value {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let q = |q: f64| -> f64 {
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, n) in buckets {
            if n >= rank && n > prev.1 {
                if le.is_infinite() {
                    return prev.0 * 1000.0;
                }
                return (prev.0 + (le - prev.0) * (rank - prev.1) / (n - prev.1)) * 1000.0;
            }
            prev = (le, n);
        }
        f64::NAN
    };
    let max = buckets
        .iter()
        .scan(0.0, |seen, &(le, n)| {
            let grew = n > *seen;
            *seen = n;
            Some((le, grew))
        })
        .filter(|(_, grew)| *grew)
        .map(|(le, _)| le * 1000.0)
        .last()
        .unwrap_or(f64::NAN);
    json!({
        "n": total, "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
        "max": max, "source": "histogram",
    })
}

/// (percentile, value) pairs for a percentile plot.
fn pct_curve(v: &[f64]) -> Vec<(f64, f64)> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = Vec::new();
    for i in 0..=200 {
        let q = i as f64 / 200.0;
        out.push((q * 100.0, pct(&s, q.max(0.0001))));
    }
    out
}

// ------------------------------------------------------------------ scenario: drain

fn backlog_sql() -> String {
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

/// `pg_recvlogical` streaming slot `bench_recvlogical` of the database at `url` with
/// pgoutput over `outbox_pub`, as the relay would; callers add where it stops and
/// where its output goes.
fn recvlogical(cfg: &Cfg, url: &str) -> Command {
    let mut c = Command::new(cfg.a.pg_bin_dir.join("pg_recvlogical"));
    c.args([
        "-d",
        &conninfo(url),
        "-S",
        "bench_recvlogical",
        "--start",
        "-P",
        "pgoutput",
    ])
    .args([
        "-o",
        "proto_version=1",
        "-o",
        "publication_names=outbox_pub",
    ])
    .stdout(Stdio::null());
    c
}

/// A libpq keyword/value string for pg_recvlogical from the stack's URL.
fn conninfo(url: &str) -> String {
    let u = url
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let (userhost, db) = u.split_once('/').unwrap();
    let (user, hostport) = userhost.split_once('@').unwrap();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    format!("host={host} port={port} user={user} dbname={db}")
}

async fn scenario_drain(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let n = cfg.events;
    let url = fresh_db(cfg, "bench_drain").await?;
    let c = connect(&url).await?;
    let topic = &topic_name("drain");
    create_topic(&cfg.a.brokers, topic, cfg.a.partitions).await?;
    Relay::setup(cfg, &url, topic)?;
    c.batch_execute("SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')")
        .await?;
    log(format!(
        "drain: writing a backlog of {n} events (100-event transactions) with the relay stopped"
    ));
    let wal0 = current_wal(&c).await?;
    let (write_s, end_lsn) = write_backlog(&url, n).await?;
    let wal1 = current_wal(&c).await?;
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

    // Baseline 1: Postgres's own decode rate.
    log("drain: pg_recvlogical over the same backlog (its own slot, created before the backlog)");
    let t0 = Instant::now();
    let st = recvlogical(cfg, &url)
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
        .status()
        .context("run pg_recvlogical")?;
    let recv_s = t0.elapsed().as_secs_f64();
    if !st.success() {
        bail!("pg_recvlogical failed: {st}");
    }
    let recv_rate = n as f64 / recv_s;
    log(format!(
        "drain: pg_recvlogical {recv_s:.2} s, {recv_rate:.0} events/s"
    ));

    // The relay.
    log("drain: starting the relay over the backlog");
    let t0 = Instant::now();
    let mut relay = Relay::start(cfg, &url, topic, "drain")?;
    let mut last_progress = Instant::now();
    loop {
        relay.check_alive()?;
        if confirmed(&c, "outbox_relay").await? >= end_lsn {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            log(format!(
                "drain: {:.0} s, {} records in Kafka so far",
                t0.elapsed().as_secs_f64(),
                hw_sum_async(&cfg.a.brokers, topic).await.unwrap_or(-1)
            ));
            last_progress = Instant::now();
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("the relay did not drain the backlog within 30 min");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay_s = t0.elapsed().as_secs_f64();
    let (cpu, rss) = relay.resources(cfg.clk_tck);
    relay.stop().await?;
    let verified = wait_records(&cfg.a.brokers, topic, n as i64, Duration::from_secs(30)).await?;
    let relay_rate = n as f64 / relay_s;
    log(format!(
        "drain: relay {relay_s:.2} s, {relay_rate:.0} events/s, {verified} records in Kafka, cpu {cpu:.2} s, peak RSS {rss:.1} MB"
    ));

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
        "payload_bytes": payload_bytes,
        "wal_bytes": wal1 - wal0,
        "write": {"seconds": write_s, "events_per_s": n as f64 / write_s},
        "end_lsn": fmt_lsn(end_lsn),
        "pg_recvlogical": {"seconds": recv_s, "events_per_s": recv_rate},
        "relay": {
            "seconds": relay_s, "events_per_s": relay_rate, "verified_in_kafka": verified,
            "cpu_s": cpu, "cpu_us_per_event": cpu * 1e6 / n as f64, "peak_rss_mb": rss,
        },
        "broker_intake": intake,
    });
    Ok(())
}

/// The headers the relay sends for the classic table: the event id and type.
fn relay_headers(id: &str, event_type: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: "event_type",
            value: Some(event_type.as_bytes()),
        })
}

/// Delivery report times of the direct-produce baseline: (seq, µs since the epoch).
struct AckTimes {
    acks: std::sync::Mutex<Vec<(i64, i64)>>,
}
impl ClientContext for AckTimes {
    /// `BENCH_RDKAFKA_STATS=FILE`: the baseline producer's librdkafka
    /// statistics every second, one JSON document per line, to set beside
    /// the relay's (`--relay-arg=--kafka-property
    /// --relay-arg=statistics.interval.ms=1000`, in its log).
    fn stats_raw(&self, statistics: &[u8]) {
        if let Ok(path) = std::env::var("BENCH_RDKAFKA_STATS") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(statistics);
                let _ = f.write_all(b"\n");
            }
        }
    }
}
impl ProducerContext for AckTimes {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, seq: usize) {
        if r.is_ok() && seq != usize::MAX {
            let at = now_us();
            self.acks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((seq as i64, at));
        }
    }
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

// ------------------------------------------------------------------ pollers

#[derive(Clone, Copy)]
struct PollerKind {
    name: &'static str,
    interval: Duration,
    batch: i64,
    skip_locked: bool,
}

const CLASSIC: PollerKind = PollerKind {
    name: "classic",
    interval: Duration::from_secs(5),
    batch: 100,
    skip_locked: false,
};
const TUNED: PollerKind = PollerKind {
    name: "tuned",
    interval: Duration::from_millis(100),
    batch: 500,
    skip_locked: true,
};

/// A polling publisher as commonly written: every `interval`, in one transaction,
/// select up to `batch` unprocessed rows in id order, publish them, wait for every
/// acknowledgement, mark them processed, commit. Runs until `stop` or until the table
/// has nothing left when `until_empty`. Returns rows published.
async fn poller(
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
async fn scenario_pollers(cfg: &Cfg, report: &mut Value) -> Result<()> {
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

// ------------------------------------------------------------------ latency

/// One received record: seq, receive time (epoch µs), record timestamp (epoch ms), kind.
type Received = (i64, i64, i64, &'static str);

fn parse_seq(payload: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(payload).ok()?;
    let i = s.find("\"seq\":")? + 6;
    let digits: String = s[i..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn consume_until(
    brokers: String,
    topics: Vec<String>,
    partitions: i32,
    fetch_wait_ms: u64,
    expected: Arc<AtomicU64>,
    give_up: Arc<AtomicBool>,
) -> Result<Vec<Received>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("outbox-bench-{}", now_us()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in &topics {
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    c.assign(&tpl)?;
    let mut got: Vec<Received> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        if let Some(m) = c.poll(Duration::from_millis(20)) {
            let recv = now_us();
            let m = m?;
            let (ts, kind) = match m.timestamp() {
                Timestamp::CreateTime(t) => (t, "CreateTime"),
                Timestamp::LogAppendTime(t) => (t, "LogAppendTime"),
                Timestamp::NotAvailable => (0, "none"),
            };
            if let Some(seq) = m.payload().and_then(parse_seq) {
                if seen.insert(seq) {
                    got.push((seq, recv, ts, kind));
                }
            }
        }
        if seen.len() as u64 >= expected.load(Ordering::Relaxed) || give_up.load(Ordering::Relaxed)
        {
            return Ok(got);
        }
    }
}

enum Publisher {
    Relay,
    Poller(PollerKind),
    /// Baseline: the writer itself produces each event right after its COMMIT
    /// returned, with the relay's producer settings. What is left of the latency is
    /// the Kafka path (linger, broker append and ack, consumer fetch) alone.
    Direct,
}

/// Writers at `rate` events/s of one-event transactions for `secs`; `publisher` moves
/// them to Kafka; a consumer on the same host records when each becomes visible.
async fn latency_run(
    cfg: &Cfg,
    name: &str,
    publisher: Publisher,
    rate: u64,
    secs: u64,
) -> Result<Value> {
    let db = format!("bench_lat_{name}");
    let url = fresh_db(cfg, &db).await?;
    // One topic per 5-second window, routed by event_type (the relay's topic
    // template): on nisshi, the earlier test broker, fetches slowed down as a
    // partition filled with the many small batches a 2k-5k/s trickle makes, and
    // the consumer, not the publisher, became the bottleneck. Small topics keep
    // the consumer from ever being the bottleneck.
    let base = topic_name(&format!("latency.{name}"));
    let topic = format!("{base}.{{event_type}}");
    let windows = secs.div_ceil(LATENCY_WINDOW_S).max(1);
    let topics: Vec<String> = (0..windows).map(|w| format!("{base}.w{w}")).collect();
    for t in &topics {
        create_topic(&cfg.a.brokers, t, cfg.a.partitions).await?;
    }
    let shadow_every =
        Some(cfg.a.shadow_direct).filter(|n| *n > 0 && matches!(publisher, Publisher::Relay));
    let shadow = shadow_every.is_some();
    // Direct records go to the consumed topics, or beside them when they
    // shadow the relay's (measured by their delivery reports only).
    let direct_base = if shadow {
        format!("{base}.direct")
    } else {
        base.clone()
    };
    if shadow {
        for w in 0..windows {
            create_topic(
                &cfg.a.brokers,
                &format!("{direct_base}.w{w}"),
                cfg.a.partitions,
            )
            .await?;
        }
    }
    let mut relay = None;
    let mut poll = None;
    let mut direct: Option<Arc<ThreadedProducer<AckTimes>>> = None;
    let stop_poll = Arc::new(AtomicBool::new(false));
    if matches!(publisher, Publisher::Direct) || shadow {
        let p: ThreadedProducer<AckTimes> =
            producer_config(&cfg.a.brokers).create_with_context(AckTimes {
                acks: std::sync::Mutex::new(Vec::new()),
            })?;
        // Warm up (metadata, producer id) as the relay does before its first
        // event; the consumer ignores a record without a seq.
        p.send(
            BaseRecord::with_opaque_to(&format!("{direct_base}.w0"), usize::MAX)
                .key("warmup")
                .payload("{\"seq\": -1}"),
        )
        .map_err(|(e, _)| anyhow!("warm-up produce: {e}"))?;
        p.flush(Duration::from_secs(10))?;
        direct = Some(Arc::new(p));
    }
    match publisher {
        Publisher::Direct => {}
        Publisher::Relay => {
            Relay::setup(cfg, &url, &topic)?;
            let r = Relay::start(cfg, &url, &topic, &format!("latency-{name}"))?;
            relay = Some(r);
        }
        Publisher::Poller(kind) => {
            poll = Some(tokio::spawn(poller(
                url.clone(),
                cfg.a.brokers.clone(),
                topic.clone(),
                kind,
                stop_poll.clone(),
                false,
            )));
        }
    }
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let give_up = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (b, t, p, w) = (
            cfg.a.brokers.clone(),
            topics.clone(),
            cfg.a.partitions,
            cfg.a.fetch_wait_ms,
        );
        let (e, g) = (expected.clone(), give_up.clone());
        tokio::task::spawn_blocking(move || consume_until(b, t, p, w, e, g))
    };
    // Let the relay connect and the consumer join before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(r) = relay.as_mut() {
        r.check_alive()?;
    }
    let cpu0 = relay.as_ref().map(|r| r.resources(cfg.clk_tck).0);

    let writers = if rate >= 1000 { 4 } else { 1 };
    let per_writer = rate as f64 / writers as f64;
    let total = rate * secs;
    log(format!("latency/{name}: {rate} events/s of one-event transactions for {secs} s ({writers} writers)"));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut hs = Vec::new();
    for w in 0..writers {
        let url = url.clone();
        let direct = direct.clone();
        let base = direct_base.clone();
        let every = shadow_every.unwrap_or(1);
        let pad = "x".repeat(PAD);
        hs.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            let stmt = c
                .prepare(&format!(
                    "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ($3, $1, jsonb_build_object('seq', $2::bigint, 'pad', repeat('x', {PAD})))"
                ))
                .await?;
            let mut commits: Vec<(i64, i64)> = Vec::new();
            let mut i = 0u64;
            loop {
                let seq = (i * writers as u64 + w as u64) as i64;
                if seq as u64 >= total {
                    break;
                }
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / per_writer)).await;
                let key = format!("agg-{}", seq % AGGREGATES);
                let etype = format!("w{}", seq as u64 / (rate * LATENCY_WINDOW_S));
                // Autocommit: the statement is the one-event transaction; when execute()
                // returns, COMMIT has returned.
                c.execute(&stmt, &[&key, &seq, &etype]).await?;
                commits.push((seq, now_us()));
                if let Some(p) = direct.as_ref().filter(|_| (seq as u64).is_multiple_of(every)) {
                    let topic = format!("{base}.{etype}");
                    let payload = format!("{{\"pad\": \"{pad}\", \"seq\": {seq}}}");
                    // The relay's headers for this table (event id, event type):
                    // the same records, so the broker has the same work to do.
                    let id = format!("00000000-0000-4000-8000-{seq:012}");
                    let headers = relay_headers(&id, &etype);
                    let mut rec = BaseRecord::with_opaque_to(&topic, seq as usize)
                        .key(&key)
                        .payload(&payload)
                        .headers(headers);
                    loop {
                        match p.send(rec) {
                            Ok(()) => break,
                            Err((e, r)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                                rec = r;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err((e, _)) => bail!("direct produce: {e}"),
                        }
                    }
                }
                i += 1;
            }
            anyhow::Ok(commits)
        }));
    }
    let mut commits: HashMap<i64, i64> = HashMap::new();
    for h in hs {
        commits.extend(h.await??);
    }
    let write_s = (tokio::time::Instant::now() - start).as_secs_f64();
    expected.store(commits.len() as u64, Ordering::Relaxed);
    let gu = give_up.clone();
    let waiter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        gu.store(true, Ordering::Relaxed);
    });
    let got = consumer.await??;
    waiter.abort();
    let mut res = json!({});
    if let Some(p) = direct.take() {
        p.flush(Duration::from_secs(30))?;
        let acks = std::mem::take(&mut *p.context().acks.lock().unwrap());
        let to_ack: Vec<f64> = acks
            .iter()
            .filter_map(|(seq, at)| commits.get(seq).map(|c| (at - c) as f64 / 1000.0))
            .collect();
        if let Some(every) = shadow_every {
            res["shadow_direct_every"] = json!(every);
            res["shadow_direct_commit_to_ack_bucketed_ms"] = bucketed_summary(&to_ack);
            res["shadow_direct_commit_to_ack_ms"] = summary(to_ack);
        } else {
            res["commit_to_ack_bucketed_ms"] = bucketed_summary(&to_ack);
            res["commit_to_ack_ms"] = summary(to_ack);
        }
    }
    if let Some(r) = relay.take() {
        // Acknowledgement as the relay saw it: its delivery reports against the
        // commit timestamp in the WAL.
        let text = r.metrics()?;
        res["commit_to_ack_ms"] = histogram_summary(&text, "outbox_commit_to_ack_seconds");
        let (cpu, rss) = r.resources(cfg.clk_tck);
        let cpu_run = cpu - cpu0.unwrap_or(0.0);
        r.stop().await?;
        res["relay_cpu_s"] = json!(cpu_run);
        res["relay_cpu_us_per_event"] = json!(cpu_run * 1e6 / commits.len() as f64);
        res["relay_peak_rss_mb"] = json!(rss);
        drop_slots(&url).await?;
    }
    if let Some(h) = poll.take() {
        stop_poll.store(true, Ordering::Relaxed);
        h.await??;
    }
    let mut e2e = Vec::new();
    let mut to_ts = Vec::new();
    let mut ts_kind = "none";
    for (seq, recv, ts, kind) in &got {
        if let Some(c) = commits.get(seq) {
            e2e.push((recv - c) as f64 / 1000.0);
            if *ts > 0 {
                to_ts.push((ts * 1000 - c) as f64 / 1000.0);
                ts_kind = kind;
            }
        }
    }
    let mut verified = 0;
    for t in &topics {
        verified += hw_sum_async(&cfg.a.brokers, t).await?;
    }
    log(format!(
        "latency/{name}: {} committed ({:.0}/s achieved), {} received; e2e {}",
        commits.len(),
        commits.len() as f64 / write_s,
        got.len(),
        summary(e2e.clone())
    ));
    res["rate_target"] = json!(rate);
    res["seconds"] = json!(secs);
    res["writers"] = json!(writers);
    res["committed"] = json!(commits.len());
    res["achieved_rate"] = json!(commits.len() as f64 / write_s);
    res["received"] = json!(got.len());
    res["verified_in_kafka"] = json!(verified);
    res["commit_to_consumer_ms"] = summary(e2e.clone());
    res["commit_to_record_timestamp_ms"] = summary(to_ts);
    res["record_timestamp_type"] = json!(ts_kind);
    res["curve"] = json!(pct_curve(&e2e));
    Ok(res)
}

async fn scenario_latency(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let mut out = json!({});
    out["direct"] = latency_run(
        cfg,
        "direct",
        Publisher::Direct,
        cfg.latency_rate,
        cfg.a.latency_secs,
    )
    .await?;
    out["relay"] = latency_run(
        cfg,
        "relay",
        Publisher::Relay,
        cfg.latency_rate,
        cfg.a.latency_secs,
    )
    .await?;
    // The tuned poller moves at most 500 rows per 100 ms: the relay's rate is within it.
    out["tuned_poller"] = latency_run(
        cfg,
        "tuned",
        Publisher::Poller(TUNED),
        cfg.latency_rate.min(2000),
        cfg.poll_secs,
    )
    .await?;
    // The classic poller moves at most 20 events/s: run it at half that.
    out["classic_poller"] = latency_run(
        cfg,
        "classic",
        Publisher::Poller(CLASSIC),
        10,
        cfg.poll_secs,
    )
    .await?;
    report["latency"] = out;
    Ok(())
}

// ------------------------------------------------------------------ sustained

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
fn wal_age(samples: &[(f64, u64)], i: usize, pos: u64) -> f64 {
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

async fn scenario_sustained(cfg: &Cfg, report: &mut Value) -> Result<()> {
    let baseline = sustained_baseline(cfg, cfg.sustained_secs).await?;
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
    let ksampler = {
        let (b, t, stop) = (cfg.a.brokers.clone(), topic.to_string(), kstop.clone());
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
    };
    let mut samples: Vec<(f64, u64, u64, u64)> = Vec::new();
    // The relay's walsender's sent position and the relay's in-flight events, to tell
    // a relay that does not read (window full: the broker is the limit) from a
    // walsender that does not send (decoding is the limit).
    let mut sent: Vec<u64> = Vec::new();
    let mut inflight: Vec<f64> = Vec::new();
    let max_inflight = relay_setting(&cfg.a.relay_arg, "--max-inflight").unwrap_or(5000.0);
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
    stop.store(true, Ordering::Relaxed);
    kstop.store(true, Ordering::Relaxed);
    for h in hs {
        h.await??;
    }
    let ksamples = ksampler.await??;
    let written = count.load(Ordering::Relaxed);
    let write_s = t0.elapsed().as_secs_f64();
    let end = current_wal(&c).await?;
    // Catch-up after the writers stopped: everything confirmed (the relay confirms the
    // server's sent position once idle, so this reaches `end`).
    let tc = Instant::now();
    let mut caught_up = None;
    while tc.elapsed() < Duration::from_secs(300) {
        relay.check_alive()?;
        if confirmed(&c, "outbox_relay").await? >= end {
            caught_up = Some(tc.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

    // Lag in seconds at sample i: how long ago the WAL insert position was where the
    // confirmed position is now (linear between samples).
    let wal_t: Vec<(f64, u64)> = samples.iter().map(|s| (s.0, s.2)).collect();
    let series: Vec<(f64, u64, u64, f64)> = samples
        .iter()
        .enumerate()
        .map(|(i, &(t, n, wal, conf))| (t, n, wal.saturating_sub(conf), wal_age(&wal_t, i, conf)))
        .collect();
    // Delivery lag: how long ago the writers had committed as many events as Kafka holds.
    let delivery: Vec<(f64, f64)> = ksamples
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
        .collect();
    let delivery_steady: Vec<f64> = delivery
        .iter()
        .filter(|x| x.0 >= 1.0)
        .map(|x| x.1)
        .collect();
    // Per second: max lag in that second and inserts in that second.
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
    report["sustained"] = json!({
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
        "relay_cpu_s": cpu - cpu0,
        "relay_cpu_us_per_event": (cpu - cpu0) * 1e6 / written as f64,
        "relay_peak_rss_mb": rss,
        "per_second": per_sec,
        "samples": series.iter().map(|x| json!([x.0, x.1, x.2, x.3])).collect::<Vec<_>>(),
    });
    Ok(())
}

// ------------------------------------------------------------------ SVG

const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];

fn nice_step(range: f64) -> f64 {
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    mag * if r < 1.5 {
        1.0
    } else if r < 3.5 {
        2.0
    } else if r < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 1000.0 {
        format!("{:.1}k", v / 1e3)
    } else if v.abs() >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart; `log_y` uses a base-10 axis (values ≤ 0 are clipped).
fn svg_lines(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> String {
    let (w, h, ml, mr, mt, mb) = (820.0, 420.0, 70.0, 170.0, 40.0, 50.0);
    let pts = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ty = |y: f64| if log_y { y.max(0.1).log10() } else { y };
    let (ly0, ly1) = if log_y {
        (
            ty(y0.max(0.1)).floor(),
            ty(y1.max(0.1)).ceil().max(ty(y0.max(0.1)).floor() + 1.0),
        )
    } else {
        let step = nice_step((y1.max(0.0) - 0.0).max(1e-9));
        (0.0, ((y1.max(0.0) / step).ceil() * step).max(step))
    };
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let py = |y: f64| h - mb - (ty(y) - ly0) / (ly1 - ly0) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        (w - mr + ml) / 2.0,
        esc(title)
    );
    // axes and grid
    let xs = nice_step(x1 - x0);
    let mut xv = (x0 / xs).ceil() * xs;
    while xv <= x1 + 1e-9 {
        let x = px(xv);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - mb,
            h - mb + 16.0,
            fmt_num(xv)
        );
        xv += xs;
    }
    let yticks: Vec<f64> = if log_y {
        (ly0 as i32..=ly1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        let st = nice_step(ly1 - ly0);
        (0..=((ly1 - ly0) / st).round() as i32)
            .map(|i| ly0 + i as f64 * st)
            .collect()
    };
    for yv in yticks {
        let y = py(yv);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - mr,
            ml - 6.0,
            y + 4.0,
            fmt_num(yv)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        w - ml - mr,
        h - mt - mb
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (w - mr + ml) / 2.0,
        h - 12.0,
        esc(xl)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (h - mb + mt) / 2.0,
        (h - mb + mt) / 2.0,
        esc(yl)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{col}" stroke-width="1.8" points="{}"/>"#,
            path.join(" ")
        );
        let ly = mt + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{col}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - mr + 10.0,
            w - mr + 30.0,
            w - mr + 35.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Horizontal bars on a log axis (rates spanning 20/s to 100k+/s).
fn svg_bars(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (w, ml, mr, bh) = (820.0, 230.0, 110.0, 26.0);
    let h = 70.0 + bars.len() as f64 * (bh + 10.0) + 30.0;
    let vmax = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    // The log axis starts at 1 (10^0): the smallest bar here is the classic poller's
    // ~20 events/s, and values below 1 are drawn at 1.
    let (l0, l1) = (0.0, vmax.log10().ceil());
    let px = |v: f64| ml + (v.max(1.0).log10() - l0) / (l1 - l0) * (w - ml - mr);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12"><rect width="{w}" height="{h}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let top = 45.0;
    let bottom = h - 30.0;
    for e in l0 as i32..=l1 as i32 {
        let x = px(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            bottom + 15.0,
            fmt_num(10f64.powi(e))
        );
    }
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = top + 10.0 + i as f64 * (bh + 10.0);
        let col = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text><rect x="{ml}" y="{y:.1}" width="{:.1}" height="{bh}" fill="{col}"/><text x="{:.1}" y="{:.1}">{} {}</text>"#,
            ml - 8.0,
            y + bh / 2.0 + 4.0,
            esc(label),
            (px(*v) - ml).max(1.0),
            px(*v) + 6.0,
            y + bh / 2.0 + 4.0,
            fmt_num(*v),
            esc(unit)
        );
    }
    s.push_str("</svg>\n");
    s
}

// ------------------------------------------------------------------ report

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn write_plots(out: &Path, r: &Value) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let d = &r["drain"];
    if !d.is_null() {
        let mut bars = vec![
            (
                "pg_recvlogical (decode only)".to_string(),
                f(&d["pg_recvlogical"]["events_per_s"]),
            ),
            (
                "rdkafka producer (broker intake)".to_string(),
                f(&d["broker_intake"]["events_per_s"]),
            ),
            ("outbox-relay".to_string(), f(&d["relay"]["events_per_s"])),
        ];
        if !r["pollers"].is_null() {
            bars.push((
                "tuned poller (100 ms, 500)".into(),
                f(&r["pollers"]["tuned"]["events_per_s"]),
            ));
            bars.push((
                "classic poller (5 s, 100)".into(),
                f(&r["pollers"]["classic"]["events_per_s"]),
            ));
        }
        std::fs::write(
            out.join("throughput.svg"),
            svg_bars(
                &format!(
                    "Backlog drain, {} events of ~500 B (log scale)",
                    d["events"]
                ),
                "events/s",
                &bars,
            ),
        )?;
        files.push("throughput.svg".into());
    }
    let l = &r["latency"];
    if !l.is_null() {
        let curve = |v: &Value| -> Vec<(f64, f64)> {
            v.as_array()
                .map(|a| a.iter().map(|p| (f(&p[0]), f(&p[1]))).collect())
                .unwrap_or_default()
        };
        let series = vec![
            ("outbox-relay", curve(&l["relay"]["curve"])),
            ("direct produce (baseline)", curve(&l["direct"]["curve"])),
            ("tuned poller", curve(&l["tuned_poller"]["curve"])),
            ("classic poller", curve(&l["classic_poller"]["curve"])),
        ];
        std::fs::write(
            out.join("latency.svg"),
            svg_lines(
                "Commit → record received by a consumer",
                "percentile",
                "latency, ms (log)",
                &series,
                true,
            ),
        )?;
        files.push("latency.svg".into());
    }
    let s = &r["sustained"];
    if let Some(ps) = s["samples"].as_array() {
        let pick = |i: usize, scale: f64| -> Vec<(f64, f64)> {
            ps.iter().map(|p| (f(&p[0]), f(&p[i]) / scale)).collect()
        };
        let dl: Vec<(f64, f64)> = s["delivery_samples"]
            .as_array()
            .map(|a| a.iter().map(|p| (f(&p[0]), f(&p[1]))).collect())
            .unwrap_or_default();
        std::fs::write(
            out.join("sustained_lag_seconds.svg"),
            svg_lines(
                "Sustained: relay lag in seconds",
                "time, s",
                "lag, s",
                &[
                    ("confirmed (slot)", pick(3, 1.0)),
                    ("delivered (Kafka)", dl),
                ],
                false,
            ),
        )?;
        std::fs::write(
            out.join("sustained_lag_bytes.svg"),
            svg_lines(
                "Sustained: unconfirmed WAL (pg_current_wal_lsn − confirmed_flush_lsn)",
                "time, s",
                "lag, MB",
                &[("lag (MB)", pick(2, 1e6))],
                false,
            ),
        )?;
        let rate: Vec<(f64, f64)> = s["per_second"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (f(&p["t"]), f(&p["inserts_per_s"])))
            .collect();
        std::fs::write(
            out.join("sustained_rate.svg"),
            svg_lines(
                "Sustained: inserts per second (one-event transactions)",
                "time, s",
                "events/s",
                &[("inserts/s", rate)],
                false,
            ),
        )?;
        files.extend([
            "sustained_lag_seconds.svg".into(),
            "sustained_lag_bytes.svg".into(),
            "sustained_rate.svg".into(),
        ]);
    }
    Ok(files)
}

fn yes(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "**missed**"
    }
}

fn write_markdown(out: &Path, r: &Value, plots: &[String]) -> Result<()> {
    let mut m = String::new();
    let env = &r["environment"];
    let _ = writeln!(m, "# outbox-relay benchmark report\n");
    let _ = writeln!(m, "Generated by `scripts/bench {}` on {} (UTC). Raw figures: [report.json](report.json). How to read it and what limits the relay: [README.md](README.md).\n", env["args"].as_str().unwrap_or(""), env["started_utc"].as_str().unwrap_or(""));
    let _ = writeln!(m, "**Machine:** {} cores, {}; load average {} at the start, {} at the end (other work on the machine shows there). Absolute numbers drift from run to run on such a machine; the ratios against the baselines measured in this same run are the figures to compare.\n",
        env["cores"], env["cpu"].as_str().unwrap_or("?"), env["loadavg_start"].as_str().unwrap_or("?"), env["loadavg_end"].as_str().unwrap_or("?"));
    let _ = writeln!(m, "Relay: release build of `{}`{}; {}; broker {}; librdkafka {}. Relay run with its defaults (log level info) apart from `--topic`, `--http-address`{}{}; linger.ms={} for the relay and the bench's producers.\n",
        env["git_head"].as_str().unwrap_or("?"), if env["src_dirty"].as_bool() == Some(true) { " **plus uncommitted changes in src/ or Cargo.toml** (the working tree)" } else { "" },
        env["postgres"].as_str().unwrap_or("?"), env["kafka"].as_str().or(env["nisshi"].as_str()).unwrap_or("?"), env["librdkafka"].as_str().unwrap_or("?"),
        if env["linger_ms"].as_u64().unwrap_or(5) != 5 { ", `--kafka-property linger.ms=…`" } else { "" },
        match env["relay_args"].as_str() { Some(a) if !a.is_empty() => format!(" and `{a}`"), _ => String::new() },
        env["linger_ms"].as_u64().unwrap_or(5));

    // Targets
    let d = &r["drain"];
    // The issue's latency: commit → broker acknowledgement. The relay's figure
    // comes from its histogram; the baseline's exact figures are put into the same
    // buckets so that both are read at the same precision.
    let lat = &r["latency"]["relay"]["commit_to_ack_ms"];
    let dlat = &r["latency"]["direct"]["commit_to_ack_bucketed_ms"];
    let clat = &r["latency"]["relay"]["commit_to_consumer_ms"];
    let relay_rate = f(&d["relay"]["events_per_s"]);
    let recv = f(&d["pg_recvlogical"]["events_per_s"]);
    let intake = f(&d["broker_intake"]["events_per_s"]);
    let tuned = f(&r["pollers"]["tuned"]["events_per_s"]);
    let tuned_p50 = f(&r["latency"]["tuned_poller"]["commit_to_consumer_ms"]["p50"]);
    let max_lag = f(&r["sustained"]["lag_s"]["max"]);
    let rss = [
        f(&d["relay"]["peak_rss_mb"]),
        f(&r["latency"]["relay"]["relay_peak_rss_mb"]),
        f(&r["sustained"]["relay_peak_rss_mb"]),
    ]
    .into_iter()
    .filter(|v| v.is_finite())
    .fold(f64::NAN, f64::max);
    // The same Kafka path measured while the relay ran (--shadow-direct).
    // In the relay's buckets, as the relay's own figures are.
    let shadow = &r["latency"]["relay"]["shadow_direct_commit_to_ack_bucketed_ms"];
    let during = |q: &str| {
        if shadow.is_null() {
            String::new()
        } else {
            format!("; while the relay ran: {q} {:.2} ms", f(&shadow[q]))
        }
    };
    let _ = writeln!(m, "## Targets (issue 6)\n");
    let _ = writeln!(
        m,
        "| target | measured | target | same-run baseline | result |\n|---|---|---|---|---|"
    );
    let _ = writeln!(m, "| drain vs Postgres's decode rate | {:.2} × pg_recvlogical ({} events/s) | ≥ 0.8 × | pg_recvlogical {} events/s | {} |", relay_rate / recv, fmt_num(relay_rate), fmt_num(recv), yes(relay_rate >= 0.8 * recv));
    let _ = writeln!(m, "| drain, absolute | {} events/s | ≥ 100k events/s | broker intake {} records/s ({:.2} × relay) | {} |", fmt_num(relay_rate), fmt_num(intake), intake / relay_rate, yes(relay_rate >= 100_000.0));
    let _ = writeln!(m, "| sustained lag | max {:.2} s (p99 {:.2} s) at {} inserts/s | < 1 s throughout | pg_recvlogical alone under the same writers (separate run, {} inserts/s): sent lag max {:.2} s (p99 {:.2} s) | {} |", max_lag, f(&r["sustained"]["lag_s"]["p99"]), fmt_num(f(&r["sustained"]["insert_rate"])), fmt_num(f(&r["sustained"]["baseline_pg_recvlogical"]["insert_rate"])), f(&r["sustained"]["baseline_pg_recvlogical"]["sent_lag_s"]["max"]), f(&r["sustained"]["baseline_pg_recvlogical"]["sent_lag_s"]["p99"]), yes(max_lag < 1.0));
    let _ = writeln!(
        m,
        "| latency p50 at {} events/s, commit → ack | {:.2} ms | ≤ 2 ms | producing directly after COMMIT: p50 {:.2} ms (relay adds {:.2} ms){} | {} |",
        r["latency"]["relay"]["rate_target"],
        f(&lat["p50"]),
        f(&dlat["p50"]),
        f(&lat["p50"]) - f(&dlat["p50"]),
        during("p50"),
        yes(f(&lat["p50"]) <= 2.0)
    );
    let _ = writeln!(
        m,
        "| latency p99, commit → ack | {:.2} ms | ≤ 10 ms | producing directly after COMMIT: p99 {:.2} ms{} | {} |",
        f(&lat["p99"]),
        f(&dlat["p99"]),
        during("p99"),
        yes(f(&lat["p99"]) <= 10.0)
    );
    let _ = writeln!(
        m,
        "| throughput vs tuned poller | {:.1} × | ≥ 5 × | tuned poller {} events/s | {} |",
        relay_rate / tuned,
        fmt_num(tuned),
        yes(relay_rate >= 5.0 * tuned)
    );
    let _ = writeln!(m, "| p50 latency vs tuned poller, commit → consumer | {:.1} × lower | ≥ 100 × lower | tuned poller p50 {:.1} ms | {} |", tuned_p50 / f(&clat["p50"]), tuned_p50, yes(tuned_p50 >= 100.0 * f(&clat["p50"])));
    let _ = writeln!(
        m,
        "| peak RSS | {:.1} MB (max of the scenarios) | ≤ 32 MB | — | {} |\n",
        rss,
        yes(rss <= 32.0)
    );

    let _ = writeln!(m, "## Backlog drain\n");
    let _ = writeln!(m, "{} events, {:.0} B of JSON payload each, in 100-event transactions, written with the relay stopped ({:.0} MB of WAL; Postgres wrote them at {} events/s). Rate = events / (time from start to the end LSN confirmed or reached).\n",
        d["events"], f(&d["payload_bytes"]), f(&d["wal_bytes"]) / 1e6, fmt_num(f(&d["write"]["events_per_s"])));
    let _ = writeln!(m, "| reader | seconds | events/s | vs pg_recvlogical | events verified |\n|---|---|---|---|---|");
    let _ = writeln!(
        m,
        "| pg_recvlogical → /dev/null | {:.2} | {} | 1.00 | (decode only) |",
        f(&d["pg_recvlogical"]["seconds"]),
        fmt_num(recv)
    );
    let _ = writeln!(
        m,
        "| rdkafka producer, same records (broker intake) | {:.2} | {} | {:.2} | {} |",
        f(&d["broker_intake"]["seconds"]),
        fmt_num(intake),
        intake / recv,
        d["broker_intake"]["verified_in_kafka"]
    );
    let _ = writeln!(
        m,
        "| **outbox-relay** | {:.2} | {} | {:.2} | {} of {} |",
        f(&d["relay"]["seconds"]),
        fmt_num(relay_rate),
        relay_rate / recv,
        d["relay"]["verified_in_kafka"],
        d["events"]
    );
    for k in ["tuned", "classic"] {
        let p = &r["pollers"][k];
        if !p.is_null() {
            let _ = writeln!(
                m,
                "| {k} poller ({} ms, {} rows{}), time-boxed | {:.1} | {} | {:.4} | {} |",
                p["interval_ms"],
                p["batch"],
                if p["skip_locked"].as_bool() == Some(true) {
                    ", SKIP LOCKED"
                } else {
                    ""
                },
                f(&p["seconds"]),
                fmt_num(f(&p["events_per_s"])),
                f(&p["events_per_s"]) / recv,
                p["verified_in_kafka"]
            );
        }
    }
    let _ = writeln!(m);

    let _ = writeln!(m, "## Latency\n");
    let _ = writeln!(m, "Commit → consumer, every publisher. What is measured: the writer takes the client-side wall-clock time right after the one-event transaction's COMMIT returned (autocommit INSERT, `synchronous_commit=on`); a consumer in the same process (same host clock, `fetch.wait.max.ms={}`) takes the time it received the record. Latency = receive − commit, so it includes the relay's whole path, the broker append, the broker acknowledgement and the consumer fetch; it is an upper bound on commit → broker acknowledgement. The record timestamp column is the Kafka record's timestamp (librdkafka's CreateTime = when the producer enqueued it) minus the commit time: roughly the commit → enqueue part; the timestamp is truncated to whole milliseconds, so these figures read about 0.5 ms low and can be negative. The commit time is taken when the writer task resumes after COMMIT returned, so on a busy machine it can be late by the scheduling delay (which biases every latency here slightly low, never high). The consumer's short `fetch.wait.max.ms` keeps the fetch wait out of what is measured as relay latency (set with `--fetch-wait-ms`; it was needed on nisshi, the test broker before Apache Kafka, which did not answer a parked fetch as soon as data arrived). The baseline row is the same writers, topic layout and consumer, but the writer produces each event itself right after its COMMIT returned, with the relay's producer settings (`linger.ms=5`, idempotent, `acks=all`): the Kafka path alone, which the relay cannot beat. Every latency run moves to a new topic every 5 s (`w0`, `w1`, … as the event_type, routed by the relay's topic template `….{{event_type}}`): small topics keep the consumer from ever being the bottleneck (on nisshi, the earlier test broker, fetches from one topic slowed down as its partitions filled with small batches).\n", r["environment"]["fetch_wait_ms"]);
    let _ = writeln!(m, "| publisher | rate (achieved) | received / committed | p50 | p90 | p99 | p99.9 | max | commit → record timestamp p50 / p99 |\n|---|---|---|---|---|---|---|---|---|");
    for (k, label) in [
        ("direct", "baseline: writer produces right after COMMIT"),
        ("relay", "**outbox-relay**"),
        ("tuned_poller", "tuned poller"),
        ("classic_poller", "classic poller"),
    ] {
        let x = &r["latency"][k];
        if x.is_null() {
            continue;
        }
        let e = &x["commit_to_consumer_ms"];
        let t = &x["commit_to_record_timestamp_ms"];
        let _ = writeln!(m, "| {label} | {}/s ({:.0}/s) | {} / {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} / {:.1} ms |", x["rate_target"], f(&x["achieved_rate"]), x["received"], x["committed"], f(&e["p50"]), f(&e["p90"]), f(&e["p99"]), f(&e["p999"]), f(&e["max"]), f(&t["p50"]), f(&t["p99"]));
    }
    let _ = writeln!(m, "\n**Commit → broker acknowledgement** (the issue's definition) for the two publishers that can report it:\n");
    let _ = writeln!(
        m,
        "| publisher | source | p50 | p90 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|"
    );
    for (k, field, label, source) in [
        (
            "direct",
            "commit_to_ack_ms",
            "baseline: writer produces right after COMMIT",
            "exact: delivery report time − time COMMIT returned",
        ),
        (
            "direct",
            "commit_to_ack_bucketed_ms",
            "baseline, in the relay's buckets",
            "the same values, binned and interpolated as the relay's histogram",
        ),
        (
            "relay",
            "shadow_direct_commit_to_ack_ms",
            "baseline while the relay ran (every N-th event, `--shadow-direct N`)",
            "exact, as the baseline; the writers produce these to topics of their own during the relay's run",
        ),
        (
            "relay",
            "shadow_direct_commit_to_ack_bucketed_ms",
            "baseline while the relay ran, in the relay's buckets",
            "the same values, binned and interpolated as the relay's histogram (the targets table compares with these)",
        ),
        (
            "relay",
            "commit_to_ack_ms",
            "**outbox-relay**",
            "`outbox_commit_to_ack_seconds`: delivery report time − commit timestamp in the WAL",
        ),
    ] {
        let e = &r["latency"][k][field];
        if e.is_null() {
            continue;
        }
        let _ = writeln!(
            m,
            "| {label} | {source} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {}{:.2} ms |",
            f(&e["p50"]),
            f(&e["p90"]),
            f(&e["p99"]),
            f(&e["p999"]),
            if e["source"] == "histogram" {
                "≤ "
            } else {
                ""
            },
            f(&e["max"])
        );
    }
    let _ = writeln!(m, "\nThe baseline row is measured in a run of its own, without the relay; the row *while the relay ran* is the same Kafka path at the same moment as the relay's, under the same load (the relay, its walsender, the broker, Postgres and the bench sharing the machine's cores), at 1/N of the rate. Against that row the relay's own cost shows; against the first, the relay's cost plus the load it brings.\n");
    let _ = writeln!(m, "The relay's row is read from its own Prometheus histogram (buckets growing by √2 from 0.1 ms; percentiles interpolated inside a bucket as `histogram_quantile()` does, so each can be off by part of a bucket's width; its max is the upper bound of the highest non-empty bucket). It starts at the commit timestamp Postgres writes into the WAL, a little before COMMIT returns to the writer, so it reads slightly high against the baseline, never low.\n");
    let _ = writeln!(m, "The classic poller runs at 10 events/s because it cannot move more than 20 events/s (100 rows per 5 s); the tuned poller at the relay's rate (capped at 2000/s, within its 5000/s ceiling).\n");

    let s = &r["sustained"];
    if !s.is_null() {
        let _ = writeln!(m, "## Sustained\n");
        let _ = writeln!(m, "{} writer connections inserting one-event transactions as fast as they can for {} s: {} events, {} inserts/s. Sampled every 100 ms: lag bytes = `pg_current_wal_lsn() − confirmed_flush_lsn`; lag seconds = how long ago the WAL insert position was where the confirmed position is now (interpolated between samples). The first second is left out of the summary.\n",
            s["writers"], s["seconds"], s["written"], fmt_num(f(&s["insert_rate"])));
        let _ = writeln!(m, "| lag | p50 | p99 | max |\n|---|---|---|---|");
        let _ = writeln!(
            m,
            "| seconds | {:.3} | {:.3} | {:.3} |",
            f(&s["lag_s"]["p50"]),
            f(&s["lag_s"]["p99"]),
            f(&s["lag_s"]["max"])
        );
        let _ = writeln!(
            m,
            "| MB | {:.2} | {:.2} | {:.2} |",
            f(&s["lag_bytes"]["p50"]) / 1e6,
            f(&s["lag_bytes"]["p99"]) / 1e6,
            f(&s["lag_bytes"]["max"]) / 1e6
        );
        let _ = writeln!(
            m,
            "| delivery, seconds | {:.3} | {:.3} | {:.3} |",
            f(&s["delivery_lag_s"]["p50"]),
            f(&s["delivery_lag_s"]["p99"]),
            f(&s["delivery_lag_s"]["max"])
        );
        for (label, x) in [
            ("walsender sent, seconds (relay run)", &s["sent_lag_s"]),
            (
                "walsender sent, seconds (pg_recvlogical alone, separate run)",
                &s["baseline_pg_recvlogical"]["sent_lag_s"],
            ),
        ] {
            if !x.is_null() {
                let _ = writeln!(
                    m,
                    "| {label} | {:.3} | {:.3} | {:.3} |",
                    f(&x["p50"]),
                    f(&x["p99"]),
                    f(&x["max"])
                );
            }
        }
        let _ = writeln!(m, "\nThe first two rows are what Postgres sees (the slot's confirmed position). The delivery row is sampled every 500 ms from Kafka: how long ago the writers had committed as many events as the topic holds (sum of high watermarks), i.e. the lag of delivery as opposed to confirmation. When the two differ, the relay has delivered but not yet told Postgres. The walsender rows are `pg_stat_replication.sent_lsn` against the WAL insert position: how far decoding and sending trail the writers, first under the relay, then in a separate run of the same writers with `pg_recvlogical` (into /dev/null) as the only reader, which is the ceiling for any logical-decoding reader on this machine.\n");
        if !s["inflight"].is_null() {
            let _ = writeln!(m, "The relay's in-flight events (sampled from its `/metrics` with the lag): p50 {:.0}, max {:.0} of its `--max-inflight` {:.0}; at the limit in {:.1} % of the samples. At the limit the relay stops reading and waits for the broker; below it, the relay reads as fast as the walsender sends.\n",
                f(&s["inflight"]["p50"]), f(&s["inflight"]["max"]), f(&s["max_inflight"]), 100.0 * f(&s["inflight_at_limit_fraction"]));
        }
        let _ = writeln!(m, "After the writers stopped the relay confirmed the final WAL position in {} s; {} of {} events verified in Kafka.\n",
            s["caught_up_after_stop_s"].as_f64().map(|v| format!("{v:.2}")).unwrap_or("(did not within 300)".into()), s["verified_in_kafka"], s["written"]);
    }

    let _ = writeln!(m, "## Resources of the relay\n");
    let _ = writeln!(m, "CPU = utime + stime from `/proc/PID/stat` over the scenario (user + kernel, all threads incl. librdkafka's); peak RSS = `VmHWM` from `/proc/PID/status` (a fresh relay process per scenario).\n");
    let _ = writeln!(
        m,
        "| scenario | events | CPU s | CPU µs/event | peak RSS MB |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        m,
        "| drain | {} | {:.2} | {:.1} | {:.1} |",
        d["events"],
        f(&d["relay"]["cpu_s"]),
        f(&d["relay"]["cpu_us_per_event"]),
        f(&d["relay"]["peak_rss_mb"])
    );
    let l = &r["latency"]["relay"];
    let _ = writeln!(
        m,
        "| latency | {} | {:.2} | {:.1} | {:.1} |",
        l["committed"],
        f(&l["relay_cpu_s"]),
        f(&l["relay_cpu_us_per_event"]),
        f(&l["relay_peak_rss_mb"])
    );
    let _ = writeln!(
        m,
        "| sustained | {} | {:.2} | {:.1} | {:.1} |\n",
        s["written"],
        f(&s["relay_cpu_s"]),
        f(&s["relay_cpu_us_per_event"]),
        f(&s["relay_peak_rss_mb"])
    );
    let _ = writeln!(m, "For scale: the plain rdkafka producer used {:.2} s of CPU (whole bench process) for the same {} records.\n", f(&d["broker_intake"]["bench_process_cpu_s"]), d["events"]);

    let _ = writeln!(m, "## Plots\n");
    for p in plots {
        let _ = writeln!(m, "![{p}]({p})\n");
    }
    std::fs::write(out.join("report.md"), m)?;
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
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
    let a = Args::parse();
    let events = a
        .events
        .unwrap_or(if a.quick { 200_000 } else { 1_000_000 });
    let cfg = Cfg {
        events,
        latency_rate: a.latency_rate.unwrap_or(5000),
        sustained_secs: a.sustained_secs.unwrap_or(if a.quick { 60 } else { 300 }),
        poll_secs: a.poll_secs.unwrap_or(if a.quick { 20 } else { 60 }),
        clk_tck: sh("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0),
        a,
    };
    std::fs::create_dir_all(&cfg.a.out)?;
    let _ = LINGER_MS.set(cfg.a.linger_ms);
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
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
    let mut report = json!({
        "environment": {
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
        }
    });
    let only: Vec<&str> = cfg.a.only.split(',').map(str::trim).collect();
    let t0 = Instant::now();
    if only.contains(&"drain") {
        scenario_drain(&cfg, &mut report).await?;
    }
    if only.contains(&"pollers") {
        scenario_pollers(&cfg, &mut report).await?;
    }
    if only.contains(&"latency") {
        scenario_latency(&cfg, &mut report).await?;
    }
    if only.contains(&"sustained") {
        scenario_sustained(&cfg, &mut report).await?;
    }
    report["environment"]["loadavg_end"] = json!(loadavg());
    report["environment"]["bench_seconds"] = json!(t0.elapsed().as_secs_f64());
    let plots = write_plots(&cfg.a.out, &report)?;
    std::fs::write(
        cfg.a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    write_markdown(&cfg.a.out, &report, &plots)?;
    log(format!(
        "report written to {} in {:.0} s",
        cfg.a.out.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod render_tests {
    //! Golden test of the report renderer: write_plots and write_markdown on two
    //! synthetic reports must give byte for byte the files in bench/report/testdata.
    //! After an intentional change of the output: BENCH_BLESS=1 cargo test ... and
    //! review the diff of testdata/.
    use super::*;

    fn curve(scale: f64) -> Value {
        json!((0..=20)
            .map(|i| json!([i as f64 * 5.0, scale * 1.37f64.powi(i)]))
            .collect::<Vec<_>>())
    }

    fn lat(p50: f64) -> Value {
        json!({"n": 1000, "p50": p50, "p90": p50 * 1.6, "p99": p50 * 4.1,
               "p999": p50 * 9.3, "max": p50 * 21.7, "mean": p50 * 1.2})
    }

    fn hist(p50: f64) -> Value {
        let mut v = lat(p50);
        v["source"] = json!("histogram");
        v
    }

    fn publisher(rate: u64, p50: f64) -> Value {
        json!({
            "rate_target": rate, "seconds": 30, "writers": 4, "committed": rate * 30,
            "achieved_rate": rate as f64 * 0.9987, "received": rate * 30,
            "verified_in_kafka": rate * 30 + 1, "commit_to_consumer_ms": lat(p50),
            "commit_to_record_timestamp_ms": lat(p50 * -0.1),
            "record_timestamp_type": "CreateTime", "curve": curve(p50 / 3.0),
        })
    }

    fn sustained(full: bool) -> Value {
        let samples: Vec<Value> = (0..37)
            .map(|i| {
                let t = i as f64 * 0.1 + 0.013;
                json!([t, i * 2113, (i % 7) * 1_234_567, 0.05 + (i % 5) as f64 * 0.21])
            })
            .collect();
        let delivery: Vec<Value> = (0..8)
            .map(|i| json!([i as f64 * 0.5 + 0.02, (i % 3) as f64 * 0.33]))
            .collect();
        let per_second: Vec<Value> = (0..3)
            .map(|s| json!({"t": s + 1, "inserts_per_s": 21000 + s * 917,
                            "lag_bytes_max": 7_000_000 + s, "lag_s_max": 0.8 + s as f64 / 10.0}))
            .collect();
        let mut s = json!({
            "baseline_pg_recvlogical": {
                "seconds": 3, "writers": 4, "written": 78_463, "insert_rate": 26146.77,
                "sent_lag_s": lat(0.0004), "sent_lag_bytes": lat(8928.0),
                "cpu_us_per_event": 5.03,
            },
            "sent_lag_s": lat(0.026),
            "max_inflight": 5000.0,
            "seconds": 3, "writers": 4, "written": 65_815,
            "insert_rate": 21920.38,
            "lag_s": lat(0.123), "lag_bytes": lat(2_548_632.0),
            "delivery_lag_s": lat(0.077),
            "delivery_samples": delivery,
            "caught_up_after_stop_s": if full { json!(0.1733) } else { Value::Null },
            "verified_in_kafka": 65_815,
            "relay_cpu_s": 12.81, "relay_cpu_us_per_event": 19.47, "relay_peak_rss_mb": 26.26,
            "per_second": per_second,
            "samples": samples,
        });
        if full {
            s["inflight"] = lat(108.0);
            s["inflight_at_limit_fraction"] = json!(0.0371);
        }
        s
    }

    /// Every section and every optional part present.
    fn full() -> Value {
        let mut relay = publisher(5000, 4.965);
        relay["commit_to_ack_ms"] = hist(4.71);
        relay["relay_cpu_s"] = json!(5.43);
        relay["relay_cpu_us_per_event"] = json!(36.2);
        relay["relay_peak_rss_mb"] = json!(13.05);
        relay["shadow_direct_every"] = json!(10);
        relay["shadow_direct_commit_to_ack_ms"] = lat(6.02);
        relay["shadow_direct_commit_to_ack_bucketed_ms"] = hist(5.64);
        let mut direct = publisher(5000, 4.341);
        direct["commit_to_ack_ms"] = lat(4.07);
        direct["commit_to_ack_bucketed_ms"] = hist(4.02);
        json!({
            "environment": {
                "started_utc": "2026-12-02 19:15", "args": "--events 1000000", "cores": 2,
                "cpu": "Intel(R) Xeon(R) Processor", "shared_machine": true,
                "loadavg_start": "1.95 1.87 1.45", "loadavg_end": "7.78 6.35 3.90",
                "git_head": "8c1dd1f", "src_dirty": true,
                "postgres": "postgres (PostgreSQL) 15.18",
                "kafka": "Apache Kafka 4.3.1 (KRaft, one node)", "librdkafka": "2.12.1",
                "fetch_wait_ms": 1, "linger_ms": 1,
                "relay_args": "--max-inflight 5000", "events": 1_000_000,
                "latency_rate": 5000, "sustained_secs": 3, "poll_secs": 60,
                "bench_seconds": 957.43,
            },
            "drain": {
                "events": 1_000_000, "payload_bytes": 495.89, "wal_bytes": 860_030_408u64,
                "write": {"seconds": 9.4467, "events_per_s": 105857.23},
                "end_lsn": "0/34D45340",
                "pg_recvlogical": {"seconds": 5.0794, "events_per_s": 196874.83},
                "relay": {"seconds": 7.2865, "events_per_s": 137239.6,
                          "verified_in_kafka": 1_000_000, "cpu_s": 5.06,
                          "cpu_us_per_event": 5.06, "peak_rss_mb": 26.41},
                "broker_intake": {"seconds": 3.6448, "events_per_s": 274362.31,
                                  "acked": 1_000_000, "failed": 0,
                                  "bench_process_cpu_s": 3.72, "verified_in_kafka": 1_000_000},
            },
            "pollers": {
                "classic": {"interval_ms": 5000, "batch": 100, "skip_locked": false,
                            "seconds": 60.106, "published": 1200, "events_per_s": 19.96,
                            "verified_in_kafka": 1200},
                "tuned": {"interval_ms": 100, "batch": 500, "skip_locked": true,
                          "seconds": 60.114, "published": 253_000, "events_per_s": 4208.66,
                          "verified_in_kafka": 253_000},
            },
            "latency": {
                "direct": direct,
                "relay": relay,
                "tuned_poller": publisher(2000, 66.39),
                "classic_poller": publisher(10, 2505.35),
            },
            "sustained": sustained(true),
        })
    }

    /// The other side of every optional branch: no pollers, no shadow run, no
    /// in-flight samples, no catch-up, an older environment (nisshi, defaults).
    fn sparse() -> Value {
        let mut relay = publisher(5000, 4.965);
        relay["commit_to_ack_ms"] = hist(4.71);
        let mut direct = publisher(5000, 4.341);
        direct["commit_to_ack_ms"] = lat(4.07);
        json!({
            "environment": {
                "started_utc": "2025-01-01 00:00", "cores": 1,
                "git_head": "abc1234", "src_dirty": false, "nisshi": "nisshi 0.1",
                "fetch_wait_ms": 100, "linger_ms": 5, "relay_args": "",
            },
            "drain": {
                "events": 200_000, "payload_bytes": 495.0, "wal_bytes": 172_000_000u64,
                "write": {"seconds": 2.0, "events_per_s": 100000.0},
                "pg_recvlogical": {"seconds": 1.0, "events_per_s": 200000.0},
                "relay": {"seconds": 1.6, "events_per_s": 125000.0,
                          "verified_in_kafka": 200_000, "cpu_s": 1.0,
                          "cpu_us_per_event": 5.0, "peak_rss_mb": 20.0},
                "broker_intake": {"seconds": 0.8, "events_per_s": 250000.0,
                                  "bench_process_cpu_s": 0.7, "verified_in_kafka": 200_000},
            },
            "latency": {"direct": direct, "relay": relay},
            "sustained": sustained(false),
        })
    }

    fn testdata() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/report/testdata")
    }

    /// Renders `r` into a scratch directory; returns (file name, contents), sorted.
    fn render(name: &str, r: &Value) -> Vec<(String, Vec<u8>)> {
        let out = std::env::temp_dir().join(format!(
            "outbox-bench-render-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let plots = write_plots(&out, r).unwrap();
        write_markdown(&out, r, &plots).unwrap();
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        std::fs::remove_dir_all(&out).unwrap();
        files
    }

    fn golden(name: &str, r: Value) {
        let got = render(name, &r);
        let dir = testdata().join(name);
        if std::env::var_os("BENCH_BLESS").is_some() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (f, body) in &got {
                std::fs::write(dir.join(f), body).unwrap();
            }
            return;
        }
        let mut want: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (BENCH_BLESS=1 writes it)", dir.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        want.sort();
        let names: Vec<&String> = got.iter().map(|g| &g.0).collect();
        assert_eq!(names, want.iter().collect::<Vec<_>>(), "files of {name}");
        for (f, body) in &got {
            let expected = std::fs::read(dir.join(f)).unwrap();
            assert!(
                *body == expected,
                "{name}/{f} differs from {}",
                dir.join(f).display()
            );
        }
    }

    #[test]
    fn renders_full_report_unchanged() {
        golden("full", full());
    }

    #[test]
    fn renders_sparse_report_unchanged() {
        golden("sparse", sparse());
    }

    /// The figures report.json is made of, from fixed inputs: summaries, the
    /// histogram reading, percentile curves, WAL ages and the small parsers.
    fn stats_figures() -> Value {
        let v: Vec<f64> = (1..=997).map(|i| ((i * 7919) % 1009) as f64 / 7.0).collect();
        let hist_text = "# TYPE outbox_commit_to_ack_seconds histogram\n\
            outbox_commit_to_ack_seconds_bucket{le=\"0.001\"} 3\n\
            outbox_commit_to_ack_seconds_bucket{le=\"0.0014142135623730952\"} 40\n\
            outbox_commit_to_ack_seconds_bucket{le=\"0.002\"} 90\n\
            outbox_commit_to_ack_seconds_bucket{le=\"0.0028284271247461905\"} 99\n\
            outbox_commit_to_ack_seconds_bucket{le=\"0.004\"} 99\n\
            outbox_commit_to_ack_seconds_bucket{le=\"+Inf\"} 100\n\
            outbox_inflight_events 4711\n";
        let wal: Vec<(f64, u64)> = (0..20).map(|i| (i as f64 * 0.1, (i * i * 1000) as u64)).collect();
        let args: Vec<String> = ["--max-inflight", "250", "--x"].map(String::from).to_vec();
        let setting = [relay_setting(&args, "--max-inflight"), relay_setting(&args, "--x")];
        let lsn = [fmt_lsn(parse_lsn("1A/2B3C").unwrap()), parse_lsn("0/0").unwrap().to_string()];
        let seq = [parse_seq(b"{\"pad\": \"x\", \"seq\": 12345}"), parse_seq(b"{\"seq\": -1}")];
        let steps = [nice_step(1.0), nice_step(7.3), nice_step(420.0), nice_step(0.012)];
        let nums = [0.0, 0.123, 4.56, 78.9, 1234.0, 56789.0, 1.5e6].map(fmt_num);
        json!({
            "summary": summary(v.clone()),
            "summary_empty": summary(Vec::new()),
            "bucketed": bucketed_summary(&v),
            "histogram": histogram_summary(hist_text, "outbox_commit_to_ack_seconds"),
            "histogram_missing": histogram_summary(hist_text, "nope"),
            "curve": pct_curve(&v),
            "wal_age": (0..20).map(|i| wal_age(&wal, i, (i * 700) as u64)).collect::<Vec<_>>(),
            "metric": metric_value(hist_text, "outbox_inflight_events"),
            "setting": setting,
            "lsn": lsn,
            "conninfo": conninfo("postgres://bench@127.0.0.1:55470/bench_drain"),
            "seq": seq,
            "nice_step": steps,
            "fmt_num": nums,
        })
    }

    #[test]
    fn stats_figures_unchanged() {
        let got = serde_json::to_string_pretty(&stats_figures()).unwrap() + "\n";
        let path = testdata().join("stats.json");
        if std::env::var_os("BENCH_BLESS").is_some() {
            std::fs::write(&path, &got).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap();
        assert!(got == want, "stats figures differ from {}", path.display());
    }

    /// Re-renders a saved report.json (BENCH_REPORT_JSON) into BENCH_RENDER_OUT:
    /// `cargo test --features bench --bin outbox-bench -- --ignored rerender`.
    #[test]
    #[ignore]
    fn rerender_saved_report() {
        let src = std::env::var("BENCH_REPORT_JSON").expect("BENCH_REPORT_JSON");
        let out = PathBuf::from(std::env::var("BENCH_RENDER_OUT").expect("BENCH_RENDER_OUT"));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let plots = write_plots(&out, &r).unwrap();
        write_markdown(&out, &r, &plots).unwrap();
    }
}
