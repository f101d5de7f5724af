//! Debezium side by side (issue 14): the same outbox rows through Debezium's
//! PostgreSQL connector and Outbox Event Router (Kafka Connect standalone,
//! started by `scripts/debezium` as a careful operator would set it up) and
//! through `outbox-relay --preset debezium`, each on its own slot, compared
//! record by record: topic, partition, key bytes, value bytes, the `id`
//! header and every other header. Every difference found here is either
//! closed by an option or written down in docs/migrating-from-debezium.md.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use support::*;

/// `scripts/debezium` of this checkout.
fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/debezium")
}

/// Kafka Connect with Debezium, running until dropped.
struct Debezium {
    dir: std::path::PathBuf,
}

impl Debezium {
    fn start(db: &TestDb, slot: &str, topic: &str, extra: &[&str]) -> Debezium {
        let dir = std::env::temp_dir().join(unique("debezium"));
        let port = pg_addr(&db.url).port().to_string();
        let brokers = brokers();
        let mut args = vec![
            "up",
            "--dir",
            dir.to_str().expect("a UTF-8 temp dir"),
            "--brokers",
            &brokers,
            "--pg-port",
            &port,
            "--database",
            &db.name,
            "--slot",
            slot,
            "--topic",
            topic,
        ];
        args.extend_from_slice(extra);
        let out = Command::new(script())
            .args(&args)
            .output()
            .expect("run scripts/debezium");
        assert!(
            out.status.success(),
            "scripts/debezium up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Debezium { dir }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("connect.log")).unwrap_or_default()
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", "--dir", self.dir.to_str().unwrap_or_default()])
            .output();
    }
}

/// The workload: what a Debezium outbox sees in production, and its edges.
fn workload(types: &[String]) -> Vec<String> {
    let mut txns = Vec::new();
    let row = |n: usize, ty: &str, agg: &str, payload: &str| {
        format!(
            "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) VALUES \
             ('00000000-0000-4000-8000-{n:012}', '{ty}', '{agg}', 'Event{}', {payload});",
            n % 3
        )
    };
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    // Objects and arrays, nested, several aggregate types and keys.
    for i in 0..30 {
        let ty = &types[i % types.len()];
        let agg = format!("agg-{}", i % 7);
        let payload = match i % 3 {
            0 => format!("'{{\"n\": {i}, \"nested\": {{\"a\": [1, 2, {{\"b\": null}}]}}}}'"),
            1 => format!("'[{i}, \"two\", 3.5, true, null]'"),
            _ => format!("'{{\"n\": {i}, \"text\": \"with \\\"quotes\\\" and \\\\ backslash\"}}'"),
        };
        txns.push(format!(
            "BEGIN; {} COMMIT;",
            row(next(), ty, &agg, &payload)
        ));
    }
    // Unicode in the payload and the key.
    txns.push(row(
        next(),
        &types[0],
        "agg-ünï-😀",
        "'{\"name\": \"Zoë 北京 😀\", \"rtl\": \"שלום\"}'",
    ));
    // A NULL payload, an empty JSON string and an empty object.
    txns.push(row(next(), &types[1], "agg-null", "NULL"));
    txns.push(row(next(), &types[1], "agg-empty", "'\"\"'"));
    txns.push(row(next(), &types[1], "agg-obj", "'{}'"));
    // Inserted and deleted in one transaction (Debezium's pattern), and
    // updated: only the insert is an event.
    for i in 0..5 {
        let id = next();
        txns.push(format!(
            "BEGIN; {} DELETE FROM outboxevent WHERE id = '00000000-0000-4000-8000-{id:012}'; COMMIT;",
            row(id, &types[2], "agg-del", &format!("'{{\"deleted\": {i}}}'"))
        ));
    }
    let id = next();
    txns.push(format!(
        "BEGIN; {} UPDATE outboxevent SET payload = '{{\"updated\": true}}' WHERE id = '00000000-0000-4000-8000-{id:012}'; COMMIT;",
        row(id, &types[2], "agg-upd", "'{\"updated\": false}'")
    ));
    // Over 1 MB (topics, producers and the broker's request size raised
    // for both).
    txns.push(row(
        next(),
        &types[2],
        "agg-big",
        "jsonb_build_object('blob', repeat('x', 1200000))",
    ));
    // Several events in one transaction, in order.
    let many: String = (0..10)
        .map(|i| {
            row(
                next(),
                &types[0],
                "agg-many",
                &format!("'{{\"seq\": {i}}}'"),
            )
        })
        .collect();
    txns.push(format!("BEGIN; {many} COMMIT;"));
    txns
}

/// The record size both publishers are set up for: above the 1.2 MB payload.
const BIG: &str = "4194304";

/// The headers Debezium adds with its default `extended.headers.enabled =
/// true`: the connector's context, which the relay has no counterpart for
/// (docs/migrating-from-debezium.md).
const CONTEXT_HEADERS: [&str; 4] = [
    "__debezium.context.connectorLogicalName",
    "__debezium.context.taskId",
    "__debezium.context.connectorName",
    "__debezium.context.runId",
];

/// Takes Debezium's context headers out of its records, checking that each
/// record has all four.
fn without_context_headers(records: &mut [Record]) {
    for r in records {
        let names: Vec<String> = r
            .headers
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("__debezium.context."))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        let mut expected: Vec<String> = CONTEXT_HEADERS.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(sorted, expected, "Debezium's context headers on {r:?}");
        r.headers
            .retain(|(k, _)| !k.starts_with("__debezium.context."));
    }
}

/// What a record is, for the comparison: everything but its offset and
/// timestamp, with headers in the order sent.
type Seen = (
    i32,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
);

fn by_topic_suffix(records: &[Record], prefix: &str) -> BTreeMap<String, Vec<Seen>> {
    let mut out: BTreeMap<String, Vec<(i32, i64, Seen)>> = BTreeMap::new();
    for r in records {
        let suffix = r
            .topic
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{} outside {prefix}", r.topic))
            .to_string();
        out.entry(suffix).or_default().push((
            r.partition,
            r.offset,
            (
                r.partition,
                r.key.clone(),
                r.payload.clone(),
                r.headers.clone(),
            ),
        ));
    }
    out.into_iter()
        .map(|(t, mut v)| {
            v.sort_by_key(|(p, o, _)| (*p, *o));
            (t, v.into_iter().map(|(_, _, s)| s).collect())
        })
        .collect()
}

fn show(b: &Option<Vec<u8>>) -> String {
    match b {
        None => "null".into(),
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_and_the_relay_publish_the_same_records() {
    let db = TestDb::new("dbz_diff").await;
    db.exec(DEBEZIUM_TABLE).await;
    let run = unique("dbz");
    let types: Vec<String> = ["Order", "Customer", "Shipment"]
        .iter()
        .map(|t| format!("{t}{run}"))
        .collect();
    let (dbz_prefix, relay_prefix) = (format!("{run}.dbz."), format!("{run}.relay."));
    let mut topics = Vec::new();
    for t in &types {
        topics.push(format!("{dbz_prefix}outbox.event.{t}"));
        topics.push(format!("{relay_prefix}outbox.event.{t}"));
    }
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    create_topics_with(&brokers(), &refs, 3, 1, &[("max.message.bytes", BIG)]).await;

    let dbz_slot = format!("dbz_{}", db.name);
    let debezium = Debezium::start(
        &db,
        &dbz_slot,
        &format!("{dbz_prefix}outbox.event.${{routedByValue}}"),
        &["--worker", &format!("producer.max.request.size={BIG}")],
    );
    let relay_slot = format!("relay_{}", db.name);
    let (code, out, err) = relay_cmd(&[
        "setup",
        "--database-url",
        &db.url,
        "--preset",
        "debezium",
        "--slot",
        &relay_slot,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let relay_topic = format!("{relay_prefix}outbox.event.{{aggregatetype}}");
    let mut relay = Relay::start(&relay_args(
        &db,
        &brokers(),
        &[
            "--preset",
            "debezium",
            "--slot",
            &relay_slot,
            "--topic",
            &relay_topic,
            "--kafka-property",
            &format!("message.max.bytes={BIG}"),
        ],
    ));
    db.wait_streaming(&relay_slot).await;

    let txns = workload(&types);
    for t in &txns {
        db.exec(t).await;
    }
    let end = db.current_wal_lsn().await;
    // Debezium confirms only the position of the last event it published
    // (after an offset flush), never an idle server's: its records are
    // counted instead.
    db.wait_confirmed(&relay_slot, end, "the relay to pass the workload")
        .await;
    let events = 30 + 4 + 5 + 1 + 1 + 10;
    let records = consume(&brokers(), &topics, 2 * events, Duration::from_secs(120)).await;
    let mut dbz: Vec<Record> = records
        .iter()
        .filter(|r| r.topic.starts_with(&dbz_prefix))
        .cloned()
        .collect();
    let ours: Vec<Record> = records
        .iter()
        .filter(|r| r.topic.starts_with(&relay_prefix))
        .cloned()
        .collect();
    assert_eq!(ours.len(), events, "the relay's records");
    assert_eq!(
        dbz.len(),
        events,
        "Debezium's records; its log:\n{}",
        debezium.log_text()
    );

    without_context_headers(&mut dbz);
    let (dbz, ours) = (
        by_topic_suffix(&dbz, &dbz_prefix),
        by_topic_suffix(&ours, &relay_prefix),
    );
    assert_eq!(
        dbz.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "the same topics"
    );
    let mut differences = Vec::new();
    for (topic, d) in &dbz {
        let o = &ours[topic];
        assert_eq!(d.len(), o.len(), "records on {topic}");
        for (i, (d, o)) in d.iter().zip(o).enumerate() {
            let at = format!("{topic} #{i}");
            if d.0 != o.0 {
                differences.push(format!("{at}: partition {} vs {}", d.0, o.0));
            }
            if d.1 != o.1 {
                differences.push(format!("{at}: key {} vs {}", show(&d.1), show(&o.1)));
            }
            if d.2 != o.2 {
                differences.push(format!("{at}: value {} vs {}", show(&d.2), show(&o.2)));
            }
            if d.3 != o.3 {
                let h = |v: &Vec<(String, Option<Vec<u8>>)>| {
                    v.iter()
                        .map(|(k, v)| format!("{k}={}", show(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                differences.push(format!("{at}: headers [{}] vs [{}]", h(&d.3), h(&o.3)));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "{} differences (Debezium vs relay):\n{}",
        differences.len(),
        differences.join("\n")
    );
    drop(debezium);
    relay.terminate().await;
    db.drop().await;
}
