//! Heartbeats: with another database on the same server taking all the
//! writes, the relay's slot keeps up and retained WAL stays bounded; the
//! heartbeat messages are really written to the relay's database.

use crate::support;

use std::time::Duration;

use support::proxy::{Mode, Proxy};
use support::*;

async fn retained(client: &tokio_postgres::Client) -> i64 {
    scalar(client, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'outbox_relay'", &[]).await
}

async fn run_scenario(heartbeat: bool) -> (i64, bool) {
    let wal = [
        "max_wal_size=64MB",
        "min_wal_size=32MB",
        "checkpoint_timeout=30s",
    ];
    let cluster = TempCluster::start(&[], &wal);
    let (url, client) = cluster.with_outbox().await;
    client.batch_execute("CREATE DATABASE busy").await.unwrap();
    relay_setup(&["--database-url", &url]);
    // A second slot that keeps messages, to see what was written.
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('probe', 'pgoutput')")
        .await
        .unwrap();
    let mut args = vec![
        "--database-url".to_string(),
        url.clone(),
        "--kafka-brokers".to_string(),
        brokers(),
        "--status-interval".to_string(),
        "1".to_string(),
    ];
    if heartbeat {
        args.extend(["--heartbeat-interval".to_string(), "1".to_string()]);
    }
    let mut relay = Relay::start(&args);
    wait_until(Duration::from_secs(30), "streaming", || async {
        scalar::<bool>(
            &client,
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
    })
    .await;
    let busy = sql_client(&format!(
        "postgres://postgres@127.0.0.1:{}/busy",
        cluster.port
    ))
    .await;
    busy.batch_execute("CREATE TABLE t (x text)").await.unwrap();
    // About 60 MB of WAL in the other database, with WAL switches and
    // checkpoints so old segments can be removed if the slot allows it.
    for _ in 0..6 {
        busy.batch_execute("INSERT INTO t SELECT repeat('x', 900) FROM generate_series(1, 10000); SELECT pg_switch_wal();")
            .await
            .unwrap();
    }
    let target = scalar::<String>(&client, "SELECT pg_current_wal_lsn()::text", &[]).await;
    // Let the relay report, then checkpoint so restart_lsn can be used.
    let mut bounded = false;
    for _ in 0..100 {
        client.batch_execute("CHECKPOINT").await.unwrap();
        let confirmed: Option<String> = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND confirmed_flush_lsn >= $1::text::pg_lsn",
                &[&target],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(None);
        if confirmed.is_some() && retained(&client).await < 24 << 20 {
            bounded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = retained(&client).await;
    let heartbeat_seen = || async {
        scalar::<bool>(&client, "SELECT count(*) > 0 FROM pg_logical_slot_peek_binary_changes('probe', NULL, NULL, 'proto_version', '1', 'publication_names', 'outbox_pub', 'messages', 'true')
                  WHERE position('outbox-relay-heartbeat' in encode(data, 'escape')) > 0", &[]).await
    };
    let mut written = false;
    for _ in 0..50 {
        if heartbeat_seen().await {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop_clean().await;
    eprintln!("heartbeat={heartbeat}: retained {left} bytes, bounded={bounded}, heartbeat written={written}");
    (if bounded { left } else { i64::MAX }, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_stays_bounded_while_another_database_takes_the_writes() {
    let (left, written) = run_scenario(true).await;
    assert!(
        left < 24 << 20,
        "the slot retains {left} bytes of WAL written by another database"
    );
    assert!(
        written,
        "no heartbeat message was written to the relay's database"
    );
}

/// Without heartbeats the keepalive confirmation alone keeps the slot up
/// (the relay confirms the walsender's sent position when idle); the
/// heartbeat is for servers where that is not enough. Run on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: cargo test --test main -- heartbeat:: --ignored --nocapture"]
async fn without_heartbeats_for_comparison() {
    let (left, written) = run_scenario(false).await;
    eprintln!("without heartbeats: retained {left} bytes, heartbeat written={written}");
}

/// Review N12: a heartbeat whose connection stops answering (a stalled
/// proxy, a black-holed host) gives up within 10 s and counts the failure,
/// instead of waiting for ever without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_heartbeat_is_counted_not_waited_on_for_ever() {
    let (db, slot) = TestDb::classic("hb_stall").await;
    let proxy = Proxy::start(pg_addr(&db.url)).await;
    let url = via(&db.url, &proxy.addr());
    let args = plain_args(
        &url,
        &brokers(),
        &[
            "--slot",
            &slot,
            "--heartbeat-interval",
            "1",
            "--progress-topic",
            "off",
        ],
    );
    let mut relay = Relay::start(&args);
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    // Every connection through the proxy stops answering; the replication
    // session's own timeout (60 s) is far off.
    proxy.set_mode(Mode::Stall);
    wait_metric(&addr, "outbox_heartbeat_failures_total", |v| {
        v.unwrap_or(0.0) >= 1.0
    })
    .await;
    proxy.set_mode(Mode::Pass);
    relay.stop_clean().await;
    db.drop().await;
}
