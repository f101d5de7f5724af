//! Cutover from a polling publisher (`backfill`) and `cleanup`, against the
//! real Postgres and broker: a poller stopped mid-backlog, a writer running
//! through the backfill, then `run`; every event exactly once.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use support::*;

const TYPES: [&str; 2] = ["created", "paid"];

/// A database with the classic table, a slot name and a topic template of
/// its own (the slot and publication are not created).
async fn classic(name: &str) -> (TestDb, String, String, String) {
    let db = TestDb::new(name).await;
    db.exec(CLASSIC_TABLE).await;
    let slot = format!("s_{}", db.name);
    let prefix = unique(name);
    let template = format!("{prefix}.{{event_type}}");
    let topics: Vec<String> = TYPES.iter().map(|t| format!("{prefix}.{t}")).collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    create_topics(&brokers(), &refs, 3).await;
    (db, slot, prefix, template)
}

/// `n` events over a few aggregates, in transactions of `per_txn` rows.
async fn insert(client: &tokio_postgres::Client, first: usize, n: usize, per_txn: usize) {
    let mut i = 0;
    while i < n {
        let mut sql = String::from("BEGIN;");
        for seq in first + i..first + (i + per_txn).min(n) {
            let ty = TYPES[seq % 2];
            sql.push_str(&format!(
                "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('{ty}', 'agg-{}', '{{\"seq\": {seq}}}');",
                seq % 11
            ));
        }
        sql.push_str("COMMIT;");
        client.batch_execute(&sql).await.unwrap();
        i += per_txn;
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    scalar(&db.client, sql, &[]).await
}

/// Rows the old scheme would still publish, or has marked published.
async fn rows_processed(db: &TestDb, processed: bool) -> i64 {
    let not = if processed { "NOT " } else { "" };
    count(
        db,
        &format!("SELECT count(*) FROM outbox WHERE processed_at IS {not}NULL"),
    )
    .await
}

/// A polling publisher as people write them: oldest pending rows first,
/// produced with the relay's topic/key/header layout, then marked processed.
async fn poll_once(db: &TestDb, prefix: &str, limit: i64) -> usize {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let rows = db
        .client
        .query(
            "SELECT id, event_id::text, event_type, aggregate_id, payload::text FROM outbox
              WHERE processed_at IS NULL ORDER BY id LIMIT $1",
            &[&limit],
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for r in &rows {
        let (id, event_id, ty, key, payload): (i64, String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(event_id.as_bytes()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(ty.as_bytes()),
            });
        let topic = format!("{prefix}.{ty}");
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(key.as_bytes())
                    .payload(payload.as_bytes())
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("poller produce");
        ids.push(id);
    }
    db.client
        .execute(
            "UPDATE outbox SET processed_at = now() WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    ids.len()
}

async fn wait_caught_up(db: &TestDb, slot: &str) {
    let target = db.current_wal_lsn().await;
    wait_until(
        Duration::from_secs(60),
        "the relay to confirm the current WAL position",
        || async { db.confirmed_flush_lsn(slot).await >= target },
    )
    .await;
}

async fn cmd(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        relay_cmd(&refs)
    })
    .await
    .unwrap()
}

fn args(db: &TestDb, slot: &str, template: &str, command: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        command.into(),
        "--database-url".into(),
        db.url.clone(),
        "--slot".into(),
        slot.into(),
        "--topic".into(),
        template.into(),
    ];
    if matches!(command, "backfill" | "verify") {
        a.extend(["--kafka-brokers".into(), brokers()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poller_stopped_mid_backlog_then_backfill_then_run_publishes_each_event_once() {
    let (db, slot, prefix, template) = classic("cut_mid").await;
    let run = |command: &str, extra: &[&str]| cmd(args(&db, &slot, &template, command, extra));
    insert(&db.client, 0, 500, 50).await;
    assert_eq!(poll_once(&db, &prefix, 200).await, 200);
    // The poller is stopped: 300 rows pending under the old scheme.
    assert_eq!(rows_processed(&db, false).await, 300);

    // A writer that keeps inserting, in small transactions, through the
    // backfill: some of its rows land before the slot's consistent point
    // (backfilled), the rest after it (streamed by `run`).
    // It writes until told to stop, after the backfill: some of its rows
    // must come after the slot's consistent point, however long the
    // backfill takes on a loaded machine.
    let writer = sql_client(&db.url).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_writer = stop.clone();
    let writing = tokio::spawn(async move {
        let mut i = 0;
        while !stop_writer.load(std::sync::atomic::Ordering::Relaxed) {
            insert(&writer, 1000 + 2 * i, 2, 2).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        2 * i
    });
    wait_until(Duration::from_secs(10), "the writer to start", || async {
        count(&db, "SELECT count(*) FROM outbox").await >= 510
    })
    .await;
    let (code, out, err) = run(
        "backfill",
        &["--batch-size", "64", "--progress-every", "100"],
    )
    .await;
    assert_eq!(code, 0, "backfill failed:\n{out}\n{err}");
    // A few more of the writer's transactions, now certainly after the
    // slot's consistent point, for `run` to stream.
    let at_backfill_end = count(&db, "SELECT count(*) FROM outbox").await;
    wait_until(Duration::from_secs(30), "the writer to go on", || async {
        count(&db, "SELECT count(*) FROM outbox").await >= at_backfill_end + 6
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writing.await.unwrap();
    assert_contains(&out, "created publication outbox_pub");
    assert_contains(&out, &format!("created logical replication slot {slot}"));
    // Progress without a terminal: plain lines.
    assert_contains(&err, "backfill: 100 of ");
    assert!(
        !err.contains('\r'),
        "no redraws without a terminal: {err:?}"
    );
    let published: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("backfill done: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line: {out}"));
    assert!(
        published > 300 && published < 300 + written as u64,
        "the backfill should take the 300 pending rows plus the writer's rows committed before the slot (of {written}): {published}\n{out}"
    );

    let relay_args = slot_args(&db, &slot, &template, &[]);
    let mut relay = Relay::start(&relay_args);
    db.wait_streaming(&slot).await;
    insert(&db.client, 2000, 5, 1).await;
    let total = 500 + written as i64 + 5;
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, total);
    wait_caught_up(&db, &slot).await;

    let topics: Vec<String> = TYPES.iter().map(|t| format!("{prefix}.{t}")).collect();
    let records = consume(&brokers(), &topics, total as usize, Duration::from_secs(60)).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *seen.entry(r.header("id").expect("id header")).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published twice: {twice:?}");
    assert_eq!(records.len(), total as usize, "every event exactly once");
    assert_eq!(seen.len(), total as usize);

    // The relay's own checker agrees: nothing missing, reordered, altered or
    // duplicated.
    let (code, out, err) = run("verify", &["--json", "--fail-on-duplicates"]).await;
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("verify: {e}: {out}\n{err}"));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["rows"], total);
    assert_eq!(report["delivered"], total);

    relay.stop_clean().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_refuses_when_the_slot_exists() {
    let (db, slot, _prefix, template) = classic("cut_exists").await;
    let run = |command: &str, extra: &[&str]| cmd(args(&db, &slot, &template, command, extra));
    db.set_up();
    insert(&db.client, 0, 10, 10).await;
    let (code, out, err) = run("backfill", &[]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains(&format!("replication slot {slot} already exists"))
            && err.contains("must create the slot itself")
            && err.contains(&format!("pg_drop_replication_slot('{slot}')")),
        "{err}"
    );
    assert!(!out.contains("published"), "{out}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_what_the_slot_confirmed_and_old_rows_by_age() {
    let (db, slot, _prefix, template) = classic("cut_clean").await;
    let run = |command: &str, extra: &[&str]| cmd(args(&db, &slot, &template, command, extra));
    db.set_up();
    let relay_args = slot_args(&db, &slot, &template, &[]);

    // Published and confirmed, then the relay stops.
    let mut relay = Relay::start(&relay_args);
    insert(&db.client, 0, 50, 10).await;
    wait_caught_up(&db, &slot).await;
    relay.stop_clean().await;
    // Committed after the relay's last confirmation: not published yet.
    insert(&db.client, 50, 30, 10).await;

    let (code, out, err) = run("cleanup", &["--published", "--wait", "2s"]).await;
    assert_eq!(code, 1, "cleanup must refuse:\n{out}\n{err}");
    assert_contains(&err, "did not confirm");
    assert_contains(&err, "nothing was deleted");
    assert!(!out.contains("deleted"), "{out}");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 80);

    // Running and caught up: everything is published, deleted in batches.
    let mut relay = Relay::start(&relay_args);
    wait_caught_up(&db, &slot).await;
    let (code, out, err) = run("cleanup", &["--dry-run"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_contains(&out, "dry run: would delete 80 published row(s)");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 80);
    let (code, out, err) = run("cleanup", &["--batch-size", "25"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let batches: Vec<&str> = out.lines().filter(|l| l.starts_with("batch ")).collect();
    assert_eq!(batches.len(), 4, "{out}");
    assert!(
        batches[0].starts_with("batch 1: deleted 25 row(s) (id 1 … 25)"),
        "{out}"
    );
    assert!(
        batches[3].starts_with("batch 4: deleted 5 row(s) (id 76 … 80)"),
        "{out}"
    );
    assert_contains(&out, "cleanup done: deleted 80 row(s)");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 0);

    // By age: only rows whose created_at is older than the retention.
    insert(&db.client, 100, 10, 10).await;
    db.exec("UPDATE outbox SET created_at = now() - interval '8 days' WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 4)")
        .await;
    let (code, out, err) = run("cleanup", &["--older-than", "7d", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_contains(&out, "would delete 4 row(s)");
    let (code, out, err) = run("cleanup", &["--older-than", "7d", "--batch-size", "3"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_contains(&out, "batch 1: deleted 3 row(s)");
    assert_contains(&out, "batch 2: deleted 1 row(s)");
    assert_contains(&out, "cleanup done: deleted 4 row(s)");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 6);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE created_at < now() - interval '1 day'"
        )
        .await,
        0
    );

    relay.stop_clean().await;
    db.drop().await;
}

/// M7 of the December 2026 review: a backfill against a broker that is not
/// there gives up after --ack-timeout instead of waiting for ever, with the
/// slot left for a rerun as its error explains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_gives_up_on_an_unreachable_broker() {
    let (db, slot, _prefix, template) = classic("cut_nobroker").await;
    insert(&db.client, 0, 10, 10).await;
    let mut a = args(&db, &slot, &template, "backfill", &["--ack-timeout", "3"]);
    let at = a.iter().position(|s| s == "--kafka-brokers").unwrap();
    a[at + 1] = no_broker();
    let started = std::time::Instant::now();
    let (code, out, err) = cmd(a).await;
    let took = started.elapsed();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        took < Duration::from_secs(30),
        "backfill took {took:?} to give up"
    );
    assert_contains(&err, "no delivery report from Kafka within 3 s");
    db.drop().await;
}

/// L2 of the December 2026 review: --pending-where and cleanup's --where are
/// one condition, never a way to run a second statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_cannot_smuggle_in_a_second_statement() {
    let (db, slot, _prefix, template) = classic("cut_inject").await;
    let run = |command: &str, extra: &[&str]| cmd(args(&db, &slot, &template, command, extra));
    insert(&db.client, 0, 5, 5).await;
    let (code, out, err) = run(
        "backfill",
        &[
            "--pending-where",
            "true); DROP TABLE outbox; SELECT 1 FROM (SELECT 1 AS id) s WHERE (true",
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}\n{err}");
    let (code, out, err) = run(
        "cleanup",
        &[
            "--older-than",
            "1s",
            "--where",
            "true); DROP TABLE outbox; SELECT 1 FROM (SELECT 1 AS id) s WHERE (true",
        ],
    )
    .await;
    assert_ne!(code, 0, "{out}\n{err}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox").await,
        5,
        "the table is still there"
    );
    db.drop().await;
}

/// `--mark-processed`: after every record was acknowledged, the backfilled
/// rows (and only they) get their processed column set, so the old scheme's
/// "pending" query shows 0; rows the poller had already marked keep their
/// time. Batches smaller than the backlog cover every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_processed_sets_the_column_of_every_backfilled_row_only() {
    let (db, slot, prefix, template) = classic("cut_mark").await;
    let run = |command: &str, extra: &[&str]| cmd(args(&db, &slot, &template, command, extra));
    insert(&db.client, 0, 40, 8).await;
    assert_eq!(poll_once(&db, &prefix, 10).await, 10);
    assert_eq!(rows_processed(&db, true).await, 10);
    let before: Vec<String> = column(
        &db.client,
        "SELECT processed_at::text FROM outbox WHERE processed_at IS NOT NULL ORDER BY id",
    )
    .await;
    let (code, out, err) = run("backfill", &["--mark-processed", "--batch-size", "7"]).await;
    assert_eq!(code, 0, "backfill failed:\n{out}\n{err}");
    assert_contains(&out, "marked 30 backfilled row(s) processed");
    assert_eq!(rows_processed(&db, false).await, 0);
    let after: Vec<String> = column(
        &db.client,
        "SELECT processed_at::text FROM outbox WHERE id <= 10 ORDER BY id",
    )
    .await;
    assert_eq!(after, before, "rows the poller marked keep their time");
    let topics: Vec<String> = TYPES.iter().map(|t| format!("{prefix}.{t}")).collect();
    let records = consume(&brokers(), &topics, 40, Duration::from_secs(60)).await;
    assert_eq!(
        records.len(),
        40,
        "10 from the poller, 30 from the backfill"
    );
    db.drop().await;
}

/// Issue 25: a retention cleanup never deletes a row the slot has not
/// confirmed past: with the relay stopped, old rows that were never
/// published are left (they are the only copy of their events, and what a
/// lost slot is recovered from); `--even-unconfirmed` deletes them anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_rows_the_slot_has_not_confirmed() {
    let (db, slot, _prefix, template) = classic("cut_retention").await;
    let run = |command: &str, extra: &[&str]| cmd(args(&db, &slot, &template, command, extra));
    relay_setup(&["--database-url", &db.url, "--slot", &slot]);
    insert(&db.client, 0, 6, 2).await;
    db.exec("UPDATE outbox SET created_at = now() - interval '8 days'")
        .await;
    let (code, out, err) = run("cleanup", &["--older-than", "7d", "--wait", "2"]).await;
    assert_ne!(code, 0, "deleted rows the slot never confirmed: {out}");
    assert_contains(&err, "nothing was deleted");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 6);
    let (code, out, err) = run("cleanup", &["--older-than", "7d", "--even-unconfirmed"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 0);
    db.drop().await;
}
