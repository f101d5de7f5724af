use std::collections::HashMap;

use super::*;
use crate::pipeline::route::template::TopicTemplate;

fn row(id: &str, key: &str, topic: &str, payload: &str, rank: i64) -> OutboxRow {
    OutboxRow {
        event_id: Some(id.into()),
        key: Some(key.into()),
        payload: Some(payload.as_bytes().to_vec()),
        topic: Ok(topic.into()),
        headers: vec![],
        rank: Some(rank),
        order_value: Some(rank.to_string()),
    }
}

fn rec(r: &OutboxRow, partition: i32, offset: i64) -> KafkaRecord {
    KafkaRecord {
        topic: r.topic.clone().unwrap(),
        partition,
        offset,
        key: r.key.as_ref().map(|k| k.as_bytes().to_vec()),
        payload: r.payload.clone(),
        headers: vec![(
            "id".into(),
            r.event_id.as_ref().map(|i| i.as_bytes().to_vec()),
        )],
    }
}

fn outbox(rows: Vec<OutboxRow>) -> Outbox {
    Outbox {
        table: "public.outbox".into(),
        rows,
        order_column: Some("column id".into()),
        notes: vec![],
    }
}

fn snap(records: Vec<KafkaRecord>) -> Snapshot {
    Snapshot {
        topics: vec!["t".into()],
        absent_topics: vec![],
        partitions: 2,
        records,
    }
}

fn rows3() -> Vec<OutboxRow> {
    vec![
        row("e1", "a", "t", "{}", 1),
        row("e2", "a", "t", "{\"n\": 2}", 2),
        row("e3", "b", "t", "{}", 3),
    ]
}

/// The three rows of [`rows3`] compared with records of them in Kafka:
/// (row, partition, offset) each.
fn delivered(records: &[(usize, i32, i64)]) -> Report {
    let rows = rows3();
    let recs = records
        .iter()
        .map(|&(i, partition, offset)| rec(&rows[i], partition, offset))
        .collect();
    compare(&outbox(rows), &snap(recs), &OrderBy::Default, 5)
}

#[test]
fn all_delivered_passes() {
    let r = delivered(&[(0, 0, 0), (1, 0, 1), (2, 1, 0)]);
    assert!(r.passed(true), "{r}");
    assert_eq!((r.rows, r.records, r.delivered), (3, 3, 3));
    assert!(r
        .to_string()
        .ends_with("OK: no loss, no order violation, no mismatch"));
}

#[test]
fn swapped_events_of_one_key_are_an_order_violation() {
    let r = delivered(&[(1, 0, 0), (0, 0, 1), (2, 0, 2)]);
    assert_eq!(r.order_violations.count, 1, "{r}");
    let v = &r.order_violations.examples[0];
    assert_eq!(
        (
            v.key.as_str(),
            v.event_id.as_str(),
            v.after_event_id.as_str()
        ),
        ("a", "e1", "e2")
    );
    assert_eq!(r.failures(false), vec!["order"]);
}

#[test]
fn redelivered_suffix_is_not_an_order_violation_but_a_duplicate() {
    let r = delivered(&[(0, 0, 0), (1, 0, 1), (0, 0, 2), (1, 0, 3), (2, 1, 0)]);
    assert_eq!(r.order_violations.count, 0, "{r}");
    assert_eq!((r.duplicates.events, r.duplicates.redeliveries), (2, 2));
    assert!(r.passed(false) && !r.passed(true));
}

#[test]
fn differing_copies_missing_split_and_unexpected() {
    let rows = rows3();
    let mut altered = rec(&rows[0], 0, 1);
    altered.payload = Some(b"{\"x\": 1}".to_vec());
    let mut stranger = rec(&rows[2], 1, 1);
    stranger.headers = vec![("id".into(), Some(b"zz".to_vec()))];
    // e3 lost; e1 twice with different payloads; key a on two partitions.
    let recs = vec![rec(&rows[0], 0, 0), altered, rec(&rows[1], 1, 0), stranger];
    let r = compare(&outbox(rows), &snap(recs), &OrderBy::Default, 5);
    assert_eq!(r.missing.count, 1);
    assert_eq!(r.missing.examples[0].event_id, "e3");
    assert_eq!((r.duplicates.events, r.duplicates.differing), (1, 1));
    assert_eq!(r.mismatches.count, 1);
    assert_eq!(r.mismatches.examples[0].field, "payload");
    assert_eq!(r.split_keys.count, 1);
    assert_eq!(r.unexpected.count, 1);
    assert_eq!(r.failures(false), vec!["loss", "order", "mismatch"]);
}

#[test]
fn empty_outbox_makes_only_kafka_side_checks() {
    let rows = rows3();
    let recs = vec![
        rec(&rows[1], 0, 0),
        rec(&rows[0], 0, 1),
        rec(&rows[0], 0, 2),
    ];
    let r = compare(&outbox(vec![]), &snap(recs.clone()), &OrderBy::Default, 5);
    assert_eq!(r.unexpected.count, 0);
    assert_eq!(r.order_checked_by, None);
    assert_eq!(r.duplicates.redeliveries, 1);
    assert!(r.passed(false), "{r}");
    assert!(r.notes[0].contains("outbox table is empty"), "{r}");
    // By a header, the swap shows.
    let with_seq: Vec<KafkaRecord> = recs
        .into_iter()
        .map(|mut k| {
            let seq = if k.event_id().as_deref() == Some("e1") {
                "9"
            } else {
                "10"
            };
            k.headers
                .push(("seq".into(), Some(seq.as_bytes().to_vec())));
            k
        })
        .collect();
    let r = compare(
        &outbox(vec![]),
        &snap(with_seq),
        &OrderBy::Header("seq".into()),
        5,
    );
    assert_eq!(r.order_violations.count, 1, "{r}");
    assert_eq!(r.order_violations.examples[0].detail, "seq 9 after seq 10");
}

#[test]
fn templates_expand_and_match() {
    let t = TopicTemplate::parse("events.{event_type}.v1").unwrap();
    let v: HashMap<String, Option<String>> =
        [("event_type".to_string(), Some("OrderPaid".to_string()))].into();
    assert_eq!(
        expand_topic(&t, "public", &v).unwrap(),
        "events.OrderPaid.v1"
    );
    let null: HashMap<String, Option<String>> = [("event_type".to_string(), None)].into();
    assert!(expand_topic(&t, "public", &null)
        .unwrap_err()
        .contains("NULL"));
    let bad: HashMap<String, Option<String>> =
        [("event_type".to_string(), Some("a b".to_string()))].into();
    assert!(expand_topic(&t, "public", &bad).is_err());
    // Which topics a template matches: route/template.rs's tests.
}
