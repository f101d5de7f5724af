//! Debezium side by side (issue 14): the same outbox rows through Debezium's
//! PostgreSQL connector and Outbox Event Router (Kafka Connect standalone,
//! started by `scripts/debezium` as a careful operator would set it up) and
//! through `outbox-relay --preset debezium`, each on its own slot, compared
//! record by record: topic, partition, key bytes, value bytes, the `id`
//! header and every other header. Every difference found here is either
//! closed by an option or written down in docs/migrating-from-debezium.md.

use crate::support;

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
        run_ok(Command::new(script()).args(&args), "scripts/debezium up");
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
/// record has all four, or, with `extended.headers.enabled=false`, none.
fn without_context_headers(records: &mut [Record], extended: bool) {
    for r in records {
        let names: Vec<String> = r
            .headers
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("__debezium.context."))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        let mut expected: Vec<String> = CONTEXT_HEADERS
            .iter()
            .filter(|_| extended)
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        assert_eq!(sorted, expected, "Debezium's context headers on {r:?}");
        r.headers
            .retain(|(k, _)| !k.starts_with("__debezium.context."));
    }
}

/// An aggregate's events: their topic (prefix taken off) and key.
type Aggregate = (String, Vec<u8>);

/// Each event's record from each publisher, paired by the `id` header,
/// with the topic's publisher prefix taken off; and checks that both
/// published the events of each aggregate in the same order.
fn paired(
    dbz: &[Record],
    dbz_prefix: &str,
    ours: &[Record],
    our_prefix: &str,
) -> Vec<(Record, Record)> {
    let strip = |records: &[Record], prefix: &str| -> BTreeMap<String, Record> {
        let mut by_id = BTreeMap::new();
        for r in records {
            let mut r = r.clone();
            r.topic = r
                .topic
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{} outside {prefix}", r.topic))
                .to_string();
            let id = r
                .header("id")
                .unwrap_or_else(|| panic!("no id header: {r:?}"));
            assert!(by_id.insert(id, r).is_none(), "an event published twice");
        }
        by_id
    };
    let (d, o) = (strip(dbz, dbz_prefix), strip(ours, our_prefix));
    assert_eq!(
        d.keys().collect::<Vec<_>>(),
        o.keys().collect::<Vec<_>>(),
        "the same events"
    );
    // Per aggregate (topic and key of the relay's record), in offset order.
    let order = |records: &BTreeMap<String, Record>,
                 aggregate_of: &dyn Fn(&Record) -> Aggregate| {
        let mut per: BTreeMap<Aggregate, Vec<(i64, String)>> = BTreeMap::new();
        for (id, r) in records {
            per.entry(aggregate_of(r))
                .or_default()
                .push((r.offset, id.clone()));
        }
        per.into_iter()
            .map(|(k, mut v)| {
                v.sort();
                (k, v.into_iter().map(|(_, id)| id).collect::<Vec<_>>())
            })
            .collect::<BTreeMap<_, _>>()
    };
    let aggregate = |r: &Record| {
        (
            o[&r.header("id").unwrap()].topic.clone(),
            o[&r.header("id").unwrap()].key.clone().unwrap_or_default(),
        )
    };
    assert_eq!(
        order(&d, &aggregate),
        order(&o, &aggregate),
        "per-aggregate order"
    );
    d.into_values().zip(o.into_values()).collect()
}

fn show(b: &Option<Vec<u8>>) -> String {
    match b {
        None => "null".into(),
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
    }
}

fn show_headers(v: &[(String, Option<Vec<u8>>)]) -> String {
    v.iter()
        .map(|(k, v)| format!("{k}={}", show(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The workload through Debezium (set up as `scripts/debezium up` does,
/// plus `debezium_args`) and through `--preset debezium`; each event's two
/// records, Debezium's context headers checked and taken off.
async fn side_by_side(name: &str, debezium_args: &[&str], relay_extra: &[&str]) -> SideBySide {
    let db = TestDb::new(name).await;
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
    let request_size = format!("producer.max.request.size={BIG}");
    let mut args = vec!["--worker", &request_size];
    args.extend_from_slice(debezium_args);
    let debezium = Debezium::start(
        &db,
        &dbz_slot,
        &format!("{dbz_prefix}outbox.event.${{routedByValue}}"),
        &args,
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
    let max_bytes = format!("message.max.bytes={BIG}");
    let mut args = vec![
        "--preset",
        "debezium",
        "--slot",
        &relay_slot,
        "--topic",
        &relay_topic,
        "--kafka-property",
        &max_bytes,
    ];
    args.extend_from_slice(relay_extra);
    let mut relay = Relay::start(&relay_args(&db, &brokers(), &args));
    db.wait_streaming(&relay_slot).await;

    let before = epoch_ms();
    for t in &workload(&types) {
        db.exec(t).await;
    }
    let end = db.current_wal_lsn().await;
    // Debezium confirms only the position of the last event it published
    // (after an offset flush), never an idle server's: its records are
    // counted instead.
    db.wait_confirmed_past(&relay_slot, end, "the relay to pass the workload")
        .await;
    let events = 30 + 4 + 5 + 1 + 1 + 10;
    let records = consume(&brokers(), &topics, 2 * events, Duration::from_secs(120)).await;
    let (mut dbz, ours): (Vec<Record>, Vec<Record>) = records
        .into_iter()
        .partition(|r| r.topic.starts_with(&dbz_prefix));
    assert_eq!(ours.len(), events, "the relay's records");
    assert_eq!(
        dbz.len(),
        events,
        "Debezium's records; its log:\n{}",
        debezium.log_text()
    );
    let read = epoch_ms();
    let extended = !debezium_args.contains(&"extended.headers.enabled=false");
    without_context_headers(&mut dbz, extended);
    let pairs = paired(&dbz, &dbz_prefix, &ours, &relay_prefix);
    drop(debezium);
    relay.stop_clean().await;
    db.drop().await;
    SideBySide {
        pairs,
        written_from: before,
        read_at: read,
    }
}

/// Each event's records from both publishers, and when the workload began to be
/// written and when its records had all been read (ms since the epoch).
struct SideBySide {
    pairs: Vec<(Record, Record)>,
    written_from: i64,
    read_at: i64,
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64
}

/// Both publishers stamp a record with the time they publish it (a CreateTime):
/// the relay when it produces the record, Debezium's router with the change
/// event's `ts_ms`, when the connector processed the change. Neither takes a
/// column of the row or the commit time (Debezium's `table.field.event.timestamp`
/// would, and has no counterpart in the relay): each lies between the start of
/// the workload and the moment its records were read. Returns, per pair,
/// Debezium's timestamp minus the relay's.
fn publication_timestamps(run: &SideBySide) -> Vec<i64> {
    let mut skew = Vec::new();
    for (d, o) in &run.pairs {
        let at = format!("{} {}", o.topic, o.header("id").unwrap_or_default());
        let (dt, dk) = d
            .timestamp
            .unwrap_or_else(|| panic!("{at}: Debezium's record has no timestamp"));
        let (ot, ok) = o
            .timestamp
            .unwrap_or_else(|| panic!("{at}: the relay's record has no timestamp"));
        assert_eq!((dk, ok), ("CreateTime", "CreateTime"), "{at}");
        for (who, t) in [("Debezium", dt), ("the relay", ot)] {
            assert!(
                (run.written_from..=run.read_at).contains(&t),
                "{at}: {who}'s timestamp {t} is outside the run [{}, {}]: not the time it published",
                run.written_from,
                run.read_at
            );
        }
        skew.push(dt - ot);
    }
    skew
}

/// With StringConverter keys and values (what `scripts/debezium` sets up)
/// and `extended.headers.enabled=false`: the same topic, partition, key
/// bytes, value bytes and headers. (With Debezium's default it adds its four
/// context headers: the next test has them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_and_the_relay_publish_the_same_records() {
    let no_context = ["--connector", "extended.headers.enabled=false"];
    let run = side_by_side("dbz_diff", &no_context, &[]).await;
    publication_timestamps(&run);
    let differences = differences(&run.pairs);
    assert!(
        differences.is_empty(),
        "{} differences (Debezium vs relay):\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// Every way each pair's two records differ: topic, partition, key, value, headers.
fn differences(pairs: &[(Record, Record)]) -> Vec<String> {
    let mut differences = Vec::new();
    for (d, o) in pairs {
        let at = format!("{} {}", o.topic, o.header("id").unwrap_or_default());
        if d.topic != o.topic {
            differences.push(format!("{at}: topic {} vs {}", d.topic, o.topic));
        }
        if d.partition != o.partition {
            differences.push(format!(
                "{at}: partition {} vs {}",
                d.partition, o.partition
            ));
        }
        if d.key != o.key {
            differences.push(format!("{at}: key {} vs {}", show(&d.key), show(&o.key)));
        }
        if d.payload != o.payload {
            differences.push(format!(
                "{at}: value {} vs {}",
                show(&d.payload),
                show(&o.payload)
            ));
        }
        if d.headers != o.headers {
            differences.push(format!(
                "{at}: headers [{}] vs [{}]",
                show_headers(&d.headers),
                show_headers(&o.headers)
            ));
        }
    }
    differences
}

/// `route.tombstone.on.empty.payload=true`, with the JsonConverter setup of
/// the next test (where a NULL payload is otherwise the text `null`): the
/// event with a NULL payload is a tombstone, a record with the key and no
/// value, as the relay always sends it; its headers and partition are the
/// relay's too. docs/migrating-from-debezium.md says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tombstones_on_empty_payloads_a_null_payload_is_a_record_without_a_value() {
    let mut args = json_converter_args();
    args.extend([
        "--connector",
        "transforms.outbox.route.tombstone.on.empty.payload=true",
    ]);
    let run = side_by_side("dbz_tomb", &args, &["--key-format", "json-string"]).await;
    let nulls: Vec<&(Record, Record)> = run
        .pairs
        .iter()
        .filter(|(_, o)| o.payload.is_none())
        .collect();
    assert_eq!(nulls.len(), 1, "the workload has one NULL payload");
    let (d, o) = nulls[0];
    assert_eq!(
        d.payload, None,
        "Debezium's record for a NULL payload: {d:?}"
    );
    assert_eq!((&d.key, d.partition), (&o.key, o.partition));
    assert_eq!(d.headers, o.headers);
    // Every other event as without the setting: the same key bytes, so the
    // same partitions.
    for (d, o) in &run.pairs {
        assert_eq!(
            (&d.topic, &d.key, d.partition),
            (&o.topic, &o.key, o.partition)
        );
    }
}

/// Keys and values through JsonConverter without schemas, and the router
/// expanding JSON payloads: a common Debezium outbox setup.
fn json_converter_args() -> Vec<&'static str> {
    vec![
        "--worker",
        "key.converter=org.apache.kafka.connect.json.JsonConverter",
        "--worker",
        "key.converter.schemas.enable=false",
        "--worker",
        "value.converter=org.apache.kafka.connect.json.JsonConverter",
        "--worker",
        "value.converter.schemas.enable=false",
        "--connector",
        "transforms.outbox.table.expand.json.payload=true",
    ]
}

/// With Debezium's JsonConverter (schemas off) for keys and values and
/// `table.expand.json.payload=true`, as many outbox setups have it: the
/// key is the aggregate id as a JSON string (quotes included, so most
/// keys would hash to another partition), which `--key-format json-string`
/// reproduces byte for byte, partitions included; a payload Debezium can expand is the
/// same document written compactly, one it cannot (a top-level array, an
/// array of mixed types inside) the stored text as a JSON string; a NULL
/// payload the text `null`. These are the claims of
/// docs/migrating-from-debezium.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_json_converter_keys_are_quoted_and_values_reserialised() {
    let pairs = side_by_side(
        "dbz_json",
        &json_converter_args(),
        &["--key-format", "json-string"],
    )
    .await
    .pairs;
    let (mut other_partition, mut expanded, mut encoded) = (0, 0, 0);
    for (d, o) in &pairs {
        let at = format!("{} {}", o.topic, o.header("id").unwrap_or_default());
        assert_eq!(d.topic, o.topic, "{at}");
        // The same bytes, Jackson's escaping included, and so the same
        // partition.
        assert_eq!(
            show(&d.key),
            show(&o.key),
            "{at}: --key-format json-string is Debezium's key"
        );
        assert_eq!(d.partition, o.partition, "{at}");
        // Without it the key would be the aggregate id's text, which most
        // of the time hashes elsewhere.
        let raw: String = serde_json::from_slice(o.key.as_deref().unwrap())
            .unwrap_or_else(|e| panic!("{at}: not a JSON string: {e}"));
        if murmur2_partition(raw.as_bytes(), 3) != d.partition {
            other_partition += 1;
        }
        assert_eq!(d.headers, o.headers, "{at}");
        let Some(text) = &o.payload else {
            // A NULL payload: the JSON text null, not a tombstone.
            assert_eq!(d.payload.as_deref(), Some(&b"null"[..]), "{at}");
            continue;
        };
        let theirs: serde_json::Value =
            serde_json::from_slice(d.payload.as_deref().expect("a value")).unwrap();
        let ours: serde_json::Value = serde_json::from_slice(text).unwrap();
        if theirs == ours {
            // Expanded: the same document, written compactly (so other
            // bytes, unless there is no space to take out).
            if d.payload.as_ref() != Some(text) {
                expanded += 1;
            }
        } else {
            // Not expanded (a top-level array, an array of mixed types
            // inside): the stored text as a JSON string.
            assert_eq!(theirs.as_str().map(str::as_bytes), Some(&text[..]), "{at}");
            if ours.is_array() {
                encoded += 1;
            }
        }
    }
    assert!(
        expanded > 0 && encoded > 0,
        "{expanded} expanded, {encoded} arrays encoded"
    );
    assert!(
        other_partition > pairs.len() / 2,
        "raw keys would hash elsewhere for most events: {other_partition} of {}",
        pairs.len()
    );
}
