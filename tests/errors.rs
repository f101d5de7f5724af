//! Bad events: each either stops the relay with the slot before it (halt)
//! or goes to the dead-letter topic, and the slot moves past it only once
//! the dead-letter record is acknowledged. Never a silent skip.

use crate::support;

use std::time::Duration;

use support::*;

struct Case {
    db: TestDb,
    slot: String,
    prefix: String,
    dlq: String,
    good_topic: String,
}

/// A classic outbox whose columns accept the bad values under test.
async fn case(name: &str) -> Case {
    let db = TestDb::new(name).await;
    let slot = db.classic_outbox().await;
    db.exec("ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL; ALTER TABLE outbox ADD COLUMN body text").await;
    let prefix = unique("err");
    let dlq = format!("{prefix}.dlq");
    let good_topic = format!("{prefix}.Good");
    create_topics(&brokers(), &[&dlq, &good_topic], 1).await;
    Case {
        db,
        slot,
        prefix,
        dlq,
        good_topic,
    }
}

impl Case {
    fn args(&self, extra: &[&str]) -> Vec<String> {
        self.args_for(&brokers(), extra)
    }

    fn args_for(&self, brokers: &str, extra: &[&str]) -> Vec<String> {
        let template = format!("{}.{{event_type}}", self.prefix);
        let mut a = vec![
            "--slot",
            &self.slot,
            "--topic",
            &template,
            "--dead-letter-topic",
            &self.dlq,
        ];
        a.extend_from_slice(extra);
        relay_args(&self.db, brokers, &a)
    }

    async fn good(&self, n: usize) {
        self.db
            .exec(&format!(
                "INSERT INTO outbox (event_type, aggregate_id, payload) SELECT 'Good', 'a', jsonb_build_object('n', g) FROM generate_series(1, {n}) g"
            ))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_key_halts_by_default_and_the_slot_stays_before_it() {
    let c = case("err_halt").await;
    let mut relay = Relay::start(&c.args(&[]));
    c.db.wait_streaming(&c.slot).await;
    c.good(3).await;
    let before = c.db.current_wal_lsn().await;
    c.db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Good', NULL, '{}')")
        .await;
    let after = c.db.current_wal_lsn().await;
    assert_eq!(relay.wait(Duration::from_secs(60)).await, Some(1));
    assert_eq!(relay.stopped_for(), Some(Some("key".into())));
    let log = relay.log_text();
    assert_contains(&log, "column aggregate_id (the key) is NULL");
    assert_contains(&log, "cannot route the change at");
    c.db.assert_not_confirmed(&c.slot, before, after, "the bad event")
        .await;
    // The good events before it were delivered.
    assert_eq!(consume_topic(&c.good_topic, 3).await.len(), 3);
    c.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_go_to_the_dead_letter_topic_with_the_reason() {
    let c = case("err_dlq").await;
    let mut relay = Relay::start(&c.args(&["--on-error", "dead-letter"]));
    c.db.wait_streaming(&c.slot).await;
    c.good(2).await;
    c.db.exec(
        "BEGIN;
         INSERT INTO outbox (event_id, event_type, aggregate_id, payload) VALUES ('00000000-0000-4000-8000-000000000001', 'Good', NULL, '{\"bad\": \"null key\"}');
         INSERT INTO outbox (event_id, event_type, aggregate_id, payload) VALUES ('00000000-0000-4000-8000-000000000002', 'Good', '', '{\"bad\": \"empty key\"}');
         INSERT INTO outbox (event_id, event_type, aggregate_id, payload) VALUES ('00000000-0000-4000-8000-000000000003', 'bad type', 'a', '{\"bad\": \"topic\"}');
         COMMIT;",
    )
    .await;
    c.good(2).await;
    let after = c.db.current_wal_lsn().await;
    let dead = consume_topic(&c.dlq, 3).await;
    assert_eq!(dead.len(), 3);
    let by_id = |id: &str| {
        dead.iter()
            .find(|r| r.header("outbox.original.id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("{id} not dead-lettered: {dead:?}"))
    };
    let null_key = by_id("00000000-0000-4000-8000-000000000001");
    assert_eq!(null_key.header("outbox.error.kind").as_deref(), Some("key"));
    assert!(null_key
        .header("outbox.error")
        .unwrap()
        .contains("column aggregate_id (the key) is NULL"));
    assert_eq!(
        null_key.header("outbox.original.topic").unwrap(),
        c.good_topic
    );
    assert!(null_key.header("outbox.lsn").unwrap().contains('/'));
    assert_eq!(
        null_key.payload.as_deref(),
        Some(&b"{\"bad\": \"null key\"}"[..]),
        "original value kept"
    );
    assert_eq!(
        by_id("00000000-0000-4000-8000-000000000002")
            .header("outbox.error.kind")
            .as_deref(),
        Some("key")
    );
    let topic = by_id("00000000-0000-4000-8000-000000000003");
    assert_eq!(topic.header("outbox.error.kind").as_deref(), Some("topic"));
    assert_eq!(
        topic.header("outbox.original.topic").unwrap(),
        format!("{}.bad type", c.prefix)
    );
    assert_eq!(consume_topic(&c.good_topic, 4).await.len(), 4);
    c.db.wait_confirmed_past(&c.slot, after, "the dead-lettered events")
        .await;
    let text = http_get(&relay.http_address().await, "/metrics").await.1;
    assert_eq!(
        metric(&text, "outbox_dead_lettered_total"),
        Some(3.0),
        "{text}"
    );
    assert!(relay.is_running());
    relay.stop_clean().await;
    c.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_is_dead_lettered_without_its_value_or_halts() {
    let c = case("err_large").await;
    // The producer's own limit (message.max.bytes, 1 MB by default) refuses it.
    let big = |n: u32| {
        format!("INSERT INTO outbox (event_id, event_type, aggregate_id, payload) VALUES ('00000000-0000-4000-8000-0000000000b{n}', 'Good', 'a', jsonb_build_object('blob', repeat('x', 1500000)))")
    };
    let mut relay = Relay::start(&c.args(&["--on-error-override", "too-large=dead-letter"]));
    c.db.wait_streaming(&c.slot).await;
    c.db.exec(&big(1)).await;
    c.good(1).await;
    let dead = consume_topic(&c.dlq, 1).await;
    assert_eq!(
        dead[0].header("outbox.error.kind").as_deref(),
        Some("too-large")
    );
    assert!(
        dead[0].payload.is_none(),
        "an oversized value cannot be kept"
    );
    assert!(
        dead[0]
            .header("outbox.original.size")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 1_500_000
    );
    assert_eq!(consume_topic(&c.good_topic, 1).await.len(), 1);
    relay.stop_clean().await;

    // With the producer's limit raised, the broker refuses it (the topic's
    // max.message.bytes): a delivery report, dead-lettered the same way.
    let mut relay = Relay::start(&c.args(&[
        "--on-error-override",
        "too-large=dead-letter",
        "--kafka-property",
        "message.max.bytes=5000000",
    ]));
    c.db.wait_streaming(&c.slot).await;
    c.db.exec(&big(3)).await;
    let dead = consume_topic(&c.dlq, 2).await;
    let broker_refused = dead
        .iter()
        .find(|r| {
            r.header("outbox.original.id").as_deref()
                == Some("00000000-0000-4000-8000-0000000000b3")
        })
        .expect("dead-lettered after the broker refused it");
    assert!(
        broker_refused
            .header("outbox.error")
            .unwrap()
            .contains("Kafka refused"),
        "{broker_refused:?}"
    );
    assert!(broker_refused.payload.is_none());
    relay.stop_clean().await;

    // The same event under the default policy stops the relay.
    let mut relay = Relay::start(&c.args(&[]));
    c.db.wait_streaming(&c.slot).await;
    c.db.exec(&big(2)).await;
    assert_eq!(relay.wait(Duration::from_secs(60)).await, Some(1));
    assert_eq!(
        relay.stopped_for(),
        Some(Some("too-large".into())),
        "{}",
        relay.log_text()
    );
    // The slot did not move past the refused event: a relay started with
    // the dead-letter policy receives it again. (While the walsender reads
    // a large transaction its keepalives may report positions inside it, so
    // comparing LSNs taken before the insert would be too strict.)
    let mut relay = Relay::start(&c.args(&["--on-error-override", "too-large=dead-letter"]));
    let dead = consume_topic(&c.dlq, 3).await;
    assert!(
        dead.iter()
            .any(|r| r.header("outbox.original.id").as_deref()
                == Some("00000000-0000-4000-8000-0000000000b2")),
        "the halted event was not sent again: {dead:?}"
    );
    relay.stop_clean().await;
    c.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_json_is_refused_when_json_is_required() {
    let c = case("err_json").await;
    let mut relay = Relay::start(&c.args(&[
        "--payload-column",
        "body",
        "--payload-format",
        "json",
        "--on-error-override",
        "payload-json=dead-letter",
    ]));
    c.db.wait_streaming(&c.slot).await;
    c.db.exec(
        "INSERT INTO outbox (event_type, aggregate_id, payload, body) VALUES
           ('Good', 'a', '{}', '{\"ok\": true}'),
           ('Good', 'a', '{}', 'not json {')",
    )
    .await;
    let dead = consume_topic(&c.dlq, 1).await;
    assert_eq!(
        dead[0].header("outbox.error.kind").as_deref(),
        Some("payload-json")
    );
    assert_eq!(dead[0].payload.as_deref(), Some(&b"not json {"[..]));
    let good = consume_topic(&c.good_topic, 1).await;
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].payload.as_deref(), Some(&b"{\"ok\": true}"[..]));
    relay.stop_clean().await;
    c.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_without_auto_creation_is_dead_lettered() {
    let c = case("err_notopic").await;
    let mut relay = Relay::start(&c.args(MISSING_TOPIC_DEAD_LETTERED));
    c.db.wait_streaming(&c.slot).await;
    c.db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Nowhere', 'a', '{\"n\": 1}')").await;
    c.good(1).await;
    let dead = consume_topic(&c.dlq, 1).await;
    assert_eq!(
        dead[0].header("outbox.error.kind").as_deref(),
        Some("topic-missing"),
        "{:?}",
        dead[0]
    );
    assert_eq!(
        dead[0].header("outbox.original.topic").unwrap(),
        format!("{}.Nowhere", c.prefix)
    );
    assert_eq!(dead[0].payload.as_deref(), Some(&b"{\"n\": 1}"[..]));
    relay.stop_clean().await;
    c.db.drop().await;
}

/// Authorization failures cannot be staged on the test broker (it has no
/// ACLs), so librdkafka's mock cluster plays the broker here: it runs in
/// this process, listens on loopback, and the relay process connects to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorised_topic_is_dead_lettered_or_halts() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;
    let c = case("err_auth").await;
    let mock = MockCluster::new(1).expect("mock cluster");
    let secret = format!("{}.Secret", c.prefix);
    mock.create_topic(&c.dlq, 1, 1).unwrap();
    mock.create_topic(&c.good_topic, 1, 1).unwrap();
    mock.create_topic(&secret, 1, 1).unwrap();
    mock.topic_error(
        &secret,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let servers = mock.bootstrap_servers();
    // librdkafka's mock cluster is no Kafka to keep a compacted topic in.
    let mut relay = Relay::start(&c.args_for(
        &servers,
        &[
            "--on-error-override",
            "authorization=dead-letter",
            "--progress-topic",
            "off",
        ],
    ));
    c.db.wait_streaming(&c.slot).await;
    c.db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Secret', 'a', '{\"s\": 1}')").await;
    c.good(1).await;
    let after = c.db.current_wal_lsn().await;
    let dead = consume(
        &servers,
        std::slice::from_ref(&c.dlq),
        1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        dead[0].header("outbox.error.kind").as_deref(),
        Some("authorization"),
        "{:?}",
        dead[0]
    );
    assert_eq!(dead[0].header("outbox.original.topic").unwrap(), secret);
    c.db.wait_confirmed_past(&c.slot, after, "the slot to pass the dead-lettered event")
        .await;
    relay.stop_clean().await;

    // Under the default policy the relay stops and the slot stays.
    let mut relay = Relay::start(&c.args_for(&servers, &["--progress-topic", "off"]));
    c.db.wait_streaming(&c.slot).await;
    let before = c.db.current_wal_lsn().await;
    c.db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Secret', 'a', '{\"s\": 2}')").await;
    let after = c.db.current_wal_lsn().await;
    assert_eq!(relay.wait(Duration::from_secs(60)).await, Some(1));
    assert_eq!(
        relay.stopped_for(),
        Some(Some("authorization".into())),
        "{}",
        relay.log_text()
    );
    c.db.assert_not_confirmed(&c.slot, before, after, "the refused event")
        .await;
    c.db.drop().await;
}

/// A delivery that fails for good on one producer (here a fatal
/// idempotent-producer error, injected by librdkafka's mock cluster) ends the
/// session: its producer is abandoned, and a new session with a new producer
/// resends from the slot, so every event arrives and the first copies keep
/// commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_starts_a_new_session_that_resends_in_order() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let c = case("err_fatal").await;
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(&c.good_topic, 1, 1).unwrap();
    let servers = mock.bootstrap_servers();
    let mut relay = Relay::start(&c.args_for(&servers, &["--progress-topic", "off"]));
    c.db.wait_streaming(&c.slot).await;
    let insert = |from: u32, to: u32| {
        format!("INSERT INTO outbox (event_type, aggregate_id, payload) SELECT 'Good', 'a', jsonb_build_object('n', g) FROM generate_series({from}, {to}) g")
    };
    c.db.exec(&insert(1, 5)).await;
    let topics = std::slice::from_ref(&c.good_topic);
    consume(&servers, topics, 5, Duration::from_secs(60)).await;

    // The next produce request is refused as out of sequence: librdkafka
    // treats that as fatal for the producer and fails every queued record.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    c.db.exec(&insert(6, 10)).await;
    c.db.exec(&insert(11, 15)).await;
    let after = c.db.current_wal_lsn().await;
    c.db.wait_confirmed_past(&c.slot, after, "the slot to pass every event")
        .await;
    assert!(relay.is_running(), "{}", relay.log_text());
    assert!(
        relay.resumed_from().len() >= 2,
        "the failed delivery did not end the session: {}",
        relay.log_text()
    );

    let records = consume(&servers, topics, 15, Duration::from_secs(60)).await;
    let mut first_copies = Vec::new();
    for r in &records {
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        let n = v["n"].as_u64().unwrap();
        if !first_copies.contains(&n) {
            first_copies.push(n);
        }
    }
    assert_eq!(
        first_copies,
        (1..=15).collect::<Vec<u64>>(),
        "every event, first copies in commit order"
    );
    relay.stop_clean().await;
    c.db.drop().await;
}

/// M8 of the December 2026 review, reproduced: the broker checks a topic's
/// max.message.bytes against a whole record batch, so records that are each
/// small enough fail together; 1685dac dead-lettered all of them, payloads
/// gone. Ten 400-byte events in one transaction go to a topic that takes at
/// most 1500 bytes at a time: the relay stops with the slot before them and
/// dead-letters nothing; with a batch.size below the limit they all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_records_are_not_failed_by_a_batch_over_the_topic_limit() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let c = case("err_batch").await;
    let topic = format!("{}.Small", c.prefix);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let res = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                .set("max.message.bytes", "1500")],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    let mut relay = Relay::start(&c.args(&["--on-error", "dead-letter"]));
    c.db.wait_streaming(&c.slot).await;
    let before = c.db.current_wal_lsn().await;
    c.db.exec(
        "INSERT INTO outbox (event_type, aggregate_id, payload)
         SELECT 'Small', 'a', jsonb_build_object('n', g, 'pad', repeat('s', 380)) FROM generate_series(1, 10) g",
    )
    .await;
    let after = c.db.current_wal_lsn().await;
    relay.expect_exit(Duration::from_secs(60), Some(1)).await;
    c.db.assert_not_confirmed(&c.slot, before, after, "the refused batch")
        .await;
    let dead = consume(
        &brokers(),
        std::slice::from_ref(&c.dlq),
        0,
        Duration::from_secs(10),
    )
    .await;
    assert!(dead.is_empty(), "good events were dead-lettered: {dead:?}");

    // The fix the error names: batches below the topic's limit.
    let mut relay = Relay::start(&c.args(&[
        "--on-error",
        "dead-letter",
        "--kafka-property",
        "batch.size=1000",
    ]));
    c.db.wait_confirmed_past(&c.slot, after, "the slot to pass the small events")
        .await;
    let records = consume_topic(&topic, 10).await;
    assert_eq!(records.len(), 10, "{records:?}");
    let dead = consume(
        &brokers(),
        std::slice::from_ref(&c.dlq),
        0,
        Duration::from_secs(10),
    )
    .await;
    assert!(dead.is_empty(), "{dead:?}");
    relay.stop_clean().await;
    c.db.drop().await;
}
