//! Decoder tests on pgoutput messages captured from a real PostgreSQL 15 server
//! with `pg_logical_slot_peek_binary_changes` (protocol version 1, text mode,
//! `messages = true`). The fixture, its workload and the capture query are in
//! `tests/fixtures/pgoutput_pg15_proto1.txt`; `scripts/capture-pgoutput`
//! regenerates it.
//!
//! The workload uses explicit values everywhere, so a new capture has the same
//! tuple text byte for byte; LSNs, xids, commit timestamps and relation OIDs are
//! checked relationally (they may differ between captures).

use bytes::Bytes;
use outbox_relay::lsn::Lsn;
use outbox_relay::pipeline::decode::pgoutput::{
    decode, Begin, Column, Commit, Insert, LogicalMessage, Message, OldTupleKind, Relation,
    TupleValue,
};

const FIXTURE: &str = include_str!("fixtures/pgoutput_pg15_proto1.txt");

// Type OIDs from pg_type.
const INT8: u32 = 20;
const UUID: u32 = 2950;
const TEXT: u32 = 25;
const JSONB: u32 = 3802;
const TIMESTAMPTZ: u32 = 1184;
const VARCHAR: u32 = 1043;
/// `VARCHAR(255)`: the type modifier is the length plus the 4-byte header.
const VARCHAR_255_TYPMOD: i32 = 255 + 4;

/// The captured messages, in stream order.
fn captured() -> Vec<Bytes> {
    outbox_relay::testing::captured(FIXTURE)
}

fn decoded() -> Vec<LogicalMessage> {
    captured()
        .into_iter()
        .enumerate()
        .map(|(i, m)| decode(m).unwrap_or_else(|e| panic!("message {i} failed to decode: {e}")))
        .collect()
}

fn kind(m: &LogicalMessage) -> &'static str {
    match m {
        LogicalMessage::Begin(_) => "Begin",
        LogicalMessage::Commit(_) => "Commit",
        LogicalMessage::Relation(_) => "Relation",
        LogicalMessage::Insert(_) => "Insert",
        LogicalMessage::Update(_) => "Update",
        LogicalMessage::Delete(_) => "Delete",
        LogicalMessage::Truncate(_) => "Truncate",
        LogicalMessage::Message(_) => "Message",
        other => panic!("unexpected kind in the capture: {other:?}"),
    }
}

fn text(s: &'static str) -> TupleValue {
    TupleValue::Text(Bytes::from_static(s.as_bytes()))
}

fn col(flags: u8, name: &str, type_oid: u32, type_modifier: i32) -> Column {
    Column {
        flags,
        name: name.to_string(),
        type_oid,
        type_modifier,
    }
}

fn outbox_relation(oid: u32) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: vec![
            col(1, "id", INT8, -1),
            col(0, "event_id", UUID, -1),
            col(0, "event_type", TEXT, -1),
            col(0, "aggregate_id", TEXT, -1),
            col(0, "payload", JSONB, -1),
            col(0, "occurred_at", TIMESTAMPTZ, -1),
            col(0, "processed_at", TIMESTAMPTZ, -1),
            col(0, "created_at", TIMESTAMPTZ, -1),
        ],
    }
}

fn debezium_relation(oid: u32) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: "outboxevent".into(),
        replica_identity: b'd',
        columns: vec![
            col(1, "id", UUID, -1),
            col(0, "aggregatetype", VARCHAR, VARCHAR_255_TYPMOD),
            col(0, "aggregateid", VARCHAR, VARCHAR_255_TYPMOD),
            col(0, "type", VARCHAR, VARCHAR_255_TYPMOD),
            col(0, "payload", JSONB, -1),
        ],
    }
}

fn as_relation(m: &LogicalMessage) -> &Relation {
    match m {
        LogicalMessage::Relation(r) => r,
        other => panic!("expected a Relation, got {other:?}"),
    }
}

fn as_insert(m: &LogicalMessage) -> &Insert {
    match m {
        LogicalMessage::Insert(i) => i,
        other => panic!("expected an Insert, got {other:?}"),
    }
}

#[test]
fn fixture_has_the_expected_message_sequence() {
    let kinds: Vec<_> = decoded().iter().map(kind).collect();
    #[rustfmt::skip]
    let expected = [
        // BEGIN; INSERT 2 rows into outbox; COMMIT
        "Begin", "Relation", "Insert", "Insert", "Commit",
        // INSERT 1 row into outbox (relation already sent in this session)
        "Begin", "Insert", "Commit",
        // INSERT into the Debezium table
        "Begin", "Relation", "Insert", "Commit",
        // UPDATE outbox
        "Begin", "Update", "Commit",
        // DELETE FROM outboxevent
        "Begin", "Delete", "Commit",
        // pg_logical_emit_message(true, ...) in a transaction
        "Begin", "Message", "Commit",
        // TRUNCATE outbox, outboxevent: new relfilenodes invalidate the
        // relation cache, so both Relations are sent again first.
        "Begin", "Relation", "Relation", "Truncate", "Commit",
    ];
    assert_eq!(kinds, expected);
}

#[test]
fn begin_and_commit_lsns_are_consistent() {
    let msgs = decoded();
    let mut txns: Vec<(Begin, Commit)> = Vec::new();
    let mut open: Option<Begin> = None;
    for m in &msgs {
        match m {
            LogicalMessage::Begin(b) => {
                assert!(open.is_none(), "nested Begin");
                open = Some(b.clone());
            }
            LogicalMessage::Commit(c) => {
                let b = open.take().expect("Commit without Begin");
                txns.push((b, c.clone()));
            }
            _ => assert!(open.is_some(), "change outside a transaction: {m:?}"),
        }
    }
    assert!(open.is_none(), "unterminated transaction");
    assert_eq!(txns.len(), 7);

    // 2020-01-01 and 2100-01-01 as microseconds since the Postgres epoch.
    let plausible = 631_152_000_000_000i64..3_155_760_000_000_000i64;
    for (b, c) in &txns {
        assert_eq!(
            b.final_lsn, c.commit_lsn,
            "Begin.final_lsn != Commit.commit_lsn"
        );
        assert!(
            c.end_lsn > c.commit_lsn,
            "end_lsn {} <= commit_lsn {}",
            c.end_lsn,
            c.commit_lsn
        );
        assert_eq!(b.commit_time, c.commit_time);
        assert!(
            plausible.contains(&c.commit_time),
            "commit time {}",
            c.commit_time
        );
        assert_eq!(c.flags, 0);
        assert_ne!(c.commit_lsn, Lsn::ZERO);
    }
    for w in txns.windows(2) {
        let ((b0, c0), (b1, c1)) = (&w[0], &w[1]);
        assert!(c1.commit_lsn > c0.commit_lsn);
        assert!(c1.end_lsn > c0.end_lsn);
        assert!(
            c1.commit_lsn >= c0.end_lsn,
            "transactions overlap in the WAL"
        );
        assert!(b1.xid > b0.xid, "xids {} then {}", b0.xid, b1.xid);
        assert!(c1.commit_time >= c0.commit_time);
    }
}

#[test]
fn relations_describe_both_outbox_tables() {
    let msgs = decoded();
    let outbox = as_relation(&msgs[1]);
    assert_eq!(*outbox, outbox_relation(outbox.oid));
    let dbz = as_relation(&msgs[9]);
    assert_eq!(*dbz, debezium_relation(dbz.oid));
    assert_ne!(outbox.oid, dbz.oid);
    assert!(
        outbox.oid >= 16384 && dbz.oid >= 16384,
        "user OIDs start at 16384"
    );

    // Re-sent unchanged before the TRUNCATE.
    assert_eq!(as_relation(&msgs[22]), outbox);
    assert_eq!(as_relation(&msgs[23]), dbz);

    // Only the primary key carries the key flag.
    for r in [outbox, dbz] {
        let keys: Vec<_> = r
            .columns
            .iter()
            .filter(|c| c.flags & 1 != 0)
            .map(|c| &c.name[..])
            .collect();
        assert_eq!(keys, ["id"], "{}", r.name);
    }
}

#[test]
fn inserts_carry_the_exact_text_values() {
    let msgs = decoded();
    let outbox_oid = as_relation(&msgs[1]).oid;
    let dbz_oid = as_relation(&msgs[9]).oid;

    // Values as `SELECT ... FROM outbox` printed them at capture time (session
    // TimeZone UTC); jsonb output reorders keys (shorter first), normalises the
    // spacing and resolves `\u00e9`, and numeric keeps `12.50`.
    let row1 = as_insert(&msgs[2]);
    assert_eq!(row1.relation_oid, outbox_oid);
    assert_eq!(
        row1.tuple,
        vec![
            text("1"),
            text("0b6e3a52-8c1d-4f7e-9a3b-5d2c1e0f4a11"),
            text("OrderPlaced"),
            text("order-ü-1"),
            text(
                r#"{"esc": "café", "note": "日本語 ✓ 🚀", "total": 12.50, "customer": "Zoë Ørsted"}"#
            ),
            text("2024-05-01 12:34:56.789012+00"),
            text("2024-05-01 12:35:00+00"),
            text("2024-05-01 12:34:56.789012+00"),
        ]
    );
    // The unicode travels as raw UTF-8, never escaped.
    let TupleValue::Text(payload) = &row1.tuple[4] else {
        unreachable!()
    };
    assert_eq!(payload.len(), 90);
    assert!(
        payload.windows(4).any(|w| w == [0xf0, 0x9f, 0x9a, 0x80]),
        "U+1F680 as UTF-8"
    );
    assert!(payload.windows(5).any(|w| w == b"caf\xc3\xa9"));
    assert!(!payload.windows(2).any(|w| w == b"\\u"));
    let TupleValue::Text(aggregate) = &row1.tuple[3] else {
        unreachable!()
    };
    assert_eq!(&aggregate[..], b"order-\xc3\xbc-1");

    let row2 = as_insert(&msgs[3]);
    assert_eq!(row2.relation_oid, outbox_oid);
    assert_eq!(
        row2.tuple,
        vec![
            text("2"),
            text("1c7f4b63-9d2e-4a8f-8b4c-6e3d2f1a5b22"),
            text("OrderNoted"),
            text("order-2"),
            text(r#"{"s": ""}"#),
            text("2024-05-01 12:34:57+00"),
            TupleValue::Null,
            text("2024-05-01 12:34:57+00"),
        ]
    );

    let row3 = as_insert(&msgs[6]);
    assert_eq!(row3.relation_oid, outbox_oid);
    assert_eq!(
        row3.tuple,
        vec![
            text("3"),
            text("2d8a5c74-ae3f-4b90-9c5d-7f4e3a2b6c33"),
            text("OrderShipped"),
            text("order-3"),
            text(r#"{"items": [1, 2], "carrier": null, "express": true}"#),
            text("2024-05-02 00:00:00+00"),
            TupleValue::Null,
            text("2024-05-02 00:00:00+00"),
        ]
    );

    let dbz = as_insert(&msgs[10]);
    assert_eq!(dbz.relation_oid, dbz_oid);
    assert_eq!(
        dbz.tuple,
        vec![
            text("3e9b6d85-bf4a-4ca1-8d6e-8a5f4b3c7d44"),
            text("Order"),
            text("42"),
            text("OrderCreated"),
            text(r#"{"id": 42, "lines": []}"#),
        ]
    );

    // Every Insert has as many values as its relation has columns.
    for m in &msgs {
        if let LogicalMessage::Insert(i) = m {
            let expected = if i.relation_oid == outbox_oid { 8 } else { 5 };
            assert_eq!(i.tuple.len(), expected);
        }
    }
}

#[test]
fn update_delete_truncate_and_message_are_decoded() {
    let msgs = decoded();
    let outbox_oid = as_relation(&msgs[1]).oid;
    let dbz_oid = as_relation(&msgs[9]).oid;

    // UPDATE outbox SET processed_at = ... WHERE id = 2: the key did not
    // change and the replica identity is the default, so no old tuple.
    let LogicalMessage::Update(update) = &msgs[13] else {
        panic!("expected an Update, got {:?}", msgs[13])
    };
    assert_eq!(update.xid, None);
    assert_eq!(update.relation_oid, outbox_oid);
    assert_eq!(update.old, None);
    assert_eq!(update.new.len(), 8);
    assert_eq!(update.new[0], text("2"));
    assert_eq!(update.new[6], text("2024-05-03 00:00:00+00"));

    // DELETE FROM outboxevent: the old key ('K'), non-key columns null.
    let LogicalMessage::Delete(delete) = &msgs[16] else {
        panic!("expected a Delete, got {:?}", msgs[16])
    };
    assert_eq!(delete.relation_oid, dbz_oid);
    assert_eq!(delete.old.kind, OldTupleKind::Key);
    assert_eq!(
        delete.old.tuple,
        vec![
            text("3e9b6d85-bf4a-4ca1-8d6e-8a5f4b3c7d44"),
            TupleValue::Null,
            TupleValue::Null,
            TupleValue::Null,
            TupleValue::Null,
        ]
    );

    // pg_logical_emit_message(true, 'p', 'hello'), inside its transaction.
    let LogicalMessage::Message(message) = &msgs[19] else {
        panic!("expected a Message, got {:?}", msgs[19])
    };
    let (LogicalMessage::Begin(begin), LogicalMessage::Commit(commit)) = (&msgs[18], &msgs[20])
    else {
        panic!("the message is not wrapped in Begin/Commit")
    };
    assert_eq!(
        *message,
        Message {
            xid: None,
            flags: 1,
            lsn: message.lsn,
            prefix: "p".into(),
            content: Bytes::from_static(b"hello"),
        }
    );
    assert!(message.transactional());
    // The server reports the end of the message's WAL record, which here is
    // where the commit record starts.
    assert!(message.lsn <= begin.final_lsn);
    assert_eq!(begin.final_lsn, commit.commit_lsn);

    // TRUNCATE outbox, outboxevent: no CASCADE, no RESTART IDENTITY.
    let LogicalMessage::Truncate(truncate) = &msgs[24] else {
        panic!("expected a Truncate, got {:?}", msgs[24])
    };
    let mut oids = truncate.relation_oids.clone();
    oids.sort_unstable();
    let mut expected = vec![outbox_oid, dbz_oid];
    expected.sort_unstable();
    assert_eq!((truncate.xid, truncate.options, oids), (None, 0, expected));
    assert!(!truncate.cascade() && !truncate.restart_identity());
}

/// Every message is decoded field by field and its last field ends it, so
/// every strict prefix must be an error.
#[test]
fn every_strict_prefix_is_an_error() {
    for (i, (full, msg)) in captured().into_iter().zip(decoded()).enumerate() {
        for n in 0..full.len() {
            let result = decode(full.slice(..n));
            assert!(
                result.is_err(),
                "message {i} ({}), prefix of {n}/{} bytes decoded to {result:?}",
                kind(&msg),
                full.len()
            );
        }
    }
}

#[test]
fn flipping_any_byte_never_panics() {
    for full in captured() {
        let mut buf = full.to_vec();
        for pos in 0..buf.len() {
            let orig = buf[pos];
            for v in [
                0x00,
                0xff,
                0x7f,
                0x80,
                0x01,
                orig ^ 0x01,
                orig.wrapping_add(1),
                orig.wrapping_sub(1),
            ] {
                buf[pos] = v;
                let _ = decode(Bytes::copy_from_slice(&buf));
            }
            buf[pos] = orig;
        }
    }
}
