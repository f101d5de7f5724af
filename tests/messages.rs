//! pg_logical_emit_message as a table-less outbox: published in commit
//! order with the table events of the same transaction; rolled back with
//! it; non-transactional messages published at once; other prefixes ignored.

use crate::support;

use std::time::Duration;

use outbox_relay::lsn::Lsn;
use support::*;

/// A relay publishing rows to `rows` and `outbox:` messages to `msgs`.
fn message_relay_args(
    db: &TestDb,
    brokers: &str,
    slot: &str,
    rows: &str,
    msgs: &str,
) -> Vec<String> {
    relay_args(
        db,
        brokers,
        &[
            "--slot",
            slot,
            "--topic",
            rows,
            "--message-prefix",
            "outbox:",
            "--message-topic",
            msgs,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_messages_are_events_in_commit_order() {
    let (db, slot) = TestDb::classic("msg").await;
    let prefix = unique("msg");
    let topic = format!("{prefix}.T");
    create_topics(&brokers(), &[&topic], 3).await;
    let rows = format!("{prefix}.{{event_type}}");
    let msgs = format!("{prefix}.{{type}}");
    let mut relay = Relay::start(&message_relay_args(&db, &brokers(), &slot, &rows, &msgs));
    db.wait_streaming(&slot).await;
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
    let records = consume_topic(&topic, 4).await;
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
    db.wait_confirmed_past(&slot, after, "the slot to pass the messages")
        .await;
    relay.stop_clean().await;

    // After a restart nothing is published again (the non-transactional
    // message was confirmed past its position).
    let mut relay = Relay::start(&message_relay_args(&db, &brokers(), &slot, &rows, &msgs));
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a1', '{\"step\": 5}')").await;
    let records = consume_topic(&topic, 5).await;
    assert_eq!(records.len(), 5, "no repeats after a restart: {records:?}");
    relay.stop_clean().await;
    db.drop().await;
}

/// C1 of the December 2026 review. The LSN of a non-transactional message is
/// the end of its record, where the next record starts: here the commit
/// record of the outbox transaction that was open around it. The message is
/// acknowledged while that transaction's rows are held in flight (the fault
/// proxy cuts the broker off), the relay is SIGKILLed and restarted: every row
/// must arrive. A relay that confirmed one byte past the message had the
/// server skip the whole transaction on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_right_before_a_commit_does_not_skip_that_transaction() {
    use support::proxy::{Mode, Proxy};

    let (db, slot) = TestDb::classic("msg_c1").await;
    // To prove the message's record and the commit record are adjacent.
    db.exec("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .await;
    let listen = free_port();
    let proxy = Proxy::start(format!("127.0.0.1:{listen}").parse().unwrap()).await;
    let broker = Kafka::behind_proxy(listen, proxy.port).await;
    let prefix = unique("c1");
    let rows_topic = format!("{prefix}.T");
    let msgs_topic = format!("{prefix}.msg");
    create_topics(&broker.brokers(), &[&rows_topic, &msgs_topic], 1).await;
    let rows = format!("{prefix}.{{event_type}}");
    let args = message_relay_args(&db, &broker.brokers(), &slot, &rows, &msgs_topic);
    let mut relay = Relay::start(&args);
    db.wait_streaming(&slot).await;
    let writer = sql_client(&db.url).await;

    // Other sessions of the cluster may write a WAL record between the
    // message and the commit; then this round proves nothing: try again.
    let mut adjacent_at = None;
    for round in 0..10 {
        writer
            .batch_execute(&format!(
                "BEGIN; INSERT INTO outbox (event_type, aggregate_id, payload)
                 SELECT 'T', 'a1', jsonb_build_object('round', {round}, 'n', n) FROM generate_series(1, 3) n"
            ))
            .await
            .unwrap();
        let msg: String = scalar(
            &db.client,
            "SELECT pg_logical_emit_message(false, 'outbox:T:m1', '{}')::text",
            &[],
        )
        .await;
        let msg: Lsn = msg.parse().unwrap();
        // The relay published the message and confirmed it.
        db.wait_confirmed_past(&slot, msg, "the message to be confirmed")
            .await;
        // From now on nothing reaches the broker (nothing held to leak
        // through later either).
        proxy.refuse_and_cut();
        writer.batch_execute("COMMIT").await.unwrap();
        let commit_start: Option<String> = db
            .client
            .query_one(
                "SELECT start_lsn::text FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_lsn())
                  WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' LIMIT 1",
                &[&msg.to_string()],
            )
            .await
            .ok()
            .map(|r| r.get(0));
        if commit_start.as_deref().and_then(|s| s.parse::<Lsn>().ok()) == Some(msg) {
            adjacent_at = Some((round, msg));
            break;
        }
        eprintln!("round {round}: another record came between the message at {msg} and the commit ({commit_start:?}); again");
        proxy.set_mode(Mode::Pass);
        db.wait_confirmed_now(&slot, "the round to be delivered")
            .await;
    }
    let (round, msg) = adjacent_at.expect("a round where the commit record follows the message");
    // The server sent the transaction; its rows cannot be acknowledged.
    let end = db.current_wal_lsn().await;
    db.wait_sent(&slot, end).await;
    let confirmed = db.confirmed_flush_lsn(&slot).await;
    assert!(
        confirmed <= msg,
        "the slot confirmed {confirmed}, past the commit record at {msg} of a transaction in flight"
    );
    relay.signal("KILL");
    relay.wait(Duration::from_secs(10)).await;
    proxy.set_mode(Mode::Pass);
    let mut relay = Relay::start(&args);
    let got = consume(
        &broker.brokers(),
        std::slice::from_ref(&rows_topic),
        3 * (round + 1),
        Duration::from_secs(60),
    )
    .await;
    let last_round: Vec<_> = got
        .iter()
        .filter(|r| r.payload_json()["round"] == round)
        .collect();
    assert!(
        last_round.len() >= 3,
        "rows of the transaction committed right after the message were lost: {got:?}"
    );
    relay.stop_clean().await;
    db.drop().await;
}
