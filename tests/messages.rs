//! pg_logical_emit_message as a table-less outbox: published in commit
//! order with the table events of the same transaction; rolled back with
//! it; non-transactional messages published at once; other prefixes ignored.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_messages_are_events_in_commit_order() {
    let db = TestDb::new("msg").await;
    db.exec(CLASSIC_TABLE).await;
    let slot = format!("s_{}", db.name);
    let (code, out, err) = relay_cmd(&["setup", "--database-url", &db.url, "--slot", &slot]);
    assert_eq!(code, 0, "{out}{err}");
    let prefix = unique("msg");
    let topic = format!("{prefix}.T");
    create_topics(&brokers(), &[&topic], 3).await;
    let rows = format!("{prefix}.{{event_type}}");
    let msgs = format!("{prefix}.{{type}}");
    let mut relay = Relay::start(&relay_args(
        &db,
        &brokers(),
        &[
            "--slot",
            &slot,
            "--topic",
            &rows,
            "--message-prefix",
            "outbox:",
            "--message-topic",
            &msgs,
        ],
    ));
    wait_until(Duration::from_secs(30), "streaming", || async {
        db.slot_active(&slot).await
    })
    .await;
    db.exec(
        "BEGIN;
         INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a1', '{\"step\": 1}');
         SELECT pg_logical_emit_message(true, 'outbox:T:a1', '{\"step\": 2}');
         SELECT pg_logical_emit_message(true, 'audit:T:a1', 'not ours');
         INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a1', '{\"step\": 3}');
         COMMIT;
         BEGIN;
         SELECT pg_logical_emit_message(true, 'outbox:T:a1', '{\"step\": \"rolled back\"}');
         SELECT pg_logical_emit_message(false, 'outbox:T:a1', '{\"step\": 4}');
         ROLLBACK;",
    )
    .await;
    let after = db.current_wal_lsn().await;
    let records = consume(
        &brokers(),
        std::slice::from_ref(&topic),
        4,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 4, "{records:?}");
    let mut by_offset: Vec<&Record> = records.iter().collect();
    by_offset.sort_by_key(|r| r.offset);
    assert!(records
        .iter()
        .all(|r| r.partition == records[0].partition && r.key_str() == "a1"));
    let steps: Vec<String> = by_offset
        .iter()
        .map(|r| r.payload_json()["step"].to_string())
        .collect();
    // Row, message, row of the committed transaction, in commit order; of
    // the rolled-back one only the non-transactional message exists.
    assert_eq!(steps, vec!["1", "2", "3", "4"]);
    let msg = by_offset[1];
    assert!(msg.header("id").unwrap().starts_with("lsn:"), "{msg:?}");
    assert_eq!(msg.header("type").as_deref(), Some("T"));
    wait_until(
        Duration::from_secs(30),
        "the slot to pass the messages",
        || async { db.confirmed_flush_lsn(&slot).await >= after },
    )
    .await;
    relay.signal("TERM");
    assert_eq!(
        relay.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        relay.log_text()
    );

    // After a restart nothing is published again (the non-transactional
    // message was confirmed past its position).
    let mut relay = Relay::start(&relay_args(
        &db,
        &brokers(),
        &[
            "--slot",
            &slot,
            "--topic",
            &rows,
            "--message-prefix",
            "outbox:",
            "--message-topic",
            &msgs,
        ],
    ));
    wait_until(Duration::from_secs(30), "streaming again", || async {
        db.slot_active(&slot).await
    })
    .await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a1', '{\"step\": 5}')").await;
    let records = consume(
        &brokers(),
        std::slice::from_ref(&topic),
        5,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 5, "no repeats after a restart: {records:?}");
    relay.signal("TERM");
    assert_eq!(relay.wait(Duration::from_secs(30)).await, Some(0));
    db.drop().await;
}
