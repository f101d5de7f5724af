//! Kafka for tests: topics created with the partitions a test needs, records
//! read back from the beginning to the high watermark (so duplicates show),
//! and an Apache Kafka of a test's own, for what the shared stack's cannot
//! do: be killed and restarted, sit behind the fault proxy, speak only TLS or
//! SASL, or be three nodes. That one is started by `scripts/stack kafka`, so
//! the tests and the stack share one node configuration, and is stopped and
//! removed on drop (kept when the test failed: its log dirs and server.log
//! are the evidence).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, Timestamp, TopicPartitionList};

use outbox_relay::pipeline::sink::read_back::KafkaRecord;

use super::{brokers, unique};

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
    create_topics_with(brokers, topics, partitions, replicas, &[]).await
}

/// Topics with topic settings of their own (`max.message.bytes`, say).
pub async fn create_topics_with(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    replicas: i32,
    config: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            config.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(replicas)),
                |n, (k, v)| n.set(k, v),
            )
        })
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

/// One record read back from the broker: the relay's own read-back copy
/// (topic, partition, offset, key, payload, headers), and its timestamp.
#[derive(Debug, Clone)]
pub struct Record {
    pub record: KafkaRecord,
    /// The record's timestamp: (ms since the epoch, "CreateTime" or
    /// "LogAppendTime"), None when the record has none.
    pub timestamp: Option<(i64, &'static str)>,
}

impl std::ops::Deref for Record {
    type Target = KafkaRecord;

    fn deref(&self) -> &KafkaRecord {
        &self.record
    }
}

impl std::ops::DerefMut for Record {
    fn deref_mut(&mut self) -> &mut KafkaRecord {
        &mut self.record
    }
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
    match consume_or_timeout(brokers, topics, at_least, timeout).await {
        Ok(records) => records,
        Err((why, _)) => panic!("{why}"),
    }
}

/// [`consume`] that, on a timeout, hands back what did arrive with the
/// reason, so a test can say which events are missing and whether the
/// partitions' offsets have a hole (the reader skipped) or not (the broker
/// never had them).
pub async fn consume_or_timeout(
    brokers: &str,
    topics: &[String],
    at_least: usize,
    timeout: Duration,
) -> Result<Vec<Record>, (String, Vec<Record>)> {
    let brokers = brokers.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || consume_blocking(&brokers, &topics, at_least, timeout))
        .await
        .unwrap()
}

/// Per partition: how many records were read, the offsets' range, and the
/// holes in it (offsets never handed out: commit markers, or records the
/// reader skipped).
pub fn offset_summary(records: &[Record]) -> String {
    let mut per: std::collections::BTreeMap<(&str, i32), Vec<i64>> = Default::default();
    for r in records {
        per.entry((&r.topic, r.partition))
            .or_default()
            .push(r.offset);
    }
    let mut out = String::new();
    for ((t, p), mut offsets) in per {
        offsets.sort_unstable();
        let holes: Vec<i64> = offsets
            .windows(2)
            .filter(|w| w[1] > w[0] + 1)
            .map(|w| w[0] + 1)
            .collect();
        out.push_str(&format!(
            "\n  {t}[{p}]: {} records, offsets {}..={}, holes after {:?}",
            offsets.len(),
            offsets[0],
            offsets[offsets.len() - 1],
            holes
        ));
    }
    out
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
) -> Result<Vec<Record>, (String, Vec<Record>)> {
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
                record: KafkaRecord::of(&m),
                timestamp: match m.timestamp() {
                    Timestamp::CreateTime(t) => Some((t, "CreateTime")),
                    Timestamp::LogAppendTime(t) => Some((t, "LogAppendTime")),
                    Timestamp::NotAvailable => None,
                },
            });
        }
        if records.len() >= at_least && partitions.len() == topics.len() {
            // Read on to the high watermarks so duplicates are seen too.
            let mut behind = false;
            // The consumer's position, not the last record's offset: in a
            // transactional topic the last offsets are commit markers, which
            // are never handed out but which the position passes.
            let positions = consumer.position().expect("positions");
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
                    let position = positions
                        .find_partition(t, p)
                        .and_then(|e| e.offset().to_raw())
                        .unwrap_or(0);
                    behind |= seen.max(position) < high;
                }
            }
            if !behind {
                return Ok(records);
            }
        }
        if Instant::now() > deadline {
            let why = format!(
                "timed out after {timeout:?}: {} of at least {at_least} records read from {topics:?} (partitions known: {partitions:?}){}",
                records.len(),
                offset_summary(&records)
            );
            return Err((why, records));
        }
    }
}

// ---------------------------------------------------------------------------
// A Kafka of the test's own.

/// The stack script of this checkout.
pub fn stack_script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack")
}

/// Runs `scripts/stack ARGS`, and returns its stdout; panics with its output
/// when it fails.
fn stack(args: &[String]) -> String {
    super::run_ok(
        Command::new(stack_script()).args(args),
        &format!("scripts/stack {args:?}"),
    )
}

async fn stack_async(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || stack(&args))
        .await
        .expect("scripts/stack task")
}

/// `n` loopback ports free right now, all different (bound together, then
/// released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let socks: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    socks
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect()
}

fn port_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// How to start one.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    nodes: usize,
    ports: Option<Vec<u16>>,
    advertised: Option<Vec<u16>>,
    protocol: String,
    config: Vec<String>,
    scram: Vec<(String, String)>,
}

impl KafkaOptions {
    /// 1 (the default) or 3 combined broker+controller nodes; with 3, topics
    /// are replicated 3 times with `min.insync.replicas=2`.
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// The client ports to listen on, one per node.
    pub fn ports(mut self, ports: &[u16]) -> Self {
        self.ports = Some(ports.to_vec());
        self
    }

    /// The client ports advertised in metadata (a proxy in between), one per
    /// node. Clients connect to these after bootstrap.
    pub fn advertise(mut self, ports: &[u16]) -> Self {
        self.advertised = Some(ports.to_vec());
        self
    }

    /// The client listener's security protocol: PLAINTEXT, SSL or SASL_SSL.
    pub fn protocol(mut self, p: &str) -> Self {
        self.protocol = p.to_string();
        self
    }

    /// A line for every node's server.properties.
    pub fn config(mut self, line: impl Into<String>) -> Self {
        self.config.push(line.into());
        self
    }

    /// A SCRAM-SHA-512 user, written when the storage is formatted.
    pub fn scram(mut self, user: &str, password: &str) -> Self {
        self.scram.push((user.to_string(), password.to_string()));
        self
    }

    pub async fn start(self) -> Kafka {
        let dir = std::env::temp_dir().join(super::unique("kafka"));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = self.ports.unwrap_or_else(|| free_ports(self.nodes));
        let advertised = self.advertised.unwrap_or_else(|| ports.clone());
        assert_eq!(ports.len(), self.nodes, "one client port per node");
        assert_eq!(advertised.len(), self.nodes, "one advertised port per node");
        let mut args: Vec<String> = vec![
            "kafka".into(),
            "up".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--nodes".into(),
            self.nodes.to_string(),
            "--port".into(),
            port_list(&ports),
            "--advertise-port".into(),
            port_list(&advertised),
            "--protocol".into(),
            self.protocol.clone(),
        ];
        if !self.config.is_empty() {
            let file = dir.join("extra.properties");
            std::fs::write(&file, self.config.join("\n") + "\n").unwrap();
            args.extend(["--config".into(), file.display().to_string()]);
        }
        for (u, p) in &self.scram {
            args.extend(["--scram".into(), format!("{u}={p}")]);
        }
        let kafka = Kafka {
            dir,
            nodes: self.nodes,
            advertised,
        };
        stack_async(args).await;
        kafka
    }
}

/// A running Kafka of the test's own.
pub struct Kafka {
    pub dir: PathBuf,
    pub nodes: usize,
    advertised: Vec<u16>,
}

impl Kafka {
    pub fn options() -> KafkaOptions {
        KafkaOptions {
            nodes: 1,
            ports: None,
            advertised: None,
            protocol: "PLAINTEXT".into(),
            config: Vec::new(),
            scram: Vec::new(),
        }
    }

    /// One plaintext node on `port`.
    pub async fn start(port: u16) -> Kafka {
        Kafka::options().ports(&[port]).start().await
    }

    /// One plaintext node listening on `listen` that advertises `advertised`:
    /// with a proxy from `advertised` to `listen`, every connection a client
    /// makes after bootstrap goes through the proxy.
    pub async fn behind_proxy(listen: u16, advertised: u16) -> Kafka {
        Kafka::options()
            .ports(&[listen])
            .advertise(&[advertised])
            .start()
            .await
    }

    /// Bootstrap list for clients: the advertised addresses.
    pub fn brokers(&self) -> String {
        self.advertised
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node_args(&self, verb: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "kafka".into(),
            "node".into(),
            "--dir".into(),
            self.dir.display().to_string(),
        ];
        args.extend(verb.iter().map(|s| s.to_string()));
        args
    }

    /// Kafka's topic tool (`kafka-topics.sh` arguments) over the nodes'
    /// internal listener, which works while a node is down: replica
    /// assignments, topic settings, partitions added.
    pub fn topic_tool(&self, args: &[&str]) -> String {
        let dir = self.dir.display().to_string();
        let mut all = vec!["kafka", "topics", "--dir", &dir, "--"];
        all.extend_from_slice(args);
        stack(&all.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// SIGKILL node `n` (1-based) and wait until it is gone.
    pub fn kill(&self, n: usize) {
        stack(&self.node_args(&["stop", &n.to_string(), "--kill"]));
    }

    /// SIGTERM node `n` (a controlled shutdown) and wait until it is gone.
    pub fn stop(&self, n: usize) {
        stack(&self.node_args(&["stop", &n.to_string()]));
    }

    /// Start node `n` again on its ports and log dirs, and wait until it
    /// serves. `wait: false` when it cannot serve alone (no quorum yet).
    pub async fn start_node(&self, n: usize, wait: bool) {
        let mut verb = vec!["start".to_string(), n.to_string()];
        if !wait {
            verb.push("--no-wait".into());
        }
        let refs: Vec<&str> = verb.iter().map(String::as_str).collect();
        stack_async(self.node_args(&refs)).await;
    }

    /// SIGKILL node `n`, then start it again.
    pub async fn restart(&self, n: usize) {
        self.kill(n);
        self.start_node(n, true).await;
    }

    /// The node that leads `topic`'s `partition`.
    pub fn leader(&self, topic: &str, partition: i32) -> usize {
        let out = stack(&self.node_args(&["leader", topic, &partition.to_string()]));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no leader for {topic}/{partition}: {out:?}"))
    }

    /// Node `n`'s server.log.
    pub fn log_text(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node{n}/server.log"))).unwrap_or_default()
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let keep = std::thread::panicking();
        let mut args = vec![
            "kafka".to_string(),
            "down".into(),
            "--dir".into(),
            self.dir.display().to_string(),
        ];
        if keep {
            args.push("--keep".into());
            eprintln!(
                "the test's Kafka (log dirs, server.log) kept in {}",
                self.dir.display()
            );
        }
        // Never a second panic while unwinding.
        let _ = Command::new(stack_script()).args(&args).output();
    }
}

/// Kafka's default partitioner (murmur2, as the Java client computes it).
pub fn murmur2_partition(key: &[u8], partitions: u32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let chunks = key.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions) as i32
}
