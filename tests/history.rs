//! Postgres's history changes under the relay (issue 25): a restore from a
//! cold copy of the data directory brings back an older WAL and an older
//! slot, and the server then writes new transactions at positions the old
//! history already used. Nothing of the new history may be taken for
//! something already in Kafka: at-least-once and exactly-once both publish
//! every new event, exactly-once each of them once to a read_committed
//! consumer (and the old history's events that the copy holds but the slot
//! had not confirmed are not published again), and both count the fork
//! they found.

use crate::support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use outbox_relay::lsn::Lsn;
use support::*;

/// One event per transaction, numbered by `n` in its payload.
async fn write(client: &tokio_postgres::Client, from: i64, to: i64) -> Lsn {
    for n in from..to {
        client
            .execute(
                "INSERT INTO outbox (event_type, aggregate_id, payload) \
                 VALUES ('T', 'agg-' || ($1::bigint % 5), jsonb_build_object('n', $1::bigint))",
                &[&n],
            )
            .await
            .unwrap();
    }
    let lsn: String = scalar(client, "SELECT pg_current_wal_lsn()::text", &[]).await;
    lsn.parse().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

/// How often each `n` arrived.
fn arrivals(records: &[Record]) -> HashMap<i64, usize> {
    let mut seen = HashMap::new();
    for r in records {
        *seen
            .entry(r.payload_json()["n"].as_i64().expect("n in the payload"))
            .or_default() += 1;
    }
    seen
}

/// The relay's arguments on `url`: the slot, its topic and progress topic,
/// and exactly-once when `eos`.
fn history_args(url: &str, slot: &str, topic: &str, progress: &str, eos: bool) -> Vec<String> {
    let to = [
        "--slot",
        slot,
        "--topic",
        topic,
        "--progress-topic",
        progress,
    ];
    let mut args = url_args(url, &brokers(), &to);
    if eos {
        args.extend(strings(&["--delivery", "exactly-once"]));
    }
    args
}

/// `new`: how many events the restored server writes before the relay
/// starts: 100 leave its WAL short of where the old history's record is,
/// 400 take it past, so that the stream itself must show the fork.
async fn restore_from_a_cold_copy(eos: bool, new: i64) {
    let cluster = TempCluster::start(&[], &[]);
    let (url, client) = cluster.with_outbox().await;
    let slot = unique("restore").to_lowercase();
    relay_setup(&["--database-url", &url, "--slot", &slot]);
    let topic = unique("restore");
    let progress = unique("restore_progress");
    create_topics(&brokers(), &[&topic], 3).await;
    let args = history_args(&url, &slot, &topic, &progress, eos);

    // 50 events published and confirmed, 30 more written while the relay
    // is down, then a cold copy (the slot in it before those 30).
    let mut relay = Relay::start(&args);
    let end = write(&client, 0, 50).await;
    wait_confirmed_by(&client, &relay, &slot, end, "every event confirmed").await;
    relay.stop_clean().await;
    write(&client, 50, 80).await;
    drop(client);
    cluster.stop("fast");
    let copy = cluster.dir.join("data.copy");
    copy_dir(&cluster.dir.join("data"), &copy);
    cluster.restart("fast");

    // Those 30 and 170 more published on the old history.
    let client = sql_client(&url).await;
    let mut relay = Relay::start(&args);
    let end = write(&client, 80, 250).await;
    wait_confirmed_by(&client, &relay, &slot, end, "every event confirmed").await;
    relay.stop_clean().await;
    drop(client);

    // The restore: the old WAL and slot back (the 30 unconfirmed events in
    // it); new events on it, at positions the old history already had.
    cluster.stop("fast");
    std::fs::remove_dir_all(cluster.dir.join("data")).unwrap();
    std::fs::rename(&copy, cluster.dir.join("data")).unwrap();
    cluster.restart("fast");
    let client = sql_client(&url).await;
    let end = write(&client, 1000, 1000 + new).await;

    let mut relay = Relay::start(&args);
    wait_confirmed_by(&client, &relay, &slot, end, "every event confirmed").await;
    let metrics = http_get(&relay.http_address().await, "/metrics").await.1;
    relay.stop_clean().await;

    let records = consume_topic(&topic, 250 + new as usize).await;
    let seen = arrivals(&records);
    let missing: Vec<i64> = (0..250)
        .chain(1000..1000 + new)
        .filter(|n| !seen.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    if eos {
        let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
        assert!(
            twice.is_empty(),
            "exactly-once: {} events seen more than once, e.g. {:?}",
            twice.len(),
            twice.iter().take(5).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        metric(&metrics, "outbox_history_forks_total"),
        Some(1.0),
        "the fork is counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_publishes_the_new_history_after_a_restore_once() {
    restore_from_a_cold_copy(true, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_after_a_restore_whose_new_wal_passed_the_record_starts_again_and_publishes_it_once(
) {
    restore_from_a_cold_copy(true, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_publishes_the_new_history_after_a_restore_and_counts_the_fork() {
    restore_from_a_cold_copy(false, 100).await;
}

async fn wait_for(client: &tokio_postgres::Client, sql: &str, what: &str) {
    wait_until(Duration::from_secs(30), what, || async {
        client
            .query_one(sql, &[])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
}

/// An asynchronous standby promoted after the primary published WAL it
/// never received, and the slot recreated on it (the runbook without
/// failover slots: PostgreSQL 16 and older). Its new transactions come at
/// positions the old primary's record already holds, on a new timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_after_an_asynchronous_promotion_publishes_the_new_primarys_events_once() {
    let primary = TempCluster::start(&[], &[]);
    let (primary_url, client) = primary.with_outbox().await;
    let slot = unique("promote").to_lowercase();
    relay_setup(&["--database-url", &primary_url, "--slot", &slot]);
    let standby = TempCluster::standby_of(&primary, "standby1", &[]);
    let standby_url = standby.url("postgres", None);
    let standby_client = sql_client(&standby_url).await;
    let topic = unique("promote");
    let progress = unique("promote_progress");
    create_topics(&brokers(), &[&topic], 3).await;
    let args = |url: &str| history_args(url, &slot, &topic, &progress, true);

    // 50 events the standby has, then it stops receiving, and 300 more
    // that only the old primary ever had are published.
    let mut relay = Relay::start(&args(&primary_url));
    let end = write(&client, 0, 50).await;
    wait_confirmed_by(&client, &relay, &slot, end, "every event confirmed").await;
    wait_for(
        &standby_client,
        &format!("SELECT pg_last_wal_replay_lsn() >= '{end}'"),
        "the standby to replay the first 50",
    )
    .await;
    for sql in [
        "ALTER SYSTEM SET primary_conninfo = ''",
        "SELECT pg_reload_conf()",
    ] {
        standby_client.batch_execute(sql).await.unwrap();
    }
    wait_for(
        &standby_client,
        "SELECT count(*) = 0 FROM pg_stat_wal_receiver",
        "the standby's walreceiver to stop",
    )
    .await;
    let end = write(&client, 50, 350).await;
    wait_confirmed_by(&client, &relay, &slot, end, "every event confirmed").await;
    relay.stop_clean().await;

    // The primary is lost; the standby is promoted and given a new slot.
    drop(client);
    primary.stop("immediate");
    standby.promote();
    relay_setup(&["--database-url", &standby_url, "--slot", &slot]);
    let end = write(&standby_client, 1000, 1100).await;

    let mut relay = Relay::start(&args(&standby_url));
    wait_confirmed_by(&standby_client, &relay, &slot, end, "every event confirmed").await;
    let metrics = http_get(&relay.http_address().await, "/metrics").await.1;
    relay.stop_clean().await;

    let records = consume_topic(&topic, 450).await;
    let seen = arrivals(&records);
    let missing: Vec<i64> = (0..350)
        .chain(1000..1100)
        .filter(|n| !seen.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "events seen more than once: {twice:?}");
    assert_eq!(
        metric(&metrics, "outbox_history_forks_total"),
        Some(1.0),
        "the fork at the promotion is counted"
    );
}

/// Issue 25, "see it coming": under `max_slot_wal_keep_size` the running
/// relay exports how many bytes and seconds are left before the server
/// invalidates its slot, `status` and `check` say it while the relay is
/// stopped, and once the slot is invalidated `check` FAILs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_left_before_the_slot_is_invalidated_is_shown() {
    let cluster = TempCluster::start(&[], &["max_slot_wal_keep_size=48MB"]);
    let (url, client) = cluster.with_outbox().await;
    client
        .batch_execute("CREATE TABLE filler (t text)")
        .await
        .unwrap();
    let slot = unique("headroom").to_lowercase();
    relay_setup(&["--database-url", &url, "--slot", &slot]);
    let topic = unique("headroom");
    let args = plain_args(&url, &brokers(), &["--slot", &slot, "--topic", &topic]);
    // WAL written all along, so that there is a rate to go by.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let c = sql_client(&url).await;
            for n in 0..100_000i64 {
                let _ = c
                    .execute(
                        "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', jsonb_build_object('n', $1::bigint))",
                        &[&n],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut relay = Relay::start(&args);
    let addr = relay.http_address().await;
    wait_until(
        Duration::from_secs(60),
        "the slot's headroom in the metrics",
        || async {
            relay_metric(&addr, "outbox_slot_safe_wal_bytes")
                .await
                .unwrap_or(-1.0)
                > 0.0
                && relay_metric(&addr, "outbox_slot_invalidation_seconds")
                    .await
                    .unwrap_or(-1.0)
                    > 0.0
        },
    )
    .await;
    relay.stop_clean().await;

    let status = |args: &[String]| {
        let mut all: Vec<&str> = vec!["status", "--json"];
        all.extend(args.iter().map(String::as_str));
        let (_, out, err) = relay_cmd(&all);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{e}: {out}{err}"))
    };
    let check_line = |args: &[String]| {
        let mut all: Vec<&str> = vec!["check"];
        all.extend(args.iter().map(String::as_str));
        let (_, out, _) = relay_cmd(&all);
        out.lines()
            .find(|l| l.split("  ").nth(1).map(str::trim) == Some("slot headroom"))
            .unwrap_or_else(|| panic!("no slot headroom line in {out}"))
            .to_string()
    };
    let s = tokio::task::spawn_blocking({
        let args = args.clone();
        move || status(&args)
    })
    .await
    .unwrap();
    assert!(s["safe_wal_size"].as_i64().unwrap_or(0) > 0, "{s}");
    assert!(s["invalidation_in_s"].as_u64().is_some(), "{s}");
    assert_eq!(s["invalidated_by"], "max_slot_wal_keep_size", "{s}");
    let line = tokio::task::spawn_blocking({
        let args = args.clone();
        move || check_line(&args)
    })
    .await
    .unwrap();
    assert_contains(&line, "max_slot_wal_keep_size invalidates");
    writer.abort();

    // More WAL than the limit while no relay runs: the slot is lost.
    for _ in 0..4 {
        client
            .batch_execute(
                "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 20000) g;
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    client.batch_execute("CHECKPOINT").await.unwrap();
    let line = tokio::task::spawn_blocking({
        let args = args.clone();
        move || check_line(&args)
    })
    .await
    .unwrap();
    assert!(line.starts_with("FAIL"), "{line}");
    assert_contains(&line, "was invalidated");
}

/// A database on the shared stack with the classic outbox, its slot set up,
/// and the relay's arguments (a progress topic of its own; exactly-once
/// with `eos`). Returns (db, slot, topic, args).
async fn lost_slot_db(name: &str, eos: bool) -> (TestDb, String, String, Vec<String>) {
    let db = TestDb::new(name).await;
    db.exec(CLASSIC_TABLE).await;
    let slot = format!("s_{}", db.name);
    relay_setup(&["--database-url", &db.url, "--slot", &slot]);
    let topic = unique(name);
    create_topics(&brokers(), &[&topic], 3).await;
    let progress = unique(&format!("{name}_progress"));
    let args = history_args(&db.url, &slot, &topic, &progress, eos);
    (db, slot, topic, args)
}

fn recover_cmd(args: &[String]) -> (i32, String, String) {
    let mut all = vec!["recover"];
    all.extend(args.iter().map(String::as_str));
    relay_cmd(&all)
}

/// 50 events published, the relay stopped, the slot dropped, 100 events
/// written that no slot will ever stream: recover publishes those 100, and
/// the relay streams on from the new slot; each event arrives once.
async fn recover_after_the_slot_was_dropped(eos: bool) {
    let name = if eos { "recover_eos" } else { "recover_alo" };
    let (db, slot, topic, args) = lost_slot_db(name, eos).await;
    let mut relay = Relay::start(&args);
    let end = write(&db.client, 0, 50).await;
    db.wait_confirmed_by(&relay, &slot, end, "the first 50 events confirmed")
        .await;
    relay.stop_clean().await;
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    write(&db.client, 50, 150).await;

    let (code, out, err) = recover_cmd(&args);
    assert_eq!(code, 0, "recover: {out}{err}");
    // Run once more, it refuses: the new slot is usable.
    let (again, out2, err2) = recover_cmd(&args);
    assert_eq!(again, 2, "a second recover must refuse: {out2}{err2}");

    let mut relay = Relay::start(&args);
    let end = write(&db.client, 150, 170).await;
    db.wait_confirmed_by(&relay, &slot, end, "the events after recover confirmed")
        .await;
    relay.stop_clean().await;

    let records = consume_topic(&topic, 170).await;
    let seen = arrivals(&records);
    let missing: Vec<i64> = (0..170).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}\n{out}");
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "arrived more than once: {twice:?}\n{out}");
    db.drop().await;
}

both_deliveries! {
    recover_after_the_slot_was_dropped => recover_publishes_what_a_dropped_slot_never_streamed_at_least_once, recover_publishes_what_a_dropped_slot_never_streamed_exactly_once;
}

/// A retention shorter than the gap deleted events before they were
/// published: recover publishes the rest and exits 1 naming where what it
/// cannot vouch for ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_names_the_range_a_retention_deleted_and_exits_1() {
    let (db, slot, topic, args) = lost_slot_db("recover_gone", false).await;
    let mut relay = Relay::start(&args);
    let end = write(&db.client, 0, 50).await;
    db.wait_confirmed_by(&relay, &slot, end, "the first 50 events confirmed")
        .await;
    relay.stop_clean().await;
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    write(&db.client, 50, 150).await;
    db.exec("DELETE FROM outbox WHERE (payload->>'n')::int < 80")
        .await;
    let oldest: i64 = scalar(&db.client, "SELECT min(id)::bigint FROM outbox", &[]).await;

    let (code, out, err) = recover_cmd(&args);
    assert_eq!(code, 1, "recover must fail: {out}{err}");
    assert!(
        err.contains(&format!("id < {oldest}")),
        "names the range: {err}"
    );

    let records = consume_topic(&topic, 120).await;
    let seen = arrivals(&records);
    let expected: Vec<i64> = (0..50).chain(80..150).collect();
    let missing: Vec<_> = expected.iter().filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}");
    assert_eq!(seen.len(), expected.len(), "nothing else arrived");
    assert!(seen.values().all(|c| *c == 1), "each once");
    db.drop().await;
}

/// The slot invalidated by max_slot_wal_keep_size while the relay is
/// stopped and rows keep coming: recover drops it, creates it again and
/// publishes the rows the lost slot never streamed; under exactly-once a
/// read_committed consumer sees every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_after_the_slot_was_invalidated_publishes_every_event_once() {
    let cluster = TempCluster::start(&[], &["max_slot_wal_keep_size=48MB"]);
    let (url, client) = cluster.with_outbox().await;
    client
        .batch_execute("CREATE TABLE filler (t text)")
        .await
        .unwrap();
    let slot = unique("invalidated").to_lowercase();
    relay_setup(&["--database-url", &url, "--slot", &slot]);
    let topic = unique("invalidated");
    let progress = unique("invalidated_progress");
    create_topics(&brokers(), &[&topic], 3).await;
    let args = history_args(&url, &slot, &topic, &progress, true);
    let mut relay = Relay::start(&args);
    let end = write(&client, 0, 50).await;
    wait_confirmed_by(&client, &relay, &slot, end, "the first 50 events confirmed").await;
    relay.stop_clean().await;

    // Events and more WAL than the limit while no relay runs.
    write(&client, 50, 150).await;
    for _ in 0..4 {
        client
            .batch_execute(
                "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 20000) g;
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    client.batch_execute("CHECKPOINT").await.unwrap();
    wait_for(
        &client,
        &format!("SELECT wal_status = 'lost' FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        "the slot to be invalidated",
    )
    .await;

    let mut all = vec!["recover"];
    all.extend(args.iter().map(String::as_str));
    let (code, out, err) = relay_cmd(&all);
    assert_eq!(code, 0, "recover: {out}{err}");

    let mut relay = Relay::start(&args);
    let end = write(&client, 150, 170).await;
    wait_confirmed_by(
        &client,
        &relay,
        &slot,
        end,
        "the events after recover confirmed",
    )
    .await;
    relay.stop_clean().await;

    let records = consume_topic(&topic, 170).await;
    let seen = arrivals(&records);
    let missing: Vec<i64> = (0..170).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}\n{out}");
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "arrived more than once: {twice:?}\n{out}");
}

/// A recover interrupted after it created the slot (killed: no chance to
/// drop it) leaves its marker in the progress topic: `run` refuses to
/// stream from that slot (the gap would never be published), and recover
/// run again drops it and publishes the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_recover_is_finished_by_recover_never_skipped_by_run() {
    use outbox_relay::pipeline::sink::progress;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (db, slot, topic, args) = lost_slot_db("recover_cut", false).await;
    let progress_topic =
        args[args.iter().position(|a| a == "--progress-topic").unwrap() + 1].clone();
    let mut relay = Relay::start(&args);
    let end = write(&db.client, 0, 50).await;
    db.wait_confirmed_by(&relay, &slot, end, "the first 50 events confirmed")
        .await;
    relay.stop_clean().await;
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    write(&db.client, 50, 150).await;

    // What a recover killed after creating the slot leaves: its marker,
    // and the slot.
    let system_id: String = scalar(
        &db.client,
        "SELECT system_identifier::text FROM pg_control_system()",
        &[],
    )
    .await;
    let key = progress::key(&system_id, &slot);
    let furthest = tokio::task::spawn_blocking({
        let (t, k) = (progress_topic.clone(), key.clone());
        move || progress::read_furthest(&brokers(), &[], &t, &k, Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap()
    .expect("a progress record");
    let marker = progress::Progress {
        epoch: furthest.epoch + 1,
        recovering: true,
        ..furthest
    };
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&progress_topic)
                .partition(0)
                .key(&key)
                .payload(&progress::value(&marker, &system_id, &slot)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    relay_setup(&["--database-url", &db.url, "--slot", &slot]);
    let created_at = db.confirmed_flush_lsn(&slot).await;

    let mut relay = Relay::start(&args);
    let code = relay.wait(Duration::from_secs(60)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "run must refuse the unfinished recover's slot: {code:?}\n{}",
        relay.log_text()
    );
    assert_eq!(
        db.confirmed_flush_lsn(&slot).await,
        created_at,
        "the slot did not move"
    );

    let (code, out, err) = recover_cmd(&args);
    assert_eq!(code, 0, "recover: {out}{err}");
    let mut relay = Relay::start(&args);
    let end = write(&db.client, 150, 170).await;
    db.wait_confirmed_by(&relay, &slot, end, "the events after recover confirmed")
        .await;
    relay.stop_clean().await;
    let records = consume_topic(&topic, 170).await;
    let seen = arrivals(&records);
    let missing: Vec<i64> = (0..170).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}\n{out}");
    assert!(seen.values().all(|c| *c == 1), "each once\n{out}");
    db.drop().await;
}

/// `run --recover-slot`: the relay finds its slot dropped, recovers it by
/// itself (the gap from the outbox table, each event once under
/// exactly-once) and streams on; the metrics count the recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_recover_slot_recovers_a_dropped_slot_by_itself() {
    let (db, slot, topic, mut args) = lost_slot_db("recover_run", true).await;
    let mut relay = Relay::start(&args);
    let end = write(&db.client, 0, 50).await;
    db.wait_confirmed_by(&relay, &slot, end, "the first 50 events confirmed")
        .await;
    relay.stop_clean().await;
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    write(&db.client, 50, 150).await;

    args.push("--recover-slot".into());
    let mut relay = Relay::start(&args);
    let addr = relay.http_address().await;
    wait_metric(&addr, "outbox_slot_recoveries_total", |v| v == Some(1.0)).await;
    let end = write(&db.client, 150, 170).await;
    db.wait_confirmed_by(
        &relay,
        &slot,
        end,
        "the events after the recovery confirmed",
    )
    .await;
    assert_eq!(
        relay_metric(&addr, "outbox_events_recovered_total").await,
        Some(100.0),
        "the 100 events of the gap came from the table"
    );
    relay.stop_clean().await;
    let records = consume_topic(&topic, 170).await;
    let seen = arrivals(&records);
    let missing: Vec<i64> = (0..170).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}");
    assert!(seen.values().all(|c| *c == 1), "each once");

    // A slot that never had a relay is a new installation: not recovered.
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    let other = format!("{slot}_new");
    let fresh: Vec<String> = args
        .iter()
        .map(|a| if *a == slot { other.clone() } else { a.clone() })
        .collect();
    let mut relay = Relay::start(&fresh);
    let code = relay.wait(Duration::from_secs(60)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "{code:?}: {}",
        relay.log_text()
    );
    let exists: bool = scalar(
        &db.client,
        "SELECT count(*) > 0 FROM pg_replication_slots WHERE slot_name = $1",
        &[&other],
    )
    .await;
    assert!(!exists, "no slot created for a relay that never ran");
    db.drop().await;
}

/// Review N10: a slot advanced by hand while no relay ran is found past the
/// furthest progress record: someone else's move, maybe over events never
/// delivered. The relay says so and stops, in both delivery modes, and
/// `recover` (after dropping the slot) publishes what the move skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_while_no_relay_ran_stops_the_relay_and_recover_fills_the_gap() {
    for eos in [false, true] {
        let name = if eos {
            "moved_down_eos"
        } else {
            "moved_down_alo"
        };
        let (db, slot, topic, args) = lost_slot_db(name, eos).await;
        let mut relay = Relay::start(&args);
        let end = write(&db.client, 0, 50).await;
        db.wait_confirmed_by(&relay, &slot, end, "the first 50 events confirmed")
            .await;
        relay.stop_clean().await;
        let end = write(&db.client, 50, 70).await;
        db.exec(&format!(
            "SELECT pg_replication_slot_advance('{slot}', '{end}'::pg_lsn)"
        ))
        .await;

        let mut relay = Relay::start(&args);
        let code = relay.wait(Duration::from_secs(60)).await;
        assert!(
            matches!(code, Some(c) if c != 0),
            "eos={eos}: the relay must stop on a slot moved while it was down: {code:?}\n{}",
            relay.log_text()
        );
        assert_eq!(db.confirmed_flush_lsn(&slot).await, end, "eos={eos}");

        db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
            .await;
        let (code, out, err) = recover_cmd(&args);
        assert_eq!(code, 0, "eos={eos}: recover: {out}{err}");
        let records = consume_topic(&topic, 70).await;
        let seen = arrivals(&records);
        let missing: Vec<i64> = (0..70).filter(|n| !seen.contains_key(n)).collect();
        assert!(missing.is_empty(), "eos={eos}: never arrived: {missing:?}");
        assert!(seen.values().all(|c| *c == 1), "eos={eos}: each once");
        db.drop().await;
    }
}

/// Review N8: the relay reads the slot's position when it sets up a session
/// and takes the slot seconds later (under exactly-once after the progress
/// topic and the transactional producer are ready). A position confirmed in
/// between (by a relay that held the slot then, here by hand) must not be
/// undone: the first status update used to send the older position, and on
/// PostgreSQL 17 and older the server takes it, moving confirmed_flush_lsn
/// back. Kafka is held (its proxy stalls) while the relay waits for it with
/// the slot read; the slot is advanced over writes to a table the
/// publication does not hold; then Kafka answers. The slot never goes back,
/// and the relay, finding it past its furthest progress record, stops (N10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_confirmed_while_the_session_was_set_up_is_never_undone() {
    use support::proxy::{Mode, Proxy};
    let db = TestDb::new("n8").await;
    db.exec(CLASSIC_TABLE).await;
    db.exec("CREATE TABLE unpublished (x int)").await;
    let slot = format!("s_{}", db.name);
    relay_setup(&["--database-url", &db.url, "--slot", &slot]);
    let listen = free_port();
    let proxy = Proxy::start(format!("127.0.0.1:{listen}").parse().unwrap()).await;
    let kafka = Kafka::behind_proxy(listen, proxy.port).await;
    let topic = unique("n8");
    create_topics(&kafka.brokers(), &[&topic], 1).await;
    let progress = unique("n8_progress");
    let args = slot_args_via(
        &kafka.brokers(),
        &db,
        &slot,
        &topic,
        &["--progress-topic", &progress, "--delivery", "exactly-once"],
    );
    let mut relay = Relay::start(&args);
    let end = write(&db.client, 0, 10).await;
    db.wait_confirmed_by(&relay, &slot, end, "the first 10 events confirmed")
        .await;
    relay.stop_clean().await;
    let read = db.confirmed_flush_lsn(&slot).await;

    proxy.set_mode(Mode::Stall);
    let accepted = proxy.accepted();
    let mut relay = Relay::start(&args);
    // Its replication connection is open and idle, and it has asked Kafka
    // (stalled): the slot was read, START_REPLICATION not yet sent.
    wait_until(
        Duration::from_secs(30),
        "the relay to wait for Kafka",
        || async {
            let waiting: i64 = scalar(
                &db.client,
                "SELECT count(*) FROM pg_stat_activity \
              WHERE backend_type = 'walsender' AND datname = current_database() AND state = 'idle'",
                &[],
            )
            .await;
            waiting == 1 && proxy.accepted() > accepted
        },
    )
    .await;
    db.exec("INSERT INTO unpublished SELECT generate_series(1, 1000)")
        .await;
    let moved = db
        .lsn(&format!(
            "SELECT end_lsn::text FROM pg_replication_slot_advance('{slot}', pg_current_wal_lsn())"
        ))
        .await;
    assert!(moved > read, "the slot advanced: {read} -> {moved}");
    proxy.set_mode(Mode::Pass);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while relay.is_running() && db.confirmed_flush_lsn(&slot).await >= moved {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay neither stopped nor moved the slot in 60 s\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = db.confirmed_flush_lsn(&slot).await;
    assert!(
        now >= moved,
        "confirmed_flush_lsn went back from {moved} to {now} (the position read before the advance)\n{}",
        relay.log_text()
    );
    let code = relay.wait(Duration::from_secs(30)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "the relay must stop on a slot past its furthest progress record: {code:?}\n{}",
        relay.log_text()
    );
    db.drop().await;
}
