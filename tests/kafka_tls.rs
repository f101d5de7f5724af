//! TLS (and SASL/SCRAM) to Kafka: librdkafka is built with OpenSSL
//! (rdkafka's `ssl-vendored` feature), so `--kafka-property
//! security.protocol=ssl|sasl_ssl|sasl_plaintext` works. Proved against a
//! nisshi broker of the test's own whose listener accepts only TLS
//! (`--cert`/`--key`), with a CA and server certificate made by the openssl
//! CLI (support::certs): events arrive when the relay trusts the CA, and
//! stay in flight (the slot does not move past them) when it does not.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::sink::KafkaSink;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use support::certs::Pki;
use support::*;

fn props(kv: &[(&str, &str)]) -> Vec<(String, String)> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Needs no broker and no database: the producer configuration accepts the
/// TLS and SASL/SCRAM properties. Without OpenSSL in librdkafka this fails
/// with `Unsupported value "ssl" for configuration property
/// "security.protocol": OpenSSL not available at build time`.
#[test]
fn producer_accepts_tls_and_sasl_scram_properties() {
    for p in [
        props(&[("security.protocol", "ssl")]),
        props(&[
            ("security.protocol", "SSL"),
            ("ssl.endpoint.identification.algorithm", "https"),
            ("ssl.ca.location", "probe"),
        ]),
        props(&[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "relay"),
            ("sasl.password", "secret"),
        ]),
        props(&[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", "relay"),
            ("sasl.password", "secret"),
        ]),
        props(&[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "relay"),
            ("sasl.password", "secret"),
        ]),
    ] {
        if let Err(e) = KafkaSink::new("127.0.0.1:1", &p) {
            panic!("{p:?} refused: {e}");
        }
    }
    // GSSAPI (Kerberos) needs Cyrus SASL, which is not built in.
    assert!(KafkaSink::new(
        "127.0.0.1:1",
        &props(&[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "GSSAPI")
        ])
    )
    .is_err());
}

/// A nisshi broker whose listener accepts only TLS connections.
struct TlsBroker {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl TlsBroker {
    async fn start(pki: &Pki) -> TlsBroker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = pki.dir.join("broker.log");
        let child = Command::new(nisshi_bin())
            .args([
                "broker",
                "--storage-engine",
                "memory://nisshi/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--group-initial-rebalance-delay",
                "0s",
                "--cert",
                &pki.path("server.crt"),
                "--key",
                &pki.path("server.key"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn nisshi");
        let broker = TlsBroker { child, port, log };
        wait_until(
            Duration::from_secs(30),
            "the TLS broker to listen",
            || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() },
        )
        .await;
        broker
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_config(brokers: &str, ca: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca);
    cfg
}

async fn create_tls_topic(brokers: &str, ca: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        tls_config(brokers, ca).create().expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics over TLS");
    for r in res {
        if let Err((t, e)) = r {
            panic!("create topic {t}: {e}");
        }
    }
}

/// Reads `topic` over TLS from the beginning until `n` records arrived:
/// (key, id header) of each.
fn consume_tls(
    brokers: &str,
    ca: &str,
    topic: &str,
    partitions: i32,
    n: usize,
    timeout: Duration,
) -> Vec<(String, String)> {
    let consumer: BaseConsumer = tls_config(brokers, ca)
        .set("group.id", unique("tls"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {n} records read over TLS",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("consume over TLS");
            let id = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "id"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .expect("id header");
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            out.push((key, id));
        }
    }
    out
}

async fn insert_events(db: &TestDb, topic: &str, n: usize) {
    let mut sql = String::from("BEGIN;");
    for i in 0..n {
        sql.push_str(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('{topic}', 'agg-{}', '{{\"seq\": {i}}}');",
            i % 3
        ));
    }
    sql.push_str("COMMIT;");
    db.exec(&sql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_over_tls_when_the_relay_trusts_the_broker_ca() {
    let pki = Pki::new();
    let broker = TlsBroker::start(&pki).await;
    let ca = pki.path("ca.crt");

    // The listener is TLS only: a plaintext client gets no metadata.
    let plain: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .unwrap();
    assert!(
        plain.fetch_metadata(None, Duration::from_secs(3)).is_err(),
        "a plaintext client must not get through a TLS-only listener"
    );

    let db = TestDb::new("kafka_tls_ok").await;
    let slot = db.classic_outbox().await;
    let topic = unique("tls_ok");
    create_tls_topic(&broker.brokers(), &ca, &topic, 2).await;
    let mut relay = Relay::start(&relay_args(
        &db,
        &broker.brokers(),
        &[
            "--slot",
            &slot,
            "--topic",
            "{event_type}",
            "--kafka-property",
            "security.protocol=ssl",
            "--kafka-property",
            &format!("ssl.ca.location={ca}"),
        ],
    ));
    insert_events(&db, &topic, 25).await;
    let after = db.current_wal_lsn().await;

    let (brokers, ca2, t) = (broker.brokers(), ca.clone(), topic.clone());
    let records = tokio::task::spawn_blocking(move || {
        consume_tls(&brokers, &ca2, &t, 2, 25, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let expected: Vec<String> = db
        .client
        .query("SELECT event_id::text FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut got: Vec<String> = records.iter().map(|(_, id)| id.clone()).collect();
    let mut want = expected.clone();
    got.sort();
    want.sort();
    assert_eq!(
        got,
        want,
        "every event once, over TLS; broker log:\n{}",
        broker.log_text()
    );

    db.wait_confirmed(
        &slot,
        after,
        "confirmed_flush_lsn to pass the commit delivered over TLS",
    )
    .await;
    assert!(relay.is_running(), "relay died: {}", relay.log_text());
    relay.terminate().await;
    drop(broker);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wrong_ca_nothing_is_delivered_and_the_slot_holds() {
    let pki = Pki::new();
    let broker = TlsBroker::start(&pki).await;
    let db = TestDb::new("kafka_tls_bad_ca").await;
    let slot = db.classic_outbox().await;
    let topic = unique("tls_bad");
    create_tls_topic(&broker.brokers(), &pki.path("ca.crt"), &topic, 1).await;
    let mut relay = Relay::start(&relay_args(
        &db,
        &broker.brokers(),
        &[
            "--slot",
            &slot,
            "--topic",
            "{event_type}",
            "--kafka-property",
            "security.protocol=ssl",
            "--kafka-property",
            &format!("ssl.ca.location={}", pki.path("other_ca.crt")),
        ],
    ));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;

    let before = db.current_wal_lsn().await;
    insert_events(&db, &topic, 10).await;
    let after = db.current_wal_lsn().await;
    wait_until(
        Duration::from_secs(30),
        "the walsender to send the events",
        || async { db.sent_lsn(&slot).await.is_some_and(|s| s >= after) },
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the events to be counted in flight",
        || async {
            metric(
                &http_get(&addr, "/metrics").await.1,
                "outbox_inflight_events",
            )
            .is_some_and(|v| v == 10.0)
        },
    )
    .await;
    // Several status intervals pass: nothing delivered, nothing confirmed
    // past the commit.
    db.assert_not_confirmed_for_a_while(&slot, before, after, "events the broker never got")
        .await;
    let text = http_get(&addr, "/metrics").await.1;
    assert_eq!(
        metric(&text, "outbox_inflight_events"),
        Some(10.0),
        "{text}"
    );
    assert!(relay.is_running(), "relay died: {}", relay.log_text());
    let log = relay.log_text();
    assert!(
        log.contains("certificate verify failed"),
        "the relay names the certificate problem:\n{log}"
    );
    // Nothing reached the topic.
    let (brokers, ca, t) = (broker.brokers(), pki.path("ca.crt"), topic.clone());
    let high = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = tls_config(&brokers, &ca).create().unwrap();
        c.fetch_watermarks(&t, 0, Duration::from_secs(10))
            .expect("watermarks")
            .1
    })
    .await
    .unwrap();
    assert_eq!(high, 0, "no record was delivered with the wrong CA");
    // A SIGTERM would wait for the in-flight deliveries (message.timeout.ms):
    // the relay is killed when dropped.
    drop(relay);
    db.drop().await;
}

fn nisshi(args: &[&str]) {
    let out = Command::new(nisshi_bin())
        .args(args)
        .output()
        .expect("run nisshi");
    assert!(
        out.status.success(),
        "nisshi {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SASL/SCRAM-SHA-512 over TLS (`security.protocol=sasl_ssl`). nisshi keeps
/// SCRAM credentials in its storage and, once `--authentication` is on,
/// refuses every request before authentication, user creation included: the
/// user is created on a plain broker over a sqlite file, which the
/// authenticating TLS broker then opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_over_sasl_ssl_with_scram_sha_512() {
    let pki = Pki::new();
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    // A path relative to the broker's working directory, as OwnBroker does.
    let storage = "sqlite://broker.db".to_string();
    let spawn = |extra: &[&str]| {
        let mut args = vec![
            "broker".to_string(),
            "--storage-engine".into(),
            storage.clone(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            url.clone(),
            "--group-initial-rebalance-delay".into(),
            "0s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(nisshi_bin())
            .current_dir(&pki.dir)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(pki.dir.join("broker.log"))
                    .unwrap(),
            )
            .spawn()
            .expect("spawn nisshi")
    };
    let listening = || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() };
    let broker_log = || std::fs::read_to_string(pki.dir.join("broker.log")).unwrap_or_default();

    let mut plain = spawn(&[]);
    wait_until(Duration::from_secs(30), "the plain broker", listening).await;
    assert!(plain.try_wait().unwrap().is_none(), "{}", broker_log());
    nisshi(&[
        "user",
        "create",
        "relay",
        "s3cret pass",
        "--mechanism",
        "scram512",
        "--broker",
        &url,
    ]);
    let _ = plain.kill();
    let _ = plain.wait();

    let (cert, key) = (pki.path("server.crt"), pki.path("server.key"));
    let child = spawn(&["--authentication", "--cert", &cert, "--key", &key]);
    let broker = TlsBroker {
        child,
        port,
        log: pki.dir.join("broker.log"),
    };
    wait_until(Duration::from_secs(30), "the SASL_SSL broker", listening).await;

    let ca = pki.path("ca.crt");
    let sasl = |cfg: &mut ClientConfig, password: &str| {
        cfg.set("security.protocol", "sasl_ssl")
            .set("ssl.ca.location", &ca)
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", "relay")
            .set("sasl.password", password);
    };
    // A wrong password gets no metadata.
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", broker.brokers());
    sasl(&mut cfg, "wrong");
    let refused: BaseConsumer = cfg.create().unwrap();
    assert!(
        refused
            .fetch_metadata(None, Duration::from_secs(5))
            .is_err(),
        "a wrong SCRAM password must be refused"
    );
    drop(refused);

    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", broker.brokers());
    sasl(&mut cfg, "s3cret pass");
    let topic = unique("scram");
    let admin: AdminClient<DefaultClientContext> = cfg.create().expect("admin");
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic over SASL_SSL")
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }

    let db = TestDb::new("kafka_scram").await;
    let slot = db.classic_outbox().await;
    let mut relay = Relay::start(&relay_args(
        &db,
        &broker.brokers(),
        &[
            "--slot",
            &slot,
            "--topic",
            "{event_type}",
            "--kafka-property",
            "security.protocol=sasl_ssl",
            "--kafka-property",
            &format!("ssl.ca.location={ca}"),
            "--kafka-property",
            "sasl.mechanism=SCRAM-SHA-512",
            "--kafka-property",
            "sasl.username=relay",
            "--kafka-property",
            "sasl.password=s3cret pass",
        ],
    ));
    insert_events(&db, &topic, 12).await;
    let after = db.current_wal_lsn().await;
    let t = topic.clone();
    let high = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = cfg.create().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let high = c
                .fetch_watermarks(&t, 0, Duration::from_secs(5))
                .map(|w| w.1)
                .unwrap_or(-1);
            if high >= 12 || Instant::now() > deadline {
                return high;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
    assert_eq!(high, 12, "relay log:\n{}", relay.log_text());
    db.wait_confirmed(
        &slot,
        after,
        "confirmed_flush_lsn to pass the commit delivered over SASL_SSL",
    )
    .await;
    assert!(
        !relay.log_text().contains("s3cret"),
        "the SASL password is never logged"
    );
    relay.terminate().await;
    drop(broker);
    db.drop().await;
}
