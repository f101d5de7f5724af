//! Misconfiguration is refused at start with a message that says what to
//! fix, and the process behaves as an operator expects on signals and with
//! machine-readable logs.

use crate::support;

use std::time::Duration;

use support::*;

fn run(db: &TestDb, slot: &str, extra: &[&str]) -> (i32, String) {
    let args = [&["--slot", slot], extra].concat();
    let (code, _, err) = relay_cmd_on("run", &db.url, &brokers(), &args);
    (code, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_would_stream_nothing_is_refused() {
    let (db, slot) = TestDb::classic("mis_pub").await;
    let before = db.confirmed_flush_lsn(&slot).await;
    db.exec("ALTER PUBLICATION outbox_pub DROP TABLE outbox")
        .await;
    let (code, err) = run(&db, &slot, &[]);
    assert_eq!(code, 1);
    assert_contains(&err, "publication \"outbox_pub\" does not cover the outbox table public.outbox: ALTER PUBLICATION \"outbox_pub\" ADD TABLE \"public\".\"outbox\"");
    db.exec("ALTER PUBLICATION outbox_pub ADD TABLE outbox; ALTER PUBLICATION outbox_pub SET (publish = 'delete')").await;
    let (code, err) = run(&db, &slot, &[]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        "does not publish inserts: ALTER PUBLICATION \"outbox_pub\" SET (publish = 'insert')",
    );
    let (code, err) = run(&db, &slot, &["--publication", "nope"]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        "publication \"nope\" does not exist: run `outbox-relay setup`",
    );
    assert_eq!(
        db.confirmed_flush_lsn(&slot).await,
        before,
        "nothing was confirmed"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_gets_the_fix() {
    let (db, slot) = TestDb::classic("mis_role").await;
    db.exec("DO $$ BEGIN CREATE ROLE no_repl_role LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$").await;
    let url = db.url.replacen("postgres@", "no_repl_role@", 1);
    let brokers = brokers();
    let (code, _, err) = relay_cmd_on("run", &url, &brokers, &["--slot", &slot]);
    assert_eq!(code, 1, "{err}");
    assert_contains(&err, "ALTER ROLE <role> REPLICATION");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_on_a_server_without_logical_wal_says_what_to_set() {
    let cluster = TempCluster::start(&[], &["wal_level=replica"]);
    let url = cluster.url("postgres", None);
    sql_client(&url)
        .await
        .batch_execute(CLASSIC_TABLE)
        .await
        .unwrap();
    let (code, _, err) = relay_cmd(&["setup", "--database-url", &url]);
    assert_eq!(code, 1);
    assert_contains(
        &err,
        "wal_level is \"replica\" but logical replication needs 'logical'",
    );
    assert_contains(&err, "restart Postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_event_fields() {
    let (db, slot) = TestDb::classic("mis_json").await;
    let (prefix, template) = templated("json");
    let mut relay = Relay::start(&slot_args(&db, &slot, &template, &["--log-format", "json"]));
    db.wait_streaming(&slot).await;
    db.exec(
        "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'agg-json', '{}')",
    )
    .await;
    consume(
        &brokers(),
        &[format!("{prefix}.T")],
        1,
        Duration::from_secs(60),
    )
    .await;
    relay.stop_clean().await;
    let log = relay.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let event = lines
        .iter()
        .find(|l| l["fields"]["message"] == "event enqueued")
        .expect("a per-event debug line");
    assert_eq!(event["fields"]["aggregate_id"], "agg-json");
    assert_eq!(event["fields"]["event_type"], "T");
    assert!(event["fields"]["event_id"]
        .as_str()
        .is_some_and(|s| s.len() == 36));
    assert!(event["fields"]["lsn"]
        .as_str()
        .is_some_and(|s| s.contains('/')));
    assert!(event["fields"]["since_commit_ms"].is_number());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let (db, slot) = TestDb::classic("mis_signal").await;
    // The broker is unreachable, so a graceful stop would wait for the
    // shutdown timeout (60 s here) with the event in flight.
    let mut relay = Relay::start(&relay_args(
        &db,
        &no_broker(),
        &["--slot", &slot, "--shutdown-timeout", "60"],
    ));
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', '{}')")
        .await;
    let addr = relay.http_address().await;
    wait_metric(&addr, "outbox_inflight_events", |v| v == Some(1.0)).await;
    // An unreachable broker is seen, not a crash loop.
    wait_until(
        Duration::from_secs(30),
        "the broker to be seen down",
        || async {
            http_get(&addr, "/readyz")
                .await
                .1
                .contains("broker_reachable=false")
        },
    )
    .await;
    assert!(relay.is_running());
    relay.signal("TERM");
    wait_until(
        Duration::from_secs(30),
        "the graceful stop to begin",
        || async { http_get(&addr, "/readyz").await == (503, "not ready: stopping\n".to_string()) },
    )
    .await;
    // 130 is the second signal's own exit code.
    relay
        .stop_expecting("TERM", Duration::from_secs(10), Some(130))
        .await;
    db.drop().await;
}

/// Producer settings that would let librdkafka skip a record and write the
/// ones behind it (a delivery timeout, bounded retries) or lose one (acks)
/// are refused by `run` before anything is read, and flagged by `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_settings_that_break_order_are_refused() {
    let (db, slot) = TestDb::classic("mis_producer").await;
    db.exec("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('E', 'a', '{}')")
        .await;
    let before = db.confirmed_flush_lsn(&slot).await;
    for (property, named) in [
        ("message.timeout.ms=10000", "message.timeout.ms=10000"),
        ("delivery.timeout.ms=120000", "message.timeout.ms=120000"),
        ("retries=3", "retries=3"),
        ("acks=1", "acks=1"),
        ("partitioner=random", "partitioner=random"),
    ] {
        // A relay that accepted the property would stream on: bounded wait,
        // so the test fails instead of hanging.
        let brokers = brokers();
        let mut relay = Relay::start(&relay_args(
            &db,
            &brokers,
            &["--slot", &slot, "--kafka-property", property],
        ));
        relay.expect_exit(Duration::from_secs(30), Some(1)).await;
        let err = relay.log_text();
        assert!(
            err.contains(&format!(
                "--kafka-property {named} would break ordering or lose events"
            )) && err.contains("remove that property"),
            "{property}: {err}"
        );
        let (code, out, err) = relay_cmd_on(
            "check",
            &db.url,
            &brokers,
            &["--slot", &slot, "--kafka-property", property],
        );
        assert_ne!(code, 0, "{property}: check passed:\n{out}{err}");
        assert!(
            out.contains("kafka producer settings") && out.contains(named),
            "{property}: {out}{err}"
        );
    }
    assert_eq!(
        db.confirmed_flush_lsn(&slot).await,
        before,
        "nothing was read or confirmed"
    );
    db.drop().await;
}
