//! /metrics, /healthz and /readyz of a running relay, scraped and asserted.

use crate::support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_published_and_follow_the_slot() {
    let (db, slot) = TestDb::classic("metrics_ok").await;
    let (prefix, template) = templated("metrics");
    let mut relay = Relay::start(&slot_args(&db, &slot, &template, &[]));
    let addr = relay.http_address().await;
    assert_eq!(http_get(&addr, "/healthz").await, (200, "ok\n".to_string()));
    wait_until(Duration::from_secs(30), "/readyz to say ready", || async {
        http_get(&addr, "/readyz").await.0 == 200
    })
    .await;

    db.exec(
        "INSERT INTO outbox (event_type, aggregate_id, payload)
         SELECT CASE WHEN g % 3 = 0 THEN 'Paid' ELSE 'Created' END, 'a' || (g % 4), '{}' FROM generate_series(1, 30) g",
    )
    .await;
    let after = db.current_wal_lsn().await;
    consume(
        &brokers(),
        &[format!("{prefix}.Created"), format!("{prefix}.Paid")],
        30,
        Duration::from_secs(60),
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the counters and the confirmed LSN",
        || async {
            let (_, text) = http_get(&addr, "/metrics").await;
            metric(
                &text,
                "outbox_events_published_total{event_type=\"Created\"}",
            ) == Some(20.0)
                && metric(&text, "outbox_events_published_total{event_type=\"Paid\"}") == Some(10.0)
                && metric(&text, "outbox_confirmed_lsn").is_some_and(|v| v as u64 >= after.0)
        },
    )
    .await;
    let (status, text) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "outbox_commit_to_ack_seconds_count"),
        Some(30.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_publish_duration_seconds_count"),
        Some(30.0),
        "{text}"
    );
    assert_eq!(metric(&text, "outbox_inflight_events"), Some(0.0), "{text}");
    assert_eq!(metric(&text, "outbox_up"), Some(1.0), "{text}");
    // The exported position is the slot's, as Postgres reports it.
    let confirmed = metric(&text, "outbox_confirmed_lsn").unwrap() as u64;
    wait_until(
        Duration::from_secs(10),
        "the slot to match the metric",
        || async { db.confirmed_flush_lsn(&slot).await.0 >= confirmed },
    )
    .await;
    relay.stop_clean().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_in_flight_gauge_show_an_unreachable_broker() {
    let (db, slot) = TestDb::classic("metrics_down").await;
    let relay = Relay::start(&relay_args(&db, &no_broker(), &["--slot", &slot]));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) SELECT 'T', 'a', '{}' FROM generate_series(1, 7)").await;
    wait_metric(&addr, "outbox_inflight_events", |v| v == Some(7.0)).await;
    let (status, body) = http_get(&addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_contains(&body, "broker_reachable=false");
    let text = http_get(&addr, "/metrics").await.1;
    assert!(
        metric(&text, "outbox_replication_lag_bytes").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    relay.signal("KILL");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_pauses_at_the_in_flight_byte_budget() {
    let (db, slot) = TestDb::classic("metrics_bytes").await;
    // No broker: nothing is acknowledged, so in-flight only grows until the
    // budget stops the reading of the WAL.
    let relay = Relay::start(&relay_args(
        &db,
        &no_broker(),
        &["--slot", &slot, "--max-inflight-bytes", "2000"],
    ));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    // 50 events of about 500 bytes each, one transaction each.
    for i in 0..50 {
        db.exec(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', jsonb_build_object('pad', repeat('x', 480), 'i', {i}))"
        ))
        .await;
    }
    wait_metric(&addr, "outbox_inflight_events", |v| v > Some(0.0)).await;
    // The walsender has sent far more than the relay took in.
    let after = db.current_wal_lsn().await;
    wait_until(
        Duration::from_secs(30),
        "the walsender to have sent everything it can",
        || async {
            db.sent_lsn(&slot).await.is_some_and(|s| s >= after)
                || metric(
                    &http_get(&addr, "/metrics").await.1,
                    "outbox_inflight_events",
                ) == Some(4.0)
        },
    )
    .await;
    // Each event is 500 bytes of key and payload (key `a`, payload
    // `{"i": N, "pad": "x…"}` of 499 bytes for one-digit N): the 4th reaches
    // the 2000-byte budget, so reading stops at exactly 4 (fewer would be a
    // relay that stopped reading early, more one that ignores the budget).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let inflight = metric(
            &http_get(&addr, "/metrics").await.1,
            "outbox_inflight_events",
        );
        if inflight == Some(4.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{inflight:?} events in flight after 30 s, not 4"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let inflight = metric(
            &http_get(&addr, "/metrics").await.1,
            "outbox_inflight_events",
        )
        .unwrap();
        assert_eq!(inflight, 4.0, "events in flight with a 2000-byte budget");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(relay);
    db.drop().await;
}

/// M10 of the December 2026 review: partitions added to a topic under the
/// relay. The probe follows the partition counts of the topics the relay
/// writes to; keys move to the new count at the next record sent with
/// nothing of the topic in flight, and that move is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_partitions_are_seen_and_counted() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let (db, slot) = TestDb::classic("metrics_parts").await;
    let topic = unique("parts");
    create_topics(&brokers(), &[&topic], 1).await;
    let relay = Relay::start(&slot_args(&db, &slot, &topic, &[]));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', '{}')")
        .await;
    let gauge = format!("outbox_topic_partitions{{topic=\"{topic}\"}}");
    let changes = format!("outbox_partition_count_changes_total{{topic=\"{topic}\"}}");
    wait_metric(&addr, &gauge, |v| v == Some(1.0)).await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let res = admin
        .create_partitions(&[NewPartitions::new(&topic, 3)], &AdminOptions::new())
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    wait_metric(&addr, &gauge, |v| v == Some(3.0)).await;
    assert_eq!(
        relay_metric(&addr, &changes).await,
        Some(0.0),
        "no record sent since"
    );
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) SELECT 'T', 'k' || g, '{}' FROM generate_series(1, 20) g").await;
    let records = consume_topic(&topic, 21).await;
    assert_eq!(records.len(), 21);
    wait_metric(&addr, &changes, |v| v == Some(1.0)).await;
    drop(relay);
    db.drop().await;
}

/// M1 of the December 2026 review: while one event is stuck, every
/// transaction behind it is tracked until it is acknowledged: here
/// non-empty transactions of another published table, and on PostgreSQL 14
/// every empty transaction of the database too. Reading pauses at
/// 2 × `--max-inflight` tracked transactions instead of growing without
/// bound, and goes on once the event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_behind_a_stuck_event_are_bounded() {
    let (db, slot) = TestDb::classic("metrics_m1").await;
    db.exec(
        "CREATE TABLE busy (id serial PRIMARY KEY); ALTER PUBLICATION outbox_pub ADD TABLE busy",
    )
    .await;
    // No broker yet on this port: the first event cannot be acknowledged.
    let port = free_port();
    let topic = unique("m1");
    let relay = Relay::start(&slot_args_via(
        &format!("127.0.0.1:{port}"),
        &db,
        &slot,
        &topic,
        &["--max-inflight", "20"],
    ));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', '{}')")
        .await;
    db.exec("DO $$ BEGIN FOR i IN 1..1000 LOOP INSERT INTO busy DEFAULT VALUES; COMMIT; END LOOP; END $$")
        .await;
    let skipped = "outbox_skipped_rows_total{table=\"public.busy\"}";
    let count = || async { metric(&http_get(&addr, "/metrics").await.1, skipped).unwrap_or(0.0) };
    wait_until(
        Duration::from_secs(30),
        "the relay to read transactions behind the stuck event",
        || async { count().await >= 30.0 },
    )
    .await;
    // At most 40 tracked transactions (2 × --max-inflight), the stuck one
    // included, and reading stays paused there: without the bound all 1000
    // are read while the event is stuck.
    let paused_at = count().await;
    assert!(
        paused_at <= 40.0,
        "{paused_at} rows read past the stuck event"
    );
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count().await, paused_at, "reading went on past the bound");
    }
    let kafka = Kafka::start(port).await;
    wait_until(
        Duration::from_secs(60),
        "every transaction read once the event is delivered",
        || async { count().await == 1000.0 },
    )
    .await;
    let records = consume(
        &kafka.brokers(),
        std::slice::from_ref(&topic),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), 1);
    drop(relay);
    db.drop().await;
}
