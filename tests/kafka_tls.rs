//! TLS (and SASL/SCRAM) to Kafka: librdkafka is built with OpenSSL
//! (rdkafka's `ssl-vendored` feature), so `--kafka-property
//! security.protocol=ssl|sasl_ssl|sasl_plaintext` works. Proved against an
//! Apache Kafka of the test's own whose client listener accepts only TLS (a
//! PEM key store), with a CA and server certificate made by the openssl CLI
//! (support::certs): events arrive when the relay trusts the CA, and stay in
//! flight (the slot does not move past them) when it does not; and over
//! SASL_SSL with SCRAM-SHA-512 credentials.

use crate::support;

use std::time::{Duration, Instant};

use outbox_relay::pipeline::sink::KafkaSink;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use support::certs::Pki;
use support::*;

fn props(kv: &[(&str, &str)]) -> Vec<(String, String)> {
    kv.iter().map(|&(k, v)| (k.into(), v.into())).collect()
}

/// A relay on the test database's slot writing to `{event_type}` topics of
/// `broker`, whose certificate `ca` must have signed, over `protocol` (`ssl`
/// or `sasl_ssl`), with `extra` Kafka properties.
fn tls_relay(
    db: &TestDb,
    slot: &str,
    broker: &Kafka,
    protocol: &str,
    ca: &str,
    extra: &[&str],
) -> Relay {
    let mut args = slot_args_via(&broker.brokers(), db, slot, "{event_type}", &[]);
    let (protocol, ca) = (
        format!("security.protocol={protocol}"),
        format!("ssl.ca.location={ca}"),
    );
    for property in [protocol.as_str(), ca.as_str()].iter().chain(extra) {
        args.extend(strings(&["--kafka-property", property]));
    }
    Relay::start(&args)
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

/// A Kafka whose client listener speaks `protocol` (SSL or SASL_SSL) with
/// the PKI's server certificate. Kafka reads the PEM key store from one file
/// holding the (unencrypted PKCS#8) key and the certificate.
fn tls_kafka(pki: &Pki, protocol: &str) -> support::kafka::KafkaOptions {
    let pem = pki.dir.join("server.pem");
    let key = std::fs::read_to_string(pki.path("server.key")).unwrap();
    let cert = std::fs::read_to_string(pki.path("server.crt")).unwrap();
    std::fs::write(&pem, format!("{key}{cert}")).unwrap();
    Kafka::options()
        .protocol(protocol)
        .config("ssl.keystore.type=PEM")
        .config(format!("ssl.keystore.location={}", pem.display()))
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
    let broker = tls_kafka(&pki, "SSL").start().await;
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

    let (db, slot) = TestDb::classic("kafka_tls_ok").await;
    let topic = unique("tls_ok");
    create_tls_topic(&broker.brokers(), &ca, &topic, 2).await;
    let mut relay = tls_relay(&db, &slot, &broker, "ssl", &ca, &[]);
    insert_events(&db, &topic, 25).await;
    let after = db.current_wal_lsn().await;

    let (brokers, ca2, t) = (broker.brokers(), ca.clone(), topic.clone());
    let records = tokio::task::spawn_blocking(move || {
        consume_tls(&brokers, &ca2, &t, 2, 25, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let expected: Vec<String> =
        column(&db.client, "SELECT event_id::text FROM outbox ORDER BY id").await;
    let mut got: Vec<String> = records.iter().map(|(_, id)| id.clone()).collect();
    let mut want = expected.clone();
    got.sort();
    want.sort();
    assert_eq!(
        got,
        want,
        "every event once, over TLS; broker log:\n{}",
        broker.log_text(1)
    );

    db.wait_confirmed_past(&slot, after, "over TLS").await;
    relay.stop_clean().await;
    drop(broker);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wrong_ca_nothing_is_delivered_and_the_slot_holds() {
    let pki = Pki::new();
    let broker = tls_kafka(&pki, "SSL").start().await;
    let (db, slot) = TestDb::classic("kafka_tls_bad_ca").await;
    let topic = unique("tls_bad");
    create_tls_topic(&broker.brokers(), &pki.path("ca.crt"), &topic, 1).await;
    let other_ca = pki.path("other_ca.crt");
    let mut relay = tls_relay(&db, &slot, &broker, "ssl", &other_ca, &[]);
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;

    let before = db.current_wal_lsn().await;
    insert_events(&db, &topic, 10).await;
    let after = db.current_wal_lsn().await;
    db.wait_sent(&slot, after).await;
    wait_metric(&addr, "outbox_inflight_events", |v| v == Some(10.0)).await;
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

/// SASL/SCRAM-SHA-512 over TLS (`security.protocol=sasl_ssl`). The user is
/// written into the storage when it is formatted (StorageTool --add-scram),
/// as an operator bootstraps the first credentials of a KRaft cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_over_sasl_ssl_with_scram_sha_512() {
    let pki = Pki::new();
    let broker = tls_kafka(&pki, "SASL_SSL")
        .config("sasl.enabled.mechanisms=SCRAM-SHA-512")
        .config(
            "listener.name.client.scram-sha-512.sasl.jaas.config=\
             org.apache.kafka.common.security.scram.ScramLoginModule required;",
        )
        .scram("relay", "s3cret pass")
        .start()
        .await;
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

    let (db, slot) = TestDb::classic("kafka_scram").await;
    let scram = [
        "sasl.mechanism=SCRAM-SHA-512",
        "sasl.username=relay",
        "sasl.password=s3cret pass",
    ];
    let mut relay = tls_relay(&db, &slot, &broker, "sasl_ssl", &ca, &scram);
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
    db.wait_confirmed_past(&slot, after, "over SASL_SSL").await;
    assert!(
        !relay.log_text().contains("s3cret"),
        "the SASL password is never logged"
    );

    // The operator commands reach the cluster through the same properties:
    // every Kafka client comes from one builder that applies them.
    let ca_prop = format!("ssl.ca.location={ca}");
    let sasl_args = [
        "--kafka-property",
        "security.protocol=sasl_ssl",
        "--kafka-property",
        &ca_prop,
        "--kafka-property",
        "sasl.mechanism=SCRAM-SHA-512",
        "--kafka-property",
        "sasl.username=relay",
        "--kafka-property",
        "sasl.password=s3cret pass",
    ];
    let brokers = broker.brokers();
    let topics = ["--topic", "{event_type}"];
    let verify = [&topics[..], &["--json"], &sasl_args].concat();
    let (code, out, err) = relay_cmd_on("verify", &db.url, &brokers, &verify);
    let report: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("verify printed no JSON report ({e}): {out}\n{err}"));
    assert_eq!(code, 0, "verify over SASL_SSL: {out}\n{err}");
    assert_eq!(report["delivered"].as_u64(), Some(12), "{report:#}");

    let check = [&["--slot", &slot], &topics[..], &sasl_args].concat();
    let (_, out, err) = relay_cmd_on("check", &db.url, &brokers, &check);
    let brokers_line = out
        .lines()
        .find(|l| l.contains("kafka brokers"))
        .unwrap_or_else(|| panic!("check printed no kafka brokers line: {out}\n{err}"));
    assert!(
        brokers_line.contains("PASS"),
        "check over SASL_SSL: {out}\n{err}"
    );

    // tail, bounded by coreutils' timeout so that a client that cannot
    // connect fails the test instead of hanging it.
    let tail = std::process::Command::new("timeout")
        .arg("60")
        .arg(relay_bin())
        .args([
            "tail",
            "--kafka-brokers",
            &brokers,
            "--topic-prefix",
            &topic,
            "--from-beginning",
            "--max",
            "12",
        ])
        .args(sasl_args)
        .output()
        .expect("run tail");
    let printed = String::from_utf8_lossy(&tail.stdout);
    assert!(
        tail.status.success(),
        "tail over SASL_SSL: {:?}\n{}",
        tail.status,
        String::from_utf8_lossy(&tail.stderr)
    );
    assert_eq!(printed.lines().count(), 12, "{printed}");

    relay.stop_clean().await;
    drop(broker);
    db.drop().await;
}
