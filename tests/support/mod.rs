//! Test support: real Postgres and a real Kafka-protocol broker, started by
//! `scripts/stack up` (or `scripts/test`), plus the relay binary as a child
//! process so that SIGTERM and SIGKILL are real.
//!
//! Each test gets its own database (slots and publications are per database)
//! and its own topic names, so tests share the services but not state.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::lsn::Lsn;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the local Postgres and broker. \
             Run them with scripts/test, or `scripts/stack up && source $OUTBOX_RELAY_STACK_DIR/env` first"
        )
    })
}

/// Admin URL of the test cluster (a superuser on the `postgres` database).
pub fn admin_url() -> String {
    env("OUTBOX_RELAY_DATABASE_URL")
}

pub fn brokers() -> String {
    env("OUTBOX_RELAY_KAFKA_BROKERS")
}

/// A name unique to this test run, usable in SQL and topic names.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

pub async fn sql_client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own, dropped (with its slots) when the test ends well.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

pub const CLASSIC_TABLE: &str = include_str!("../../sql/01_outbox_classic.sql");
pub const DEBEZIUM_TABLE: &str = include_str!("../../sql/02_outbox_debezium.sql");

impl TestDb {
    pub async fn new(name: &str) -> TestDb {
        let admin = sql_client(&admin_url()).await;
        let db = unique(name).to_lowercase();
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        let base = admin_url();
        let url = match base.rfind('/') {
            Some(i) if !base[..i].ends_with('/') => format!("{}/{db}", &base[..i]),
            _ => panic!("OUTBOX_RELAY_DATABASE_URL must end in /dbname: {base}"),
        };
        let client = sql_client(&url).await;
        TestDb {
            name: db,
            url,
            client,
        }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    pub async fn lsn(&self, sql: &str) -> Lsn {
        let s: String = self.client.query_one(sql, &[]).await.unwrap().get(0);
        s.parse().unwrap()
    }

    pub async fn current_wal_lsn(&self) -> Lsn {
        self.lsn("SELECT pg_current_wal_lsn()::text").await
    }

    pub async fn confirmed_flush_lsn(&self, slot: &str) -> Lsn {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        row.get::<_, String>(0).parse().unwrap()
    }

    /// The walsender's sent position for the slot, if it is streaming.
    pub async fn sent_lsn(&self, slot: &str) -> Option<Lsn> {
        let row = self
            .client
            .query_opt(
                "SELECT r.sent_lsn::text FROM pg_stat_replication r
                   JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok())
    }

    pub async fn slot_active(&self, slot: &str) -> bool {
        self.client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
    }

    /// Creates the classic outbox table, and its publication and a slot
    /// named after the database through `outbox-relay setup`; returns the slot.
    pub async fn classic_outbox(&self) -> String {
        self.exec(CLASSIC_TABLE).await;
        let slot = format!("s_{}", self.name);
        relay_setup(&["--database-url", &self.url, "--slot", &slot]);
        slot
    }

    /// Waits until a walsender holds `slot`: changes written after this are
    /// streamed to the relay, not just left in the WAL.
    pub async fn wait_streaming(&self, slot: &str) {
        wait_until(Duration::from_secs(30), "streaming", || async {
            self.slot_active(slot).await
        })
        .await;
    }

    /// Waits until the slot's confirmed_flush_lsn reaches `lsn`.
    /// Asserts that the slot has not confirmed a transaction that must not
    /// be: its row was inserted after `before` and its COMMIT returned at
    /// `after`. The bound is `after`, not `before`: a keepalive may report a
    /// position inside the transaction before the relay reads it, and
    /// confirming that is safe, since a transaction whose commit comes after
    /// the confirmed position is sent again.
    pub async fn assert_not_confirmed(&self, slot: &str, before: Lsn, after: Lsn, what: &str) {
        let confirmed = self.confirmed_flush_lsn(slot).await;
        assert!(
            confirmed < after,
            "slot confirmed {confirmed} past {what} (inserted between {before} and {after})"
        );
    }

    /// [`TestDb::assert_not_confirmed`] every 100 ms for 3 s: several status
    /// intervals of a relay that keeps running.
    pub async fn assert_not_confirmed_for_a_while(
        &self,
        slot: &str,
        before: Lsn,
        after: Lsn,
        what: &str,
    ) {
        for _ in 0..30 {
            self.assert_not_confirmed(slot, before, after, what).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_confirmed(&self, slot: &str, lsn: Lsn, what: &str) {
        wait_until(Duration::from_secs(30), what, || async {
            self.confirmed_flush_lsn(slot).await >= lsn
        })
        .await;
    }

    pub async fn drop(self) {
        drop(self.client);
        let admin = sql_client(&admin_url()).await;
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{0}' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}' AND NOT active;",
                self.name
            ))
            .await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay binary under test: this build's, or OUTBOX_RELAY_TEST_BIN (to
/// run the suite against another build, such as a release binary or an
/// older commit, to show that a test fails without its fix).
pub fn relay_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("OUTBOX_RELAY_TEST_BIN") {
        return PathBuf::from(bin);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// Runs `outbox-relay <args>` to completion: (exit code, stdout, stderr).
pub fn relay_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(relay_bin())
        .args(args)
        .env_remove("OUTBOX_RELAY_DATABASE_URL")
        .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
        // Tests run relays side by side: never the fixed default port.
        .env("OUTBOX_RELAY_HTTP_ADDRESS", "127.0.0.1:0")
        .output()
        .expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `outbox-relay setup <args>`, which must succeed.
pub fn relay_setup(args: &[&str]) {
    let mut all = vec!["setup"];
    all.extend_from_slice(args);
    let (code, out, err) = relay_cmd(&all);
    assert_eq!(code, 0, "setup {args:?} failed: {out}{err}");
}

/// The relay as a child process; killed when dropped. Its log (stderr) and
/// its announcements (stdout, one JSON object per line) go to files.
pub struct Relay {
    child: Child,
    pub log: PathBuf,
    pub out: PathBuf,
}

impl Relay {
    pub fn start(args: &[String]) -> Relay {
        let name = unique("relay");
        let log = std::env::temp_dir().join(format!("{name}.relay.log"));
        let out = std::env::temp_dir().join(format!("{name}.relay.out"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(relay_bin())
            .arg("run")
            .args(args)
            .env_remove("OUTBOX_RELAY_DATABASE_URL")
            .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
            .env("OUTBOX_RELAY_LOG", "info,outbox_relay=debug")
            .env("OUTBOX_RELAY_HTTP_ADDRESS", "127.0.0.1:0")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn outbox-relay");
        Relay { child, log, out }
    }

    /// The relay's announcements so far (`outbox_relay::observe::announce`), with
    /// the given `event`.
    pub fn announced(&self, event: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// The positions the relay's sessions resumed from, oldest first: one
    /// per session that started streaming.
    pub fn resumed_from(&self) -> Vec<Lsn> {
        self.announced("streaming")
            .iter()
            .filter_map(|v| v["resume_from"].as_str()?.parse().ok())
            .collect()
    }

    /// The bad-event kind of the relay's `stopped` line (Some(None) when it
    /// stopped for another reason; None when it has not said it stopped).
    pub fn stopped_for(&self) -> Option<Option<String>> {
        self.announced("stopped")
            .last()
            .map(|v| v["bad_event_kind"].as_str().map(str::to_string))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns the exit code (None when killed by a signal).
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "relay did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: the relay must finish its in-flight work and exit 0.
    pub async fn terminate(&mut self) {
        self.signal("TERM");
        assert_eq!(
            self.wait(Duration::from_secs(30)).await,
            Some(0),
            "exit after SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    /// The address of the relay's HTTP endpoint, once it announced it.
    pub async fn http_address(&self) -> String {
        let mut found = None;
        wait_until(
            Duration::from_secs(30),
            "the HTTP endpoint to listen",
            || {
                found = self
                    .announced("http_listening")
                    .first()
                    .and_then(|v| v["address"].as_str().map(String::from));
                let ok = found.is_some();
                async move { ok }
            },
        )
        .await;
        found.unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The relay's peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the relay's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc status")
            * 1024
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard relay arguments for a test database.
pub fn relay_args(db: &TestDb, brokers: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--database-url".to_string(),
        db.url.clone(),
        "--kafka-brokers".to_string(),
        brokers.to_string(),
        "--status-interval".to_string(),
        "1".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) {
    create_replicated_topics(brokers, topics, partitions, 1).await
}

/// Topics with `replicas` copies of each partition (3 on a three-node Kafka).
pub async fn create_replicated_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    replicas: i32,
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replicas)))
        .collect();
    let res = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in res {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("create topic {t}: {e}");
            }
        }
    }
}

/// One record read back from the broker.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().expect("payload")).expect("payload is JSON")
    }
}

/// The number in each record's payload `field`, in offset order: for one
/// partition, the order in which the records were written.
pub fn payload_numbers_by_offset(records: &[Record], field: &str) -> Vec<u64> {
    let mut ns: Vec<(i64, u64)> = records
        .iter()
        .map(|r| {
            (
                r.offset,
                r.payload_json()[field].as_u64().expect("a number"),
            )
        })
        .collect();
    ns.sort();
    ns.into_iter().map(|(_, n)| n).collect()
}

/// Reads every record of `topics` from the beginning until at least
/// `at_least` arrived and every partition is read to its high watermark.
pub async fn consume(
    brokers: &str,
    topics: &[String],
    at_least: usize,
    timeout: Duration,
) -> Vec<Record> {
    let brokers = brokers.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || consume_blocking(&brokers, &topics, at_least, timeout))
        .await
        .unwrap()
}

/// [`consume`] of one topic of the shared broker, waiting up to 60 s.
pub async fn consume_topic(topic: &str, at_least: usize) -> Vec<Record> {
    consume(
        &brokers(),
        &[topic.to_string()],
        at_least,
        Duration::from_secs(60),
    )
    .await
}

fn consume_blocking(
    brokers: &str,
    topics: &[String],
    at_least: usize,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("test"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    // Topics may not exist yet (auto-created on first produce): retry metadata.
    let mut partitions: HashMap<String, i32> = HashMap::new();
    let mut records = Vec::new();
    let mut assigned = 0;
    loop {
        for t in topics {
            if partitions.contains_key(t) {
                continue;
            }
            if let Ok(md) = consumer.fetch_metadata(Some(t), Duration::from_secs(2)) {
                if let Some(mt) = md.topics().first() {
                    if mt.error().is_none() && !mt.partitions().is_empty() {
                        partitions.insert(t.clone(), mt.partitions().len() as i32);
                    }
                }
            }
        }
        if partitions.len() != assigned {
            let mut tpl = TopicPartitionList::new();
            for (t, n) in &partitions {
                for p in 0..*n {
                    tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
                }
            }
            consumer.assign(&tpl).expect("assign");
            assigned = partitions.len();
            records.clear();
        }
        while let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("consume");
            records.push(Record {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        if records.len() >= at_least && partitions.len() == topics.len() {
            // Read on to the high watermarks so duplicates are seen too.
            let mut behind = false;
            for (t, n) in &partitions {
                for p in 0..*n {
                    let (_, high) = consumer
                        .fetch_watermarks(t, p, Duration::from_secs(5))
                        .expect("watermarks");
                    let seen = records
                        .iter()
                        .filter(|r| &r.topic == t && r.partition == p)
                        .map(|r| r.offset + 1)
                        .max()
                        .unwrap_or(0);
                    behind |= seen < high;
                }
            }
            if !behind {
                return records;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?}: {} of at least {at_least} records read from {topics:?} (partitions known: {partitions:?})",
                records.len()
            );
        }
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway Postgres cluster of the test's own, for what the shared one
/// cannot vary (pg_hba.conf, server settings). Stopped and removed on drop.
pub struct TempCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl TempCluster {
    /// `hba` lines are put before the default trust rules.
    pub fn start(hba: &[&str], settings: &[&str]) -> TempCluster {
        let bin = PathBuf::from(env("PG_BIN_DIR"));
        let dir = std::env::temp_dir().join(unique("pgtmp"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let run = |args: Vec<String>| {
            let is_root = Command::new("id")
                .arg("-u")
                .output()
                .map(|o| o.stdout == b"0\n")
                .unwrap_or(false);
            let status = if is_root {
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .args(&args)
                    .status()
            } else {
                Command::new(&args[0]).args(&args[1..]).status()
            }
            .unwrap();
            assert!(status.success(), "{args:?}");
        };
        let _ = Command::new("chown")
            .args(["postgres", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        run(vec![
            bin.join("initdb").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-U".into(),
            "postgres".into(),
            "--auth=trust".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C.UTF-8".into(),
            "--no-sync".into(),
        ]);
        let hba_path = data.join("pg_hba.conf");
        let default = std::fs::read_to_string(&hba_path).unwrap();
        std::fs::write(&hba_path, format!("{}\n{}", hba.join("\n"), default)).unwrap();
        let mut opts = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical -c fsync=off",
            data.display()
        );
        for s in settings {
            opts.push_str(&format!(" -c {s}"));
        }
        run(vec![
            bin.join("pg_ctl").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-w".into(),
            "-l".into(),
            dir.join("pg.log").display().to_string(),
            "-o".into(),
            opts,
            "start".into(),
        ]);
        TempCluster { dir, port, bin }
    }

    pub fn url(&self, user: &str, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("postgres://{user}:{p}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://{user}@127.0.0.1:{}/postgres", self.port),
        }
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &pg_ctl,
                "-D",
                &data,
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .or_else(|_| {
                Command::new(&pg_ctl)
                    .args(["-D", &data, "-m", "immediate", "stop"])
                    .status()
            });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP/1.0 GET: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP endpoint");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line of a Prometheus exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l[sample.len()..].trim().parse().ok())
}

pub mod certs;
pub mod kafka;
#[allow(unused_imports)]
pub use kafka::Kafka;

// ---------------------------------------------------------------------------
// Fault injection (tests/faults.rs): a TCP fault proxy, a broker of the test's
// own that can be killed and restarted on its port with persistent storage,
// and restarts of a TempCluster.

pub mod proxy;

/// The database URL with its host:port replaced by `addr` (a proxy's).
pub fn via(url: &str, addr: &str) -> String {
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    let port = cfg.get_ports()[0];
    let from = format!("127.0.0.1:{port}");
    assert!(url.contains(&from), "{url} does not name {from}");
    url.replace(&from, addr)
}

/// The loopback address of the database the URL names.
pub fn pg_addr(url: &str) -> std::net::SocketAddr {
    let cfg: tokio_postgres::Config = url.parse().unwrap();
    format!("127.0.0.1:{}", cfg.get_ports()[0]).parse().unwrap()
}

/// Runs a Postgres binary as `postgres` when we are root (initdb, pg_ctl and
/// the server refuse root); returns whether it succeeded.
fn run_as_postgres(program: &std::path::Path, args: &[String]) -> bool {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl TempCluster {
    /// `pg_ctl restart -m <mode>` (`fast`: a clean shutdown; `immediate`: a
    /// crash). Same port and settings. Blocks until the server accepts
    /// connections again. Either way a logical slot may come back at an
    /// older confirmed position than its consumer reported: PostgreSQL
    /// before 17 writes the slot to disk only when more than that changed.
    pub fn restart(&self, mode: &str) {
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("pg.log").display().to_string();
        let ok = run_as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D".into(),
                data,
                "-w".into(),
                "-t".into(),
                "60".into(),
                "-m".into(),
                mode.into(),
                "-l".into(),
                log,
                "restart".into(),
            ],
        );
        assert!(
            ok,
            "pg_ctl restart -m {mode} failed; log in {}",
            self.dir.display()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("pg.log")).unwrap_or_default()
    }
}
