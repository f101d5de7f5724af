//! The replication source under the conditions the field learned about the
//! hard way: a terminated walsender, a slot held by another connection, a
//! slot moved or invalidated behind the relay's back, a mapped column
//! dropped mid-stream, and a slow broker while wal_sender_timeout runs.

use crate::support;

use std::time::Duration;

use outbox_relay::lsn::Lsn;
use outbox_relay::pipeline::source::{ConnectParams, ReplicationConnection};
use support::*;

async fn insert(db: &TestDb, n: usize, tag: &str) {
    db.exec(&format!(
        "INSERT INTO outbox (event_type, aggregate_id, payload)
         SELECT 'T', 'agg-' || (g % 5), jsonb_build_object('tag', '{tag}', 'n', g) FROM generate_series(1, {n}) g"
    ))
    .await;
}

async fn active_pid(db: &TestDb, slot: &str) -> Option<i32> {
    scalar(
        &db.client,
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
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
    let (db, slot) = TestDb::classic("src_terminate").await;
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
    db.wait_confirmed_now(&slot, "the slot to follow").await;
    assert!(relay.is_running());
    assert!(
        relay.resumed_from().len() >= 2,
        "a second session streamed: {}",
        relay.log_text()
    );
    relay.stop_clean().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_waits_as_a_standby_and_takes_over() {
    let (db, slot) = TestDb::classic("src_standby").await;
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
    primary.stop_clean().await;
    wait_until(
        Duration::from_secs(60),
        "the standby to take the slot",
        || async { active_pid(&db, &slot).await.is_some_and(|p| p != holder) },
    )
    .await;
    insert(&db, 20, "standby").await;
    let records = consume_topic(&format!("{prefix}.T"), 40).await;
    assert_eq!(records.len(), 40, "no duplicates after a clean handover");
    standby.stop_clean().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_stale_walsender_takes_the_slot_when_asked() {
    let (db, slot) = TestDb::classic("src_stale").await;
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
    let relay = Relay::start(&args(&db, &brokers(), &extra));
    wait_until(
        Duration::from_secs(30),
        "the relay to take the slot",
        || async { active_pid(&db, &slot).await.is_some_and(|p| p != stale_pid) },
    )
    .await;
    insert(&db, 10, "x").await;
    let records = consume_topic(&format!("{prefix}.T"), 10).await;
    assert_eq!(records.len(), 10);

    // M11 of the December 2026 review: a second relay with the flag does
    // not terminate a live one; it waits as a standby. Frozen (SIGSTOP), the
    // first one goes quiet and the second takes the slot.
    let holder = active_pid(&db, &slot)
        .await
        .expect("the relay holds the slot");
    let mut second = Relay::start(&args(&db, &brokers(), &extra));
    wait_until(
        Duration::from_secs(30),
        "the second relay to try",
        || async { !second.announced("http_listening").is_empty() },
    )
    .await;
    for _ in 0..50 {
        assert_eq!(
            active_pid(&db, &slot).await,
            Some(holder),
            "the second relay terminated a live walsender: {}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(second.is_running());
    relay.signal("STOP");
    wait_until(
        Duration::from_secs(60),
        "the second relay to take the slot from the frozen one",
        || async { active_pid(&db, &slot).await.is_some_and(|p| p != holder) },
    )
    .await;
    assert_eq!(second.resumed_from().len(), 1, "the second relay streams");
    relay.signal("CONT");
    relay.signal("KILL");
    second.stop_clean().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mapped_column_stops_the_relay_and_the_slot_stays() {
    let (db, slot) = TestDb::classic("src_ddl").await;
    let prefix = unique("ddl");
    let mut relay = Relay::start(&args(&db, &brokers(), &topic_args(&prefix, &slot)));
    db.wait_streaming(&slot).await;
    insert(&db, 5, "v1").await;
    // Adding a column, or changing one the relay does not map, just works.
    db.exec("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'")
        .await;
    insert(&db, 5, "v2").await;
    consume_topic(&format!("{prefix}.T"), 10).await;
    db.wait_confirmed_now(&slot, "the slot to pass the delivered events")
        .await;
    // Dropping a mapped column: the next row cannot be routed.
    db.exec("ALTER TABLE outbox DROP COLUMN aggregate_id").await;
    let before_bad = db.current_wal_lsn().await;
    db.exec("INSERT INTO outbox (event_type, payload) VALUES ('T', '{}')")
        .await;
    let after_bad = db.current_wal_lsn().await;
    relay.expect_exit(Duration::from_secs(30), Some(1)).await;
    // A schema problem, not a bad event: no policy would let it pass.
    assert_eq!(relay.stopped_for(), Some(None));
    let log = relay.log_text();
    assert_contains(&log, "has no column aggregate_id (set by --key-column); its columns are: id, event_id, event_type, payload");
    db.assert_not_confirmed(&slot, before_bad, after_bad, "the unroutable row")
        .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_advanced_behind_the_relays_back_is_detected() {
    let (db, slot) = TestDb::classic("src_moved").await;
    let prefix = unique("moved");
    // The broker is unreachable, so the events stay in flight and the slot
    // stays before them. Without a progress topic any move stops the relay
    // at once; with one, only a record read back can say a move was not a
    // relay of ours, and an unreadable topic is asked again (review N6):
    // exactly_once.rs covers that case with the broker up.
    let mut extra = topic_args(&prefix, &slot);
    extra.extend(["--progress-topic".to_string(), "off".to_string()]);
    let mut relay = Relay::start(&args(&db, &no_broker(), &extra));
    db.wait_streaming(&slot).await;
    insert(&db, 5, "pending").await;
    let after = db.current_wal_lsn().await;
    db.wait_sent(&slot, after).await;
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
    relay.expect_exit(Duration::from_secs(60), Some(1)).await;
    let log = relay.log_text();
    assert_contains(
        &log,
        "something advanced the slot over events that were never delivered",
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
    let (url, client) = cluster.with_outbox().await;
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
    let status: String = scalar(
        &client,
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
        &[],
    )
    .await;
    assert_eq!(status, "lost", "the test needs an invalidated slot");
    let (code, _, err) = relay_cmd(&["run", "--database-url", &url, "--kafka-brokers", &brokers()]);
    assert_eq!(code, 1, "{err}");
    assert_contains(&err, "was invalidated (wal_status = 'lost')");
    assert_contains(&err, "run `outbox-relay recover`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_keep_the_walsender_alive_while_the_broker_is_down() {
    // The in-flight window is full.
    broker_down_with(&["--max-inflight", "5"]).await;
}

/// M2 and M3 of the December 2026 review: librdkafka's own queue is smaller
/// than the in-flight window, so it fills first. That is backpressure too:
/// the loop keeps sending status updates and sees a stop, which takes the
/// shutdown timeout once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_is_backpressure_not_a_blocked_loop() {
    broker_down_with(&[
        "--max-inflight",
        "100",
        "--kafka-property",
        "queue.buffering.max.messages=5",
    ])
    .await;
}

/// With the broker unreachable: three wal_sender_timeouts pass with reading
/// paused and the walsender is the same; then SIGTERM ends the relay within
/// the shutdown timeout (the events stay unconfirmed: exit 1).
async fn broker_down_with(extra: &[&str]) {
    // A short wal_sender_timeout: without feedback during backpressure the
    // server would end the connection within 2 s.
    let cluster = TempCluster::start(&[], &["wal_sender_timeout=2s"]);
    let (url, client) = cluster.with_outbox().await;
    relay_setup(&["--database-url", &url]);
    let mut args: Vec<String> = vec![
        "--database-url".into(),
        url.clone(),
        "--kafka-brokers".into(),
        no_broker(),
        "--shutdown-timeout".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut relay = Relay::start(&args);
    let addr = relay.http_address().await;
    let pid_of = || async {
        scalar::<Option<i32>>(
            &client,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
    };
    wait_until(Duration::from_secs(30), "streaming", || async {
        pid_of().await.is_some()
    })
    .await;
    let pid = pid_of().await.unwrap();
    client
        .batch_execute("INSERT INTO outbox (event_type, aggregate_id, payload) SELECT 'T', 'a', '{}' FROM generate_series(1, 200)")
        .await
        .unwrap();
    // Reading paused, nothing acknowledged.
    wait_metric(&addr, "outbox_inflight_events", |v| v >= Some(5.0)).await;
    // Three timeouts pass.
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
    assert_eq!(
        relay_metric(&addr, "outbox_reconnects_total").await,
        Some(0.0),
        "one session throughout"
    );
    relay
        .stop_within(Some(1), Duration::from_millis(3500))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_columns_type_change_stops_the_relay_and_the_slot_stays() {
    type_change_with(false).await;
}

/// L9 of the December 2026 review: the change is caught across a reconnect
/// too (the walsender terminated between the ALTER and the next insert),
/// not only within one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_change_is_caught_across_a_reconnect() {
    type_change_with(true).await;
}

async fn type_change_with(reconnect: bool) {
    let (db, slot) = TestDb::classic("src_type").await;
    let prefix = unique("type");
    let mut relay = Relay::start(&args(&db, &brokers(), &topic_args(&prefix, &slot)));
    db.wait_streaming(&slot).await;
    insert(&db, 3, "before").await;
    consume_topic(&format!("{prefix}.T"), 3).await;
    // The payload column becomes text: its bytes would mean something else.
    db.exec("ALTER TABLE outbox ALTER COLUMN payload TYPE text")
        .await;
    if reconnect {
        let pid = active_pid(&db, &slot).await.unwrap();
        db.exec(&format!("SELECT pg_terminate_backend({pid})"))
            .await;
        wait_until(Duration::from_secs(30), "a new session", || async {
            relay.resumed_from().len() >= 2
        })
        .await;
    }
    let (before, after) = db.exec_between("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', 'plain text')").await;
    relay.expect_exit(Duration::from_secs(30), Some(1)).await;
    let log = relay.log_text();
    assert_contains(&log, "the type of column payload of public.outbox (set by --payload-column) changed under the running relay");
    db.assert_not_confirmed(&slot, before, after, "the row with a changed payload type")
        .await;
    db.drop().await;
}

/// H2 of the December 2026 review. The fault proxy black-holes the Postgres
/// side (the connection stays open, nothing gets through): the session ends
/// within --replication-timeout instead of the kernel's TCP retry time, each
/// new attempt gives up after the connect timeout (start-up included), and
/// the relay streams again once the path is back. Then SIGTERM while a
/// session is being set up against a silent server: the relay exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_replaced_within_the_replication_timeout() {
    use support::proxy::{Mode, Proxy};
    const TIMEOUT_SECS: u64 = 3;

    let (db, slot) = TestDb::classic("src_silent").await;
    let prefix = unique("silent");
    let proxy = Proxy::start(pg_addr(&db.url)).await;
    let url = with_param(&via(&db.url, &proxy.addr()), "connect_timeout=2");
    let mut extra = topic_args(&prefix, &slot);
    extra.extend([
        "--replication-timeout".into(),
        TIMEOUT_SECS.to_string(),
        "--reconnect-max-backoff".into(),
        "1".into(),
    ]);
    let mut a = relay_args(&db, &brokers(), &[]);
    a[1] = url.clone();
    a.extend(extra.clone());
    let mut relay = Relay::start(&a);
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    insert(&db, 5, "before").await;
    consume_topic(&format!("{prefix}.T"), 5).await;

    proxy.set_mode(Mode::Stall);
    let stalled = std::time::Instant::now();
    let accepted = proxy.accepted();
    wait_until(
        Duration::from_secs(TIMEOUT_SECS + 5),
        "the silent session to end",
        || async { relay_metric(&addr, "outbox_up").await == Some(0.0) },
    )
    .await;
    let ended_after = stalled.elapsed();
    assert!(
        ended_after < Duration::from_secs(TIMEOUT_SECS + 2),
        "the session ended {ended_after:?} after the server went silent (timeout {TIMEOUT_SECS} s)"
    );
    // Each new attempt gets through TCP (the proxy accepts) and then hears
    // nothing: it must give up after the connect timeout and try again.
    wait_until(
        Duration::from_secs(20),
        "two more connection attempts",
        || async { proxy.accepted() >= accepted + 2 },
    )
    .await;
    assert!(relay.is_running(), "{}", relay.log_text());

    proxy.set_mode(Mode::Pass);
    wait_metric(&addr, "outbox_up", |v| v == Some(1.0)).await;
    insert(&db, 5, "after").await;
    let records = consume_topic(&format!("{prefix}.T"), 10).await;
    assert!(records.len() >= 10);
    let after = db.current_wal_lsn().await;
    db.wait_confirmed_past(&slot, after, "the slot to follow")
        .await;
    assert!(
        relay_metric(&addr, "outbox_reconnects_total").await >= Some(1.0),
        "sessions were started again"
    );
    eprintln!("silent server: session replaced after {ended_after:?}");
    relay.stop_clean().await;

    // SIGTERM while set-up waits on a silent server (a long connect timeout).
    proxy.set_mode(Mode::Stall);
    let mut b = relay_args(&db, &brokers(), &[]);
    b[1] = with_param(&via(&db.url, &proxy.addr()), "connect_timeout=60");
    b.extend(extra);
    let before = proxy.accepted();
    let mut relay = Relay::start(&b);
    wait_until(Duration::from_secs(30), "the relay to connect", || async {
        proxy.accepted() > before
    })
    .await;
    relay.stop_within(Some(0), Duration::from_secs(3)).await;
    proxy.set_mode(Mode::Pass);
    db.drop().await;
}
