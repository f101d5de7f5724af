//! `--delivery exactly-once` against Apache Kafka: a `read_committed`
//! consumer sees every event exactly once and every Postgres transaction
//! whole, whatever the slot says on restart. Each event's payload names its
//! Postgres transaction and how many events that transaction wrote, so the
//! checks can tell a transaction seen in part from one seen whole.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use outbox_relay::lsn::Lsn;
use outbox_relay::testing::Rng;
use support::*;

const PARTITIONS: i32 = 3;
const AGGREGATES: u64 = 12;

/// Writes transactions `first..first + n`, each of 1 to 4 events (the same
/// sizes for the same numbers), returns the WAL position after the last.
async fn write_txns(db: &TestDb, first: u64, n: u64) -> Lsn {
    for t in first..first + n {
        db.exec(&txn_sql(t)).await;
    }
    db.current_wal_lsn().await
}

fn txn_size(t: u64) -> u64 {
    1 + (t * 7 + 3) % 4
}

/// One Postgres transaction: `txn_size(t)` events over a few aggregates,
/// each payload saying which transaction it is part of and its sequence.
fn txn_sql(t: u64) -> String {
    let of = txn_size(t);
    let mut sql = String::from("BEGIN;");
    for i in 0..of {
        let agg = (t * 5 + i * 3) % AGGREGATES;
        sql.push_str(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Tested', 'agg-{agg}', \
             jsonb_build_object('txn', {t}, 'i', {i}, 'of', {of}, 'seq', nextval('outbox_id_seq')));"
        ));
    }
    sql.push_str("COMMIT;");
    sql
}

/// What a read_committed consumer must see: each event once, each of the
/// transactions `0..txns` whole, and per aggregate the order of writing.
fn assert_exactly_once(records: &[Record], txns: u64) {
    let mut ids: HashMap<String, usize> = HashMap::new();
    for r in records {
        *ids.entry(r.header("id").expect("an id header"))
            .or_default() += 1;
    }
    let repeated: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "{} events seen more than once (of {} records), e.g. {:?}",
        repeated.len(),
        records.len(),
        repeated.iter().take(5).collect::<Vec<_>>()
    );
    let mut per_txn: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for r in records {
        let p = r.payload_json();
        let (t, of) = (p["txn"].as_u64().unwrap(), p["of"].as_u64().unwrap());
        let e = per_txn.entry(t).or_insert((0, of));
        e.0 += 1;
    }
    let partial: Vec<_> = per_txn.iter().filter(|(_, (n, of))| n != of).collect();
    assert!(
        partial.is_empty(),
        "transactions seen in part (txn: (seen, written)): {:?}",
        partial.iter().take(10).collect::<Vec<_>>()
    );
    let missing: Vec<u64> = (0..txns).filter(|t| !per_txn.contains_key(t)).collect();
    assert!(
        missing.is_empty(),
        "{} transactions missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(
        per_txn.len() as u64,
        txns,
        "transactions beyond those written"
    );
    let mut by_key: HashMap<(i32, String), Vec<(i64, u64)>> = HashMap::new();
    for r in records {
        by_key
            .entry((r.partition, r.key_str()))
            .or_default()
            .push((r.offset, r.payload_json()["seq"].as_u64().unwrap()));
    }
    for ((partition, key), mut v) in by_key {
        v.sort();
        assert!(
            v.windows(2).all(|w| w[0].1 < w[1].1),
            "aggregate {key} out of order in partition {partition}"
        );
    }
}

/// Transactions `0, 1, …` written in the background, one after another,
/// until stopped; `stop` returns how many committed.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    fn start(url: &str) -> Writer {
        let url = url.to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let client = sql_client(&url).await;
            let mut t = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                client.batch_execute(&txn_sql(t)).await.unwrap();
                t += 1;
                // Load shaping: a steady stream, not synchronisation.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            t
        });
        Writer { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// At-least-once: every event of the transactions `0..txns` arrived, some
/// perhaps twice.
fn assert_none_lost(records: &[Record], txns: u64) {
    let mut seen: HashMap<u64, std::collections::HashSet<u64>> = HashMap::new();
    for r in records {
        let p = r.payload_json();
        seen.entry(p["txn"].as_u64().unwrap())
            .or_default()
            .insert(p["i"].as_u64().unwrap());
    }
    for t in 0..txns {
        let got = seen.get(&t).map_or(0, |s| s.len() as u64);
        assert_eq!(
            got,
            txn_size(t),
            "transaction {t}: {got} of {} events",
            txn_size(t)
        );
    }
}

/// A copy of the slot where it stands now, for [`put_back`].
async fn keep_a_copy_of(db: &TestDb, slot: &str) {
    db.exec(&format!(
        "SELECT pg_copy_logical_replication_slot('{slot}', '{slot}_old')"
    ))
    .await;
}

/// The slot back where [`keep_a_copy_of`] found it: behind what Kafka holds.
async fn put_back(db: &TestDb, slot: &str) {
    db.exec(&format!(
        "SELECT pg_drop_replication_slot('{slot}');
         SELECT pg_copy_logical_replication_slot('{slot}_old', '{slot}');
         SELECT pg_drop_replication_slot('{slot}_old');"
    ))
    .await;
}

fn eos_args(db: &TestDb, slot: &str, topic: &str, progress: &str) -> Vec<String> {
    relay_args(
        db,
        &brokers(),
        &[
            "--slot",
            slot,
            "--topic",
            topic,
            "--delivery",
            "exactly-once",
            "--progress-topic",
            progress,
        ],
    )
}

/// The slot is put back behind what Kafka already holds (a copy of it taken
/// before the first run): at-least-once would publish those transactions
/// again; exactly-once skips them because the progress topic says they are
/// committed, and publishes only what is new.
#[tokio::test]
async fn progress_topic_decides_repeats_even_with_the_slot_behind() {
    let (db, slot) = TestDb::classic("eos_behind").await;
    let topic = unique("eos_behind");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    keep_a_copy_of(&db, &slot).await;

    let after_a = write_txns(&db, 0, 30).await;
    let mut relay = Relay::start(&eos_args(&db, &slot, &topic, &progress));
    db.wait_confirmed_past(&slot, after_a, "the first 30 transactions confirmed")
        .await;
    relay.stop_clean().await;

    // The slot back where it was before the first run.
    put_back(&db, &slot).await;
    assert!(db.confirmed_flush_lsn(&slot).await < after_a);
    // `status` shows both: the slot behind, the progress topic at the last
    // transaction Kafka holds.
    let eos = ["--delivery", "exactly-once", "--progress-topic", &progress];
    let (code, out, err) = relay_cmd_on(
        "status",
        &db.url,
        &brokers(),
        &[&["--json", "--slot", &slot], &eos[..]].concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let in_kafka: Lsn = status["progress"]
        .as_str()
        .and_then(|p| p.split_whitespace().next())
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no progress position in {out}"));
    let slot_at: Lsn = status["confirmed_flush_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        slot_at < in_kafka && in_kafka < after_a,
        "slot {slot_at}, progress {in_kafka}, written up to {after_a}"
    );

    let after_b = write_txns(&db, 30, 20).await;
    let mut relay = Relay::start(&eos_args(&db, &slot, &topic, &progress));
    db.wait_confirmed_past(&slot, after_b, "all 50 transactions confirmed")
        .await;
    let metrics = http_get(&relay.http_address().await, "/metrics").await.1;
    relay.stop_clean().await;

    let written: u64 = (0..50).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    assert_exactly_once(&records, 50);
    assert_eq!(
        metric(&metrics, "outbox_transactions_skipped_total"),
        Some(30.0),
        "the 30 transactions already in Kafka are counted as skipped"
    );
    assert!(metric(&metrics, "outbox_kafka_transactions_committed_total").unwrap_or(0.0) >= 1.0);
    db.drop().await;
}

/// The relay SIGKILLed again and again while transactions are written: no
/// event twice, no transaction in part, none missing.
#[tokio::test]
async fn relay_sigkills_under_load_lose_and_repeat_nothing() {
    let kills: u64 = std::env::var("OUTBOX_RELAY_EOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (db, slot) = TestDb::classic("eos_kills").await;
    let topic = unique("eos_kills");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let args = eos_args(&db, &slot, &topic, &progress);

    let writer = Writer::start(&db.url);

    let mut rng = Rng::for_test("relay_sigkills_under_load_lose_and_repeat_nothing");
    let started = Instant::now();
    for _ in 0..kills {
        let mut relay = Relay::start(&args);
        db.wait_streaming(&slot).await;
        tokio::time::sleep(rng.millis(200, 1500)).await;
        relay.signal("KILL");
        relay.wait(Duration::from_secs(10)).await;
        // The walsender notices its client is gone within a moment.
        db.wait_slot_free(&slot, "the slot to be released").await;
    }
    let txns = writer.stop().await;
    let end = db.current_wal_lsn().await;
    let mut relay = Relay::start(&args);
    db.wait_confirmed_past(&slot, end, "every transaction confirmed after the kills")
        .await;
    relay.stop_clean().await;
    let written: u64 = (0..txns).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    eprintln!(
        "{kills} SIGKILLs in {:.1} s: {txns} transactions, {written} events, {} records read",
        started.elapsed().as_secs_f64(),
        records.len()
    );
    assert_exactly_once(&records, txns);
    db.drop().await;
}

/// A row that cannot be routed is dead-lettered in the Kafka transaction of
/// its Postgres transaction: once, even when the slot is put back and the
/// transaction is sent again.
#[tokio::test]
async fn dead_letters_are_written_once_in_their_transaction() {
    let (db, slot) = TestDb::classic("eos_dlq").await;
    let topic = unique("eos_dlq");
    let dlq = unique("eos_dlq_dead");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic, &dlq], 1).await;
    keep_a_copy_of(&db, &slot).await;
    let mut args = eos_args(&db, &slot, &topic, &progress);
    args.extend(
        [
            "--on-error-override",
            "key=dead-letter",
            "--dead-letter-topic",
            &dlq,
        ]
        .map(String::from),
    );
    let mut good = write_txns(&db, 0, 3).await;
    // An empty key cannot be routed: the event goes to the dead-letter topic.
    db.exec(&format!(
        "BEGIN; {} INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Bad', '', '{{}}'); COMMIT;",
        txn_sql(3).trim_start_matches("BEGIN;").trim_end_matches("COMMIT;")
    ))
    .await;
    good = good.max(write_txns(&db, 4, 2).await);
    let mut relay = Relay::start(&args);
    db.wait_confirmed_past(&slot, good, "the six transactions confirmed")
        .await;
    relay.stop_clean().await;
    put_back(&db, &slot).await;
    let end = write_txns(&db, 6, 1).await;
    let mut relay = Relay::start(&args);
    db.wait_confirmed_past(&slot, end, "the seventh transaction confirmed")
        .await;
    relay.stop_clean().await;

    let written: u64 = (0..7).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    assert_exactly_once(&records, 7);
    let dead = consume_topic(&dlq, 1).await;
    assert_eq!(
        dead.len(),
        1,
        "one dead-letter record, not one per delivery attempt"
    );
    db.drop().await;
}

/// A Postgres transaction larger than the in-flight window is never split:
/// it goes out in one Kafka transaction, so a read_committed consumer sees
/// all of it or none of it.
#[tokio::test]
async fn a_large_transaction_is_one_kafka_transaction() {
    let (db, slot) = TestDb::classic("eos_large").await;
    let topic = unique("eos_large");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let mut args = eos_args(&db, &slot, &topic, &progress);
    args.extend(["--max-inflight", "500"].map(String::from));
    let mut relay = Relay::start(&args);
    db.wait_streaming(&slot).await;
    let http = relay.http_address().await;
    let committed = || async {
        metric(
            &http_get(&http, "/metrics").await.1,
            "outbox_kafka_transactions_committed_total",
        )
        .unwrap_or(0.0)
    };
    let before = committed().await;
    const EVENTS: u64 = 20_000;
    db.exec(&format!(
        "INSERT INTO outbox (event_type, aggregate_id, payload)
         SELECT 'Big', 'agg-' || (g % {AGGREGATES}),
                jsonb_build_object('txn', 0, 'i', g, 'of', {EVENTS}, 'seq', g)
           FROM generate_series(0, {EVENTS} - 1) g"
    ))
    .await;
    db.wait_confirmed_now(&slot, "the large transaction confirmed")
        .await;
    assert_eq!(
        committed().await - before,
        1.0,
        "{EVENTS} events of one Postgres transaction in one Kafka transaction"
    );
    relay.stop_clean().await;
    let records = consume_topic(&topic, EVENTS as usize).await;
    assert_eq!(records.len() as u64, EVENTS);
    assert_exactly_once(&records, 1);
    db.drop().await;
}

/// Two relays on one slot under load: one streams, the other waits for the
/// slot (it registers its transactional.id only once it holds the slot, so
/// it never fences the active one). The active relay's walsender is
/// terminated again and again; whichever relay gets the slot next goes on
/// from the progress topic, and nothing arrives twice.
#[tokio::test]
async fn two_relays_on_one_slot_hand_over_without_duplicates() {
    let (db, slot) = TestDb::classic("eos_pair").await;
    let topic = unique("eos_pair");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let mut args = eos_args(&db, &slot, &topic, &progress);
    args.extend(["--reconnect-max-backoff", "1"].map(String::from));

    let writer = Writer::start(&db.url);
    let mut a = Relay::start(&args);
    db.wait_streaming(&slot).await;
    let mut b = Relay::start(&args);
    const HANDOVERS: usize = 6;
    let holder = || async {
        scalar::<Option<i32>>(
            &db.client,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    };
    for _ in 0..HANDOVERS {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let pid = holder().await.expect("a relay holds the slot");
        db.exec(&format!("SELECT pg_terminate_backend({pid})"))
            .await;
        // Another walsender holds it: one of the two relays took over.
        wait_until(
            Duration::from_secs(30),
            "a relay to take the slot",
            || async { holder().await.is_some_and(|p| p != pid) },
        )
        .await;
        assert!(
            a.is_running() && b.is_running(),
            "{}\n{}",
            a.log_text(),
            b.log_text()
        );
    }
    let txns = writer.stop().await;
    db.wait_confirmed_now(&slot, "every transaction confirmed")
        .await;
    let sessions = a.resumed_from().len() + b.resumed_from().len();
    eprintln!(
        "{HANDOVERS} walsender terminations: {sessions} sessions streamed (relay A {}, relay B {})",
        a.resumed_from().len(),
        b.resumed_from().len()
    );
    a.stop_clean().await;
    b.stop_clean().await;
    assert!(
        sessions > HANDOVERS,
        "every termination was followed by a new session"
    );
    let written: u64 = (0..txns).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    assert_exactly_once(&records, txns);
    db.drop().await;
}

/// The record read back is the slot's furthest, not its last: a relay
/// woken from a pause writes one record of its old session after the one
/// of the relay that took over (seen in the at-least-once moved-slot test,
/// which falsely stopped on it). Records of another slot do not count.
#[tokio::test]
async fn the_furthest_progress_record_counts_not_the_last() {
    use outbox_relay::pipeline::sink::progress::{self, Progress};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = unique("eos_progress_furthest");
    progress::ensure_topic(&brokers(), &[], &topic)
        .await
        .unwrap();
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let lsn = |s: &str| s.parse::<Lsn>().unwrap();
    let at = |commit: &str, confirmed: &str| Progress {
        commit_lsn: Some(lsn(commit)),
        anchor: None,
        timeline: Some(1),
        epoch: 0,
        transactional_id: None,
        recovering: false,
        confirmed: lsn(confirmed),
    };
    let (taken_over, stale, other) = (
        at("0/5C64E00", "0/5C64ED0"),
        at("0/5C62800", "0/5C628D0"),
        at("0/9000000", "0/9000100"),
    );
    for (slot, p) in [("s", taken_over.clone()), ("s", stale), ("other", other)] {
        let key = progress::key("7312", slot);
        let value = progress::value(&p, "7312", slot);
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let read = tokio::task::spawn_blocking(move || {
        progress::read_furthest(
            &brokers(),
            &[],
            &topic,
            &progress::key("7312", "s"),
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(read, Some(taken_over));
}

/// Review M11 with exactly-once. A relay whose connection is lost while a
/// second relay takes over, publishes and moves the slot on, finds the slot
/// past the position it confirmed: the progress topic records that position,
/// so it goes on. A slot moved by hand (pg_replication_slot_advance over
/// transactions never published) is not recorded there: the relay stops.
#[tokio::test]
async fn a_slot_moved_by_another_relay_is_followed_one_moved_by_hand_is_not() {
    slot_moved(true).await
}

/// The same at-least-once: the progress topic records every position before
/// it is confirmed there too, so a standby's move is told from a manual one
/// without exactly-once (repeats allowed, no loss).
#[tokio::test]
async fn at_least_once_a_slot_moved_by_another_relay_is_followed() {
    slot_moved(false).await
}

async fn slot_moved(eos: bool) {
    let (db, slot) = TestDb::classic("eos_moved").await;
    let topic = unique("eos_moved");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let mut args = eos_args(&db, &slot, &topic, &progress);
    if !eos {
        args = args
            .into_iter()
            .map(|a| {
                if a == "exactly-once" {
                    "at-least-once".into()
                } else {
                    a
                }
            })
            .collect();
    }
    args.extend(["--reconnect-max-backoff", "1"].map(String::from));

    let mut a = Relay::start(&args);
    let first = write_txns(&db, 0, 10).await;
    db.wait_confirmed_past(&slot, first, "A published the first ten")
        .await;
    // A freezes (a long GC pause, a stalled VM): its walsender is ended and
    // B takes over, publishes and confirms further.
    a.signal("STOP");
    db.release_slot(&slot).await;
    let mut b = Relay::start(&args);
    let second = write_txns(&db, 10, 10).await;
    db.wait_confirmed_past(&slot, second, "B published the next ten")
        .await;
    b.stop_clean().await;
    a.signal("CONT");
    let third = write_txns(&db, 20, 10).await;
    db.wait_confirmed_by(&a, &slot, third, "A, back, to publish the last ten")
        .await;
    assert!(a.is_running(), "A stopped:\n{}", a.log_text());
    assert_eq!(a.stopped_for(), None, "A announced a stop");

    // Now by hand: A frozen, its walsender ended, five transactions
    // written and the slot advanced over them.
    a.signal("STOP");
    db.release_slot(&slot).await;
    let skipped = write_txns(&db, 30, 5).await;
    db.exec(&format!(
        "SELECT pg_replication_slot_advance('{slot}', '{skipped}')"
    ))
    .await;
    a.signal("CONT");
    a.expect_exit(Duration::from_secs(60), Some(1)).await;
    let stopped = a.announced("stopped");
    let error = stopped
        .last()
        .and_then(|v| v["error"].as_str())
        .unwrap_or_default();
    assert!(
        error.contains(&format!("is at {skipped}")),
        "the stop names where the slot was found: {error}"
    );

    let written: u64 = (0..30).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    if eos {
        assert_exactly_once(&records, 30);
    } else {
        assert_none_lost(&records, 30);
    }
    db.drop().await;
}

/// A record Kafka refuses (here too large for the topic's
/// max.message.bytes, though the producer takes it) fails its Kafka
/// transaction: the relay aborts it, and writes the transaction again with
/// that record replaced by its dead letter. A read_committed consumer sees
/// every other event of the transaction once, and the dead letter once.
#[tokio::test]
async fn a_record_kafka_refuses_is_dead_lettered_in_a_rewritten_transaction() {
    let (db, slot) = TestDb::classic("eos_refused").await;
    let topic = unique("eos_refused");
    let dlq = unique("eos_refused_dlq");
    let progress = unique("eos_progress");
    create_topics_with(
        &brokers(),
        &[&topic],
        PARTITIONS,
        1,
        &[("max.message.bytes", "20000")],
    )
    .await;
    create_topics(&brokers(), &[&dlq], 1).await;
    let mut args = eos_args(&db, &slot, &topic, &progress);
    args.extend(
        [
            "--dead-letter-topic",
            &dlq,
            "--on-error-override",
            "too-large=dead-letter",
            // The producer takes the large record; the broker refuses it.
            "--kafka-property",
            "message.max.bytes=5000000",
            // Batches stay under the topic's limit, so only the large
            // record is refused.
            "--kafka-property",
            "batch.size=10000",
        ]
        .map(String::from),
    );
    let mut relay = Relay::start(&args);
    write_txns(&db, 0, 10).await;
    // Transaction 10: its events, with a large one in the middle.
    let big = "INSERT INTO outbox (event_id, event_type, aggregate_id, payload) VALUES \
               ('00000000-0000-4000-8000-0000000000b1', 'Tested', 'agg-1', \
               jsonb_build_object('blob', repeat('x', 50000)));";
    db.exec(&txn_sql(10).replacen("INSERT", &format!("{big} INSERT"), 1))
        .await;
    let end = write_txns(&db, 11, 10).await;
    db.wait_confirmed_by(&relay, &slot, end, "the relay to pass the refused record")
        .await;

    let written: u64 = (0..21).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    assert_exactly_once(&records, 21);
    let dead = consume_topic(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(
        dead[0].header("outbox.original.id").as_deref(),
        Some("00000000-0000-4000-8000-0000000000b1")
    );
    assert_eq!(
        dead[0].header("outbox.error.kind").as_deref(),
        Some("too-large")
    );
    assert!(dead[0].payload.is_none(), "{:?}", dead[0]);

    // Interleaved: the large row is written first in a transaction that
    // commits after three others, so the slot passes the row's own
    // position before its transaction is published (review: a note kept by
    // the change's position was forgotten there, and the relay restarted
    // for ever).
    let late = sql_client(&db.url).await;
    late.batch_execute(&format!("BEGIN; {}", big.replace("b1", "b3")))
        .await
        .unwrap();
    write_txns(&db, 21, 3).await;
    late.batch_execute(&txn_sql(24).replacen("BEGIN;", "", 1))
        .await
        .unwrap();
    let end = db.current_wal_lsn().await;
    db.wait_confirmed_by(
        &relay,
        &slot,
        end,
        "the relay to pass the interleaved refused record",
    )
    .await;
    let written: u64 = (0..25).map(txn_size).sum();
    assert_exactly_once(&consume_topic(&topic, written as usize).await, 25);
    let dead = consume_topic(&dlq, 2).await;
    assert_eq!(dead.len(), 2, "two dead letters: {dead:?}");
    assert_eq!(
        dead[1].header("outbox.original.id").as_deref(),
        Some("00000000-0000-4000-8000-0000000000b3")
    );
    let text = http_get(&relay.http_address().await, "/metrics").await.1;
    assert_eq!(
        metric(&text, "outbox_dead_lettered_total"),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(&text, "outbox_kafka_transactions_aborted_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    relay.stop_clean().await;

    // Under halt (the default) the relay stops on it, naming the kind,
    // though librdkafka reports the records it purged with the failed
    // transaction first; the slot stays before it.
    let halting: Vec<String> = args
        .iter()
        .filter(|a| *a != "--on-error-override" && *a != "too-large=dead-letter")
        .cloned()
        .collect();
    let mut relay = Relay::start(&halting);
    write_txns(&db, 25, 3).await;
    let (before, after) = db
        .exec_between(&txn_sql(28).replacen(
            "INSERT",
            &format!("{} INSERT", big.replace("b1", "b2")),
            1,
        ))
        .await;
    relay.expect_exit(Duration::from_secs(60), Some(1)).await;
    assert_eq!(
        relay.stopped_for(),
        Some(Some("too-large".into())),
        "{}",
        relay.log_text()
    );
    db.assert_not_confirmed(&slot, before, after, "the refused record")
        .await;
    db.drop().await;
}

/// The same for a topic that does not exist (auto-creation off): the
/// record is dead-lettered in the transaction written again.
#[tokio::test]
async fn a_missing_topic_is_dead_lettered_in_a_rewritten_transaction() {
    let (db, slot) = TestDb::classic("eos_notopic").await;
    let prefix = unique("eos_notopic");
    let (good, dlq) = (format!("{prefix}.Tested"), format!("{prefix}.dlq"));
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&good, &dlq], PARTITIONS).await;
    let template = format!("{prefix}.{{event_type}}");
    let mut args: Vec<String> = eos_args(&db, &slot, &good, &progress)
        .into_iter()
        .map(|a| if a == good { template.clone() } else { a })
        .collect();
    args.extend(strings(&["--dead-letter-topic", &dlq]));
    args.extend(strings(MISSING_TOPIC_DEAD_LETTERED));
    let mut relay = Relay::start(&args);
    write_txns(&db, 0, 5).await;
    let nowhere = "INSERT INTO outbox (event_id, event_type, aggregate_id, payload) VALUES \
                   ('00000000-0000-4000-8000-0000000000c1', 'Nowhere', 'agg-1', '{\"n\": 1}');";
    db.exec(&txn_sql(5).replacen("INSERT", &format!("{nowhere} INSERT"), 1))
        .await;
    let end = write_txns(&db, 6, 5).await;
    db.wait_confirmed_by(
        &relay,
        &slot,
        end,
        "the relay to pass the record for a missing topic",
    )
    .await;
    let written: u64 = (0..11).map(txn_size).sum();
    assert_exactly_once(&consume_topic(&good, written as usize).await, 11);
    let dead = consume_topic(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header("outbox.error.kind").as_deref(),
        Some("topic-missing")
    );
    assert_eq!(
        dead[0].header("outbox.original.topic").unwrap(),
        format!("{prefix}.Nowhere")
    );
    assert_eq!(dead[0].payload.as_deref(), Some(&b"{\"n\": 1}"[..]));
    relay.stop_clean().await;
    db.drop().await;
}

/// Logical decoding messages as events with exactly-once: a transactional
/// one goes with its transaction, a non-transactional one is a unit of its
/// own (ordered by a position inside its record, since its LSN may be where
/// the commit of the transaction that emitted it starts). Sent again with
/// the slot put back, none is published twice, and no transaction next to
/// one is skipped.
#[tokio::test]
async fn logical_messages_are_published_once() {
    let (db, slot) = TestDb::classic("eos_messages").await;
    let rows = unique("eos_msg_rows");
    let msgs = unique("eos_msg");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&rows, &format!("{msgs}.M")], 1).await;
    keep_a_copy_of(&db, &slot).await;
    let mut args = eos_args(&db, &slot, &rows, &progress);
    args.extend(
        [
            "--message-prefix",
            "outbox:",
            "--message-topic",
            &format!("{msgs}.{{type}}"),
        ]
        .map(String::from),
    );
    let row = |t: u64| {
        format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Tested', 'agg-1', \
             jsonb_build_object('txn', {t}, 'i', 0, 'of', 1, 'seq', nextval('outbox_id_seq')));"
        )
    };
    let mut t = 0;
    let mut messages = 0;
    let mut write_round = |sql: &mut String| {
        // A row and a transactional message; a row and a non-transactional
        // message right before COMMIT; a message outside any transaction.
        sql.push_str(&format!(
            "BEGIN; {} SELECT pg_logical_emit_message(true, 'outbox:M:k', '{{\"m\": {messages}}}'); COMMIT;",
            row(t)
        ));
        sql.push_str(&format!(
            "BEGIN; {} SELECT pg_logical_emit_message(false, 'outbox:M:k', '{{\"m\": {}}}'); COMMIT;",
            row(t + 1),
            messages + 1
        ));
        sql.push_str(&format!(
            "SELECT pg_logical_emit_message(false, 'outbox:M:k', '{{\"m\": {}}}');",
            messages + 2
        ));
        t += 2;
        messages += 3;
    };
    let mut sql = String::new();
    for _ in 0..5 {
        write_round(&mut sql);
    }
    db.exec(&sql).await;
    let first = db.current_wal_lsn().await;
    let mut relay = Relay::start(&args);
    db.wait_confirmed_past(&slot, first, "the first rounds confirmed")
        .await;
    relay.stop_clean().await;
    put_back(&db, &slot).await;
    let mut sql = String::new();
    for _ in 0..3 {
        write_round(&mut sql);
    }
    db.exec(&sql).await;
    let end = db.current_wal_lsn().await;
    let mut relay = Relay::start(&args);
    db.wait_confirmed_past(&slot, end, "every round confirmed")
        .await;
    relay.stop_clean().await;

    assert_exactly_once(&consume_topic(&rows, t as usize).await, t);
    let got = consume_topic(&format!("{msgs}.M"), messages as usize).await;
    let mut ns: Vec<u64> = got
        .iter()
        .map(|r| r.payload_json()["m"].as_u64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, (0..messages).collect::<Vec<_>>(), "every message once");
    db.drop().await;
}

/// A topic the relay may not write to (an ACL denies it Write) under
/// exactly-once: the transaction fails, and the relay stops naming
/// `authorization`, the slot before the transaction, rather than
/// restarting for ever. A Kafka of the test's own
/// with StandardAuthorizer: everyone may do everything (no ACL found)
/// except Write on that one topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_relay_may_not_write_to_stops_it_naming_authorization() {
    let kafka = Kafka::options()
        .config("authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer")
        .config("allow.everyone.if.no.acl.found=true")
        .start()
        .await;
    let (db, slot) = TestDb::classic("eos_acl").await;
    let prefix = unique("eos_acl");
    let (good, secret) = (format!("{prefix}.Tested"), format!("{prefix}.Secret"));
    create_topics(&kafka.brokers(), &[&good, &secret], 1).await;
    let lib = std::env::var("OUTBOX_RELAY_KAFKA_LIB")
        .expect("OUTBOX_RELAY_KAFKA_LIB (scripts/stack env)");
    run_ok(
        std::process::Command::new("java").args([
            "-Xmx192m",
            "-cp",
            &format!("{lib}/*"),
            "org.apache.kafka.tools.AclCommand",
            "--bootstrap-server",
            &kafka.brokers(),
            "--add",
            "--deny-principal",
            "User:ANONYMOUS",
            "--operation",
            "Write",
            "--topic",
            &secret,
        ]),
        "AclCommand",
    );
    let template = format!("{prefix}.{{event_type}}");
    let progress = unique("eos_progress");
    let mut relay = Relay::start(&slot_args_via(
        &kafka.brokers(),
        &db,
        &slot,
        &template,
        &["--delivery", "exactly-once", "--progress-topic", &progress],
    ));
    let first = write_txns(&db, 0, 3).await;
    db.wait_confirmed_by(&relay, &slot, first, "the first three")
        .await;
    let (before, after) = db.exec_between("INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('Secret', 'agg-1', '{}')").await;
    relay.expect_exit(Duration::from_secs(90), Some(1)).await;
    assert_eq!(
        relay.stopped_for(),
        Some(Some("authorization".into())),
        "{}",
        relay.log_text()
    );
    db.assert_not_confirmed(&slot, before, after, "the refused transaction")
        .await;
    db.drop().await;
}

/// Review N9: a progress topic that deletes as well as compacts would lose a
/// quiet slot's only record after retention.ms: refused, as is one that
/// does not compact.
#[tokio::test]
async fn a_progress_topic_that_also_deletes_is_refused() {
    use outbox_relay::pipeline::sink::progress::{self, ProgressError};
    for policy in ["compact,delete", "delete"] {
        let topic = unique("eos_progress_policy");
        create_topics_with(
            &brokers(),
            &[&topic],
            1,
            1,
            &[("cleanup.policy", policy), ("retention.ms", "60000")],
        )
        .await;
        match progress::ensure_topic(&brokers(), &[], &topic).await {
            Err(e @ ProgressError::NotCompacted { .. }) => {
                assert!(e.to_string().contains("cleanup.policy=compact"), "{e}");
            }
            other => panic!("cleanup.policy={policy} accepted: {other:?}"),
        }
    }
}

/// Review N7: relays of one slot given different `--transactional-id`s (a
/// per-pod template). The active one is frozen, most likely with a Kafka
/// transaction open or being committed; the other takes over under its own
/// id and publishes on; then the first is continued. Kafka fences only
/// producers of one id, so the relay that takes over fences the id the
/// progress record names before it reads on: whatever the frozen relay had
/// open never commits, and a read_committed consumer sees no duplicate.
#[tokio::test]
async fn relays_with_different_transactional_ids_still_fence_each_other() {
    let (db, slot) = TestDb::classic("eos_ids").await;
    let topic = unique("eos_ids");
    let progress = unique("eos_progress");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let args = |id: &str| {
        let mut a = eos_args(&db, &slot, &topic, &progress);
        a.extend(
            [
                "--transactional-id",
                id,
                "--transaction-max-duration",
                "5",
                "--reconnect-max-backoff",
                "1",
            ]
            .map(String::from),
        );
        a
    };
    let holder = || async {
        scalar::<Option<i32>>(
            &db.client,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    };

    let writer = Writer::start(&db.url);
    let mut active = Relay::start(&args("pod-0"));
    db.wait_streaming(&slot).await;
    let mut frozen_ones = Vec::new();
    for round in 1..=3 {
        // Load shaping: events flow for a while before each freeze.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let pid = holder().await.expect("a relay holds the slot");
        let at_freeze = db.current_wal_lsn().await;
        let frozen_at = Instant::now();
        active.signal("STOP");
        db.exec(&format!("SELECT pg_terminate_backend({pid})"))
            .await;
        let next = Relay::start(&args(&format!("pod-{round}")));
        // The new relay confirms past where the frozen one stood: it has
        // published (again) whatever that one held open.
        db.wait_confirmed_by(
            &next,
            &slot,
            at_freeze,
            "the relay that took over to go past the freeze",
        )
        .await;
        // Frozen longer than --transaction-max-duration: woken, its first
        // turn commits what it held open, before it reads its dead socket.
        tokio::time::sleep(Duration::from_secs(6).saturating_sub(frozen_at.elapsed())).await;
        active.signal("CONT");
        frozen_ones.push(std::mem::replace(&mut active, next));
    }
    let txns = writer.stop().await;
    let end = db.current_wal_lsn().await;
    db.wait_confirmed_by(&active, &slot, end, "every transaction confirmed")
        .await;
    active.stop_clean().await;
    for mut r in frozen_ones {
        r.stop_clean().await;
    }
    let written: u64 = (0..txns).map(txn_size).sum();
    let records = consume_topic(&topic, written as usize).await;
    assert_exactly_once(&records, txns);
    db.drop().await;
}
