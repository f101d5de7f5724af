//! The replication source under the conditions the field learned about the
//! hard way: a terminated walsender, a slot held by another connection, a
//! slot moved or invalidated behind the relay's back, a mapped column
//! dropped mid-stream, and a slow broker while wal_sender_timeout runs.

mod support;

use std::time::Duration;

use outbox_relay::lsn::Lsn;
use outbox_relay::replication::{ConnectParams, ReplicationConnection};
use support::*;

async fn insert(db: &TestDb, n: usize, tag: &str) {
    db.exec(&format!(
        "INSERT INTO outbox (event_type, aggregate_id, payload)
         SELECT 'T', 'agg-' || (g % 5), jsonb_build_object('tag', '{tag}', 'n', g) FROM generate_series(1, {n}) g"
    ))
    .await;
}

async fn active_pid(db: &TestDb, slot: &str) -> Option<i32> {
    db.client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

fn topic_args(prefix: &str, slot: &str) -> Vec<String> {
    vec![
        "--slot".into(),
        slot.into(),
        "--topic".into(),
        format!("{prefix}.{{event_type}}"),
    ]
}

fn args(db: &TestDb, brokers: &str, extra: &[String]) -> Vec<String> {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    relay_args(db, brokers, &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_walsender_is_terminated_and_loses_nothing() {
    let db = TestDb::new("src_terminate").await;
    let slot = db.classic_outbox().await;
    let prefix = unique("term");
    let mut relay = Relay::start(&args(&db, &brokers(), &topic_args(&prefix, &slot)));
    db.wait_streaming(&slot).await;
    insert(&db, 50, "before").await;
    let first = active_pid(&db, &slot).await.unwrap();
    db.exec(&format!("SELECT pg_terminate_backend({first})"))
        .await;
    insert(&db, 50, "during").await;
    wait_until(Duration::from_secs(30), "a new walsender", || async {
        active_pid(&db, &slot).await.is_some_and(|p| p != first)
    })
    .await;
    insert(&db, 50, "after").await;
    let records = consume_topic(&format!("{prefix}.T"), 150).await;
    let mut ids: Vec<String> = records.iter().map(|r| r.header("id").unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 150, "every event delivered after the reconnect");
    let after = db.current_wal_lsn().await;
    db.wait_confirmed(&slot, after, "the slot to follow").await;
    assert!(relay.is_running());
    let log = relay.log_text();
    assert!(
        log.contains("reconnecting and resuming from the slot"),
        "{log}"
    );
    relay.terminate().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_waits_as_a_standby_and_takes_over() {
    let db = TestDb::new("src_standby").await;
    let slot = db.classic_outbox().await;
    let prefix = unique("standby");
    let a = args(&db, &brokers(), &topic_args(&prefix, &slot));
    let mut primary = Relay::start(&a);
    db.wait_streaming(&slot).await;
    let holder = active_pid(&db, &slot).await.unwrap();
    let mut standby = Relay::start(&a);
    wait_until(
        Duration::from_secs(30),
        "the standby to report the holder",
        || async {
            standby
                .log_text()
                .contains(&format!("is active for PID {holder}"))
        },
    )
    .await;
    assert!(
        standby.is_running(),
        "a standby waits instead of exiting: {}",
        standby.log_text()
    );
    insert(&db, 20, "primary").await;
    consume_topic(&format!("{prefix}.T"), 20).await;
    primary.terminate().await;
    wait_until(
        Duration::from_secs(60),
        "the standby to take the slot",
        || async { active_pid(&db, &slot).await.is_some_and(|p| p != holder) },
    )
    .await;
    insert(&db, 20, "standby").await;
    let records = consume_topic(&format!("{prefix}.T"), 40).await;
    assert_eq!(records.len(), 40, "no duplicates after a clean handover");
    standby.terminate().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_stale_walsender_takes_the_slot_when_asked() {
    let db = TestDb::new("src_stale").await;
    let slot = db.classic_outbox().await;
    // A stale holder: a replication connection that started streaming and
    // then stopped reading, as a hung client would.
    let cfg: tokio_postgres::Config = db.url.parse().unwrap();
    let conn = ReplicationConnection::connect(&ConnectParams::from_config(&cfg).unwrap())
        .await
        .unwrap();
    let _stale = conn
        .start_logical(
            &slot,
            Lsn::ZERO,
            &[
                ("proto_version", "1".into()),
                ("publication_names", "\"outbox_pub\"".into()),
            ],
        )
        .await
        .unwrap();
    let stale_pid = active_pid(&db, &slot)
        .await
        .expect("held by the stale connection");
    let prefix = unique("stale");
    let mut extra = topic_args(&prefix, &slot);
    extra.push("--terminate-stale-walsender".into());
    let mut relay = Relay::start(&args(&db, &brokers(), &extra));
    wait_until(
        Duration::from_secs(30),
        "the relay to take the slot",
        || async { active_pid(&db, &slot).await.is_some_and(|p| p != stale_pid) },
    )
    .await;
    assert!(
        relay
            .log_text()
            .contains("terminating the walsender holding the slot"),
        "{}",
        relay.log_text()
    );
    insert(&db, 10, "x").await;
    let records = consume_topic(&format!("{prefix}.T"), 10).await;
    assert_eq!(records.len(), 10);
    relay.terminate().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mapped_column_stops_the_relay_and_the_slot_stays() {
    let db = TestDb::new("src_ddl").await;
    let slot = db.classic_outbox().await;
    let prefix = unique("ddl");
    let mut relay = Relay::start(&args(&db, &brokers(), &topic_args(&prefix, &slot)));
    db.wait_streaming(&slot).await;
    insert(&db, 5, "v1").await;
    // Adding a column, or changing one the relay does not map, just works.
    db.exec("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'")
        .await;
    insert(&db, 5, "v2").await;
    consume_topic(&format!("{prefix}.T"), 10).await;
    let delivered = db.current_wal_lsn().await;
    db.wait_confirmed(&slot, delivered, "the slot to pass the delivered events")
        .await;
    // Dropping a mapped column: the next row cannot be routed.
    db.exec("ALTER TABLE outbox DROP COLUMN aggregate_id").await;
    let before_bad = db.current_wal_lsn().await;
    db.exec("INSERT INTO outbox (event_type, payload) VALUES ('T', '{}')")
        .await;
    let after_bad = db.current_wal_lsn().await;
    assert_eq!(
        relay.wait(Duration::from_secs(30)).await,
        Some(1),
        "the relay stops"
    );
    let log = relay.log_text();
    assert!(
        log.contains("has no column aggregate_id (set by --key-column); its columns are: id, event_id, event_type, payload"),
        "{log}"
    );
    db.assert_not_confirmed(&slot, before_bad, after_bad, "the unroutable row")
        .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_advanced_behind_the_relays_back_is_detected() {
    let db = TestDb::new("src_moved").await;
    let slot = db.classic_outbox().await;
    let prefix = unique("moved");
    // The broker is unreachable, so the events stay in flight and the slot
    // stays before them.
    let mut relay = Relay::start(&args(
        &db,
        &format!("127.0.0.1:{}", free_port()),
        &topic_args(&prefix, &slot),
    ));
    db.wait_streaming(&slot).await;
    insert(&db, 5, "pending").await;
    let after = db.current_wal_lsn().await;
    wait_until(
        Duration::from_secs(30),
        "the walsender to send them",
        || async { db.sent_lsn(&slot).await.is_some_and(|s| s >= after) },
    )
    .await;
    let pid = active_pid(&db, &slot).await.unwrap();
    // Someone ends the relay's connection and advances the slot over the
    // undelivered events while it reconnects.
    db.exec(&format!("SELECT pg_terminate_backend({pid})"))
        .await;
    wait_until(Duration::from_secs(10), "the slot to be free", || async {
        active_pid(&db, &slot).await.is_none()
    })
    .await;
    db.exec(&format!(
        "SELECT pg_replication_slot_advance('{slot}', pg_current_wal_lsn())"
    ))
    .await;
    assert_eq!(
        relay.wait(Duration::from_secs(60)).await,
        Some(1),
        "{}",
        relay.log_text()
    );
    let log = relay.log_text();
    assert!(
        log.contains("something advanced the slot over events that were never delivered"),
        "{log}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_refused_with_a_fix() {
    let cluster = TempCluster::start(
        &[],
        &[
            "max_slot_wal_keep_size=1MB",
            "max_wal_size=32MB",
            "min_wal_size=32MB",
        ],
    );
    let url = cluster.url("postgres", None);
    let client = sql_client(&url).await;
    client.batch_execute(CLASSIC_TABLE).await.unwrap();
    relay_setup(&["--database-url", &url]);
    // Write and switch past several segments, then checkpoint: the slot's
    // WAL is removed and the slot is marked lost.
    client
        .batch_execute("CREATE TABLE filler (x text)")
        .await
        .unwrap();
    for _ in 0..4 {
        client
            .batch_execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000); SELECT pg_switch_wal();")
            .await
            .unwrap();
    }
    client.batch_execute("CHECKPOINT").await.unwrap();
    let status: String = client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost", "the test needs an invalidated slot");
    let (code, _, err) = relay_cmd(&["run", "--database-url", &url, "--kafka-brokers", &brokers()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("was invalidated (wal_status = 'lost')")
            && err.contains("drop and recreate the slot"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_keep_the_walsender_alive_while_the_broker_is_down() {
    // A short wal_sender_timeout: without feedback during backpressure the
    // server would end the connection within 2 s.
    let cluster = TempCluster::start(&[], &["wal_sender_timeout=2s"]);
    let url = cluster.url("postgres", None);
    let client = sql_client(&url).await;
    client.batch_execute(CLASSIC_TABLE).await.unwrap();
    relay_setup(&["--database-url", &url]);
    let mut relay = Relay::start(&[
        "--database-url".into(),
        url.clone(),
        "--kafka-brokers".into(),
        format!("127.0.0.1:{}", free_port()),
        "--max-inflight".into(),
        "5".into(),
    ]);
    let pid_of = || async {
        client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<i32>>(0)
    };
    wait_until(Duration::from_secs(30), "streaming", || async {
        pid_of().await.is_some()
    })
    .await;
    let pid = pid_of().await.unwrap();
    client
        .batch_execute("INSERT INTO outbox (event_type, aggregate_id, payload) SELECT 'T', 'a', '{}' FROM generate_series(1, 50)")
        .await
        .unwrap();
    // Three timeouts pass with reading paused (5 in flight, none acknowledged).
    for _ in 0..60 {
        assert_eq!(
            pid_of().await,
            Some(pid),
            "the walsender was replaced: {}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(relay.is_running());
    assert!(
        !relay.log_text().contains("reconnecting"),
        "{}",
        relay.log_text()
    );
    relay.signal("KILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_columns_type_change_stops_the_relay_and_the_slot_stays() {
    let db = TestDb::new("src_type").await;
    let slot = db.classic_outbox().await;
    let prefix = unique("type");
    let mut relay = Relay::start(&args(&db, &brokers(), &topic_args(&prefix, &slot)));
    db.wait_streaming(&slot).await;
    insert(&db, 3, "before").await;
    consume_topic(&format!("{prefix}.T"), 3).await;
    // The payload column becomes text: its bytes would mean something else.
    db.exec("ALTER TABLE outbox ALTER COLUMN payload TYPE text")
        .await;
    let before = db.current_wal_lsn().await;
    db.exec(
        "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', 'plain text')",
    )
    .await;
    let after = db.current_wal_lsn().await;
    assert_eq!(
        relay.wait(Duration::from_secs(30)).await,
        Some(1),
        "the relay stops"
    );
    let log = relay.log_text();
    assert!(
        log.contains("the type of column payload of public.outbox (set by --payload-column) changed under the running relay"),
        "{log}"
    );
    db.assert_not_confirmed(&slot, before, after, "the row with a changed payload type")
        .await;
    db.drop().await;
}
