//! `outbox-relay verify` against real Postgres and a real broker. The records
//! are produced directly (not by the relay) so each fault is exactly the one
//! the test means; the last test runs the real relay.

use crate::support;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use support::*;

const TYPES: [&str; 3] = ["OrderCreated", "OrderPaid", "OrderShipped"];
const PARTITIONS: i32 = 3;

/// A record as the relay would produce it for one outbox row.
#[derive(Debug, Clone)]
struct Rec {
    topic: String,
    partition: i32,
    key: String,
    payload: Vec<u8>,
    event_id: String,
    event_type: String,
}

struct Scenario {
    db: TestDb,
    template: String,
    /// One record per row, in outbox (`id`) order.
    records: Vec<Rec>,
}

/// A classic outbox with 30 events: 5 aggregates × 6 events, each aggregate
/// with one event type (so one topic) and one partition of it.
async fn scenario(name: &str) -> Scenario {
    let db = TestDb::new(name).await;
    db.exec(CLASSIC_TABLE).await;
    let prefix = unique(name);
    let mut sql = String::from("BEGIN;");
    for seq in 0..30 {
        let agg = seq % 5;
        let ty = TYPES[agg % 3];
        sql.push_str(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('{ty}', 'agg-{agg}', '{{\"seq\": {seq},  \"note\": \"ünïcødé\"}}');"
        ));
    }
    sql.push_str("COMMIT;");
    db.exec(&sql).await;
    let topics: Vec<String> = TYPES.iter().map(|t| format!("{prefix}.{t}")).collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    create_topics(&brokers(), &refs, PARTITIONS).await;
    let records = db
        .client
        .query(
            "SELECT event_id::text, event_type, aggregate_id, payload::text FROM outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let ty: String = r.get(1);
            let key: String = r.get(2);
            let agg: usize = key.trim_start_matches("agg-").parse().unwrap();
            Rec {
                topic: format!("{prefix}.{ty}"),
                partition: (agg % PARTITIONS as usize) as i32,
                key,
                payload: r.get::<_, String>(3).into_bytes(),
                event_id: r.get(0),
                event_type: ty,
            }
        })
        .collect::<Vec<_>>();
    assert_eq!(records.len(), 30);
    Scenario {
        db,
        template: format!("{prefix}.{{event_type}}"),
        records,
    }
}

/// Produces the records in order, each acknowledged before the next.
async fn produce(records: &[Rec]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    for r in records {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(r.event_id.as_bytes()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(r.event_type.as_bytes()),
            });
        producer
            .send(
                FutureRecord::to(&r.topic)
                    .partition(r.partition)
                    .key(r.key.as_bytes())
                    .payload(&r.payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

/// Runs `outbox-relay verify --json`: (exit code, report).
fn verify(s: &Scenario, extra: &[&str]) -> (i32, Value) {
    let args = [&["--topic", &s.template, "--json"], extra].concat();
    let (code, out, err) = relay_cmd_on("verify", &s.db.url, &brokers(), &args);
    let report: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("verify printed no JSON report ({e}): {out}\n{err}"));
    (code, report)
}

fn count(report: &Value, path: &str) -> u64 {
    report
        .pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {path} in {report:#}"))
}

/// Every count that is zero when nothing is wrong.
fn problem_counts(report: &Value) -> Vec<(&'static str, u64)> {
    [
        "/missing/count",
        "/unpublishable/count",
        "/unexpected/count",
        "/duplicates/events",
        "/order_violations/count",
        "/split_keys/count",
        "/mismatches/count",
    ]
    .iter()
    .map(|p| (*p, count(report, p)))
    .filter(|(_, n)| *n > 0)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_delivered_passes_with_exact_counts() {
    let s = scenario("verify_good").await;
    produce(&s.records).await;
    let (code, r) = verify(&s, &[]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true);
    assert_eq!(count(&r, "/rows"), 30);
    assert_eq!(count(&r, "/records"), 30);
    assert_eq!(count(&r, "/delivered"), 30);
    assert_eq!(count(&r, "/partitions"), 9);
    assert_eq!(r["topics"].as_array().unwrap().len(), 3);
    assert_eq!(r["order_checked_by"], "column id");
    assert_eq!(problem_counts(&r), vec![], "{r:#}");

    // The text summary says the same.
    let brokers = brokers();
    let (code, out, err) = relay_cmd_on("verify", &s.db.url, &brokers, &["--topic", &s.template]);
    assert_eq!(code, 0, "{out}{err}");
    assert_contains(&out, "delivered:       30 of 30 events");
    assert_contains(&out, "OK: no loss");
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_event_is_named_and_fails() {
    let s = scenario("verify_lost").await;
    let mut recs = s.records.clone();
    let lost = recs.remove(17);
    produce(&recs).await;
    let (code, r) = verify(&s, &[]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["failures"], serde_json::json!(["loss"]));
    assert_eq!(count(&r, "/missing/count"), 1);
    assert_eq!(
        r["missing"]["examples"][0]["event_id"],
        lost.event_id.as_str()
    );
    assert_eq!(r["missing"]["examples"][0]["key"], lost.key.as_str());
    assert_eq!(count(&r, "/delivered"), 29);
    assert_eq!(
        problem_counts(&r),
        vec![("/missing/count", 1)],
        "nothing else is wrong: {r:#}"
    );
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_duplicate_is_a_redelivery_that_fails_only_on_request() {
    let s = scenario("verify_dup").await;
    let mut recs = s.records.clone();
    // Redelivered later in its partition, as after a relay crash.
    let again = recs[4].clone();
    recs.push(again.clone());
    produce(&recs).await;
    let (code, r) = verify(&s, &[]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(count(&r, "/records"), 31);
    assert_eq!(count(&r, "/duplicates/events"), 1);
    assert_eq!(count(&r, "/duplicates/extra_records"), 1);
    assert_eq!(count(&r, "/duplicates/redeliveries"), 1);
    assert_eq!(count(&r, "/duplicates/differing"), 0);
    let ex = &r["duplicates"]["examples"][0];
    assert_eq!(ex["event_id"], again.event_id.as_str());
    assert_eq!(ex["identical"], true);
    assert_eq!(ex["copies"], 2);
    assert_eq!(problem_counts(&r), vec![("/duplicates/events", 1)], "{r:#}");

    let (code, r) = verify(&s, &["--fail-on-duplicates"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["failures"], serde_json::json!(["duplicates"]));
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_swapped_events_of_an_aggregate_are_an_order_violation() {
    let s = scenario("verify_order").await;
    let mut recs = s.records.clone();
    // Rows 7 and 12 are agg-2's 2nd and 3rd events (agg = seq % 5).
    assert_eq!(recs[7].key, "agg-2");
    assert_eq!(recs[12].key, "agg-2");
    recs.swap(7, 12);
    produce(&recs).await;
    let (code, r) = verify(&s, &[]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["failures"], serde_json::json!(["order"]));
    assert_eq!(count(&r, "/order_violations/count"), 1, "{r:#}");
    let v = &r["order_violations"]["examples"][0];
    assert_eq!(v["key"], "agg-2");
    // The earlier event (row 7) arrived after the later one (row 12).
    assert_eq!(v["event_id"], s.records[7].event_id.as_str());
    assert_eq!(v["after_event_id"], s.records[12].event_id.as_str());
    assert_eq!(v["detail"], "id 8 after id 13");
    assert_eq!(problem_counts(&r), vec![("/order_violations/count", 1)]);

    // The text summary names the aggregate.
    let brokers = brokers();
    let (code, out, _) = relay_cmd_on("verify", &s.db.url, &brokers, &["--topic", &s.template]);
    assert_eq!(code, 1);
    assert_contains(&out, "aggregate agg-2 in");
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_payload_bytes_are_a_mismatch() {
    let s = scenario("verify_payload").await;
    let mut recs = s.records.clone();
    // Same JSON value, different bytes: jsonb's text is canonical, and the
    // record must carry exactly it.
    let original = String::from_utf8(recs[9].payload.clone()).unwrap();
    let altered = original.replacen(", ", ",", 1);
    assert_ne!(original, altered);
    recs[9].payload = altered.clone().into_bytes();
    produce(&recs).await;
    let (code, r) = verify(&s, &[]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["failures"], serde_json::json!(["mismatch"]));
    assert_eq!(count(&r, "/mismatches/count"), 1);
    let m = &r["mismatches"]["examples"][0];
    assert_eq!(m["event_id"], s.records[9].event_id.as_str());
    assert_eq!(m["field"], "payload");
    assert_eq!(m["expected"], format!("{original:?}"));
    assert_eq!(m["actual"], format!("{altered:?}"));
    assert_eq!(r["mismatch_fields"]["payload"], 1);
    assert_eq!(problem_counts(&r), vec![("/mismatches/count", 1)]);
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_relay_passes_verification() {
    let (db, slot) = TestDb::classic("verify_relay").await;
    let prefix = unique("verify_relay");
    let topics: Vec<String> = TYPES.iter().map(|t| format!("{prefix}.{t}")).collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    create_topics(&brokers(), &refs, 4).await;
    let template = format!("{prefix}.{{event_type}}");
    let mut relay = Relay::start(&slot_args(&db, &slot, &template, &[]));
    // 400 events in 40 transactions over 25 aggregates.
    for t in 0..40 {
        let mut sql = String::from("BEGIN;");
        for i in 0..10 {
            let seq = t * 10 + i;
            let agg = seq * 7 % 25;
            let ty = TYPES[agg % 3];
            sql.push_str(&format!(
                "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('{ty}', 'agg-{agg}', '{{\"seq\": {seq}, \"aggregate\": \"agg-{agg}\"}}');"
            ));
        }
        sql.push_str("COMMIT;");
        db.exec(&sql).await;
    }
    // Wait until the relay delivered everything, then verify.
    consume(&brokers(), &topics, 400, Duration::from_secs(90)).await;
    let brokers = brokers();
    let (code, out, err) = relay_cmd_on(
        "verify",
        &db.url,
        &brokers,
        &["--topic", &template, "--json"],
    );
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(count(&r, "/rows"), 400);
    assert_eq!(count(&r, "/delivered"), 400);
    assert_eq!(count(&r, "/records"), 400, "one record per event");
    assert_eq!(count(&r, "/partitions"), 12);
    assert_eq!(problem_counts(&r), vec![], "{r:#}");
    relay.stop_clean().await;
    db.drop().await;
}

/// Debezium's insert-then-delete leaves the table empty: only Kafka-side
/// checks apply, and the report says so instead of calling every record
/// unexpected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_outbox_gets_kafka_side_checks_only() {
    let db = TestDb::new("verify_empty").await;
    db.exec(DEBEZIUM_TABLE).await;
    db.exec(
        "BEGIN;
         INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
           VALUES ('00000000-0000-4000-8000-000000000001', 'Order', 'o1', 'Created', '{}');
         DELETE FROM outboxevent;
         COMMIT;",
    )
    .await;
    let prefix = unique("verify_empty");
    let topic = format!("{prefix}.Order");
    create_topics(&brokers(), &[&topic], 1).await;
    let rec = |n: u32| Rec {
        topic: topic.clone(),
        partition: 0,
        key: "o1".into(),
        payload: format!("{{\"n\": {n}}}").into_bytes(),
        event_id: format!("00000000-0000-4000-8000-{n:012}"),
        // Sent as the `event_type` header: used here as the order header.
        event_type: n.to_string(),
    };
    // Events 1..4, event 3 before event 2, event 4 redelivered.
    produce(&[rec(1), rec(3), rec(2), rec(4), rec(4)]).await;
    let s = Scenario {
        db,
        template: format!("{prefix}.{{aggregatetype}}"),
        records: vec![],
    };
    let (code, r) = verify(&s, &["--preset", "debezium"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(count(&r, "/rows"), 0);
    assert_eq!(count(&r, "/records"), 5);
    assert_eq!(r["topics"], serde_json::json!([topic]));
    assert_eq!(r["order_checked_by"], Value::Null);
    assert!(
        r["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("outbox table is empty")),
        "{r:#}"
    );
    assert_eq!(problem_counts(&r), vec![("/duplicates/events", 1)], "{r:#}");
    assert_eq!(count(&r, "/duplicates/redeliveries"), 1);

    // Ordered by a header, the swap is found.
    let (code, r) = verify(
        &s,
        &["--preset", "debezium", "--order-header", "event_type"],
    );
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(count(&r, "/order_violations/count"), 1, "{r:#}");
    assert_eq!(
        r["order_violations"]["examples"][0]["detail"],
        "event_type 2 after event_type 3"
    );
    s.db.drop().await;
}

/// `--key-format json-string` (keys as Debezium's JsonConverter wrote
/// them): verify compares the table's key the way the relay sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_string_keys_are_compared_as_the_relay_sends_them() {
    let s = scenario("verify_json_keys").await;
    let quoted: Vec<Rec> = s
        .records
        .iter()
        .map(|r| Rec {
            key: format!("\"{}\"", r.key),
            ..r.clone()
        })
        .collect();
    produce(&quoted).await;
    let (code, r) = verify(&s, &["--key-format", "json-string"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(count(&r, "/delivered"), 30);
    assert_eq!(problem_counts(&r), vec![], "{r:#}");
    // Without it every key is a mismatch.
    let (code, r) = verify(&s, &[]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(count(&r, "/mismatches/count"), 30, "{r:#}");
    s.db.drop().await;
}
