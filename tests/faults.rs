//! Fault scenarios on the real services, each under continuous insert load and
//! each checked by the delivery checker (`outbox_relay::commands::verify`): nothing
//! lost, no aggregate out of order, duplicates reported and bounded by the
//! events of the transactions the slot had not confirmed at each fault. Each
//! fault's time to resume is printed (`--nocapture` shows it).
//!
//! - `relay_sigkill_at_random_moments`: the relay is SIGKILLed
//!   `OUTBOX_RELAY_KILLS` times (default 20) and restarted.
//! - `broker_sigkill_and_restart`: a one-node Kafka is killed with -9 and
//!   restarted on its port and log dirs, once for 2 s and once for 14 s.
//! - `broker_unreachable_for_a_while`: through the fault proxy, the broker
//!   refuses every connection for `OUTBOX_RELAY_OUTAGE_SECS` (default 20).
//! - `postgres_restarted_and_walsender_terminated`: `pg_ctl restart` (fast
//!   and immediate) of a cluster of the test's own, then the walsender
//!   terminated three times.
//! - `proxy_cuts_stalls_and_slows_both_connections`: the fault proxy between
//!   the relay and each service cuts, stalls, slows and refuses.
//! - `cluster_leader_sigkill_and_restart`, `cluster_two_of_three_nodes_down`,
//!   `cluster_all_nodes_down`: a three-node Kafka (RF 3,
//!   min.insync.replicas=2) loses the leader of the partition being written
//!   for 10 s, two nodes for `OUTBOX_RELAY_CLUSTER_DOWN_SECS` (default 20),
//!   and every node for `OUTBOX_RELAY_CLUSTER_OUTAGE_SECS` (default 60).
//!
//! The relay must recover by itself (it is never restarted except where the
//! test kills it). The scenarios run one at a time (a lock), so the load and
//! the times to resume of one do not disturb another on a 2-core machine.
//! `OUTBOX_RELAY_FAULT_SEED` replays the random choices of a run (each test
//! prints its seed).

use crate::support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::commands::verify::{self, OrderBy, Report, VerifySettings};
use outbox_relay::config::{Options, RelayConfig};
use outbox_relay::lsn::Lsn;
use outbox_relay::testing::Rng;
use support::proxy::{Mode, Proxy};
use support::*;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const PARTITIONS: i32 = 3;
const AGGREGATES: u64 = 16;

/// One scenario at a time (a tokio mutex: a failed test does not poison it).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

async fn connect(url: &str) -> Option<Client> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
            .await
            .ok()?
            .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

// ---------------------------------------------------------------- the load

/// One transaction the writer attempted.
#[derive(Debug, Clone)]
struct Txn {
    events: u64,
    /// `pg_current_wal_lsn()` right after the commit (≥ its end LSN); None
    /// when the outcome is unknown (the connection broke during it).
    lsn_after: Option<Lsn>,
}

/// Commits small transactions (1 to 4 events over 16 aggregates, each
/// payload naming its transaction) until stopped; reconnects when Postgres
/// goes away. The table, not this log, is what the checker trusts.
struct Writer {
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<Txn>>,
}

impl Writer {
    fn start(url: &str, mut rng: Rng) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let attempted = Arc::new(AtomicUsize::new(0));
        let (s, a, url) = (stop.clone(), attempted.clone(), url.to_string());
        let task = tokio::spawn(async move {
            let mut log: Vec<Txn> = Vec::new();
            let mut client: Option<Client> = None;
            while !s.load(Ordering::Relaxed) {
                let Some(c) = client.as_ref() else {
                    client = connect(&url).await;
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                };
                let no = log.len();
                let n = 1 + rng.below(4);
                let mut sql = String::from("BEGIN;");
                for i in 0..n {
                    let agg = rng.below(AGGREGATES);
                    sql.push_str(&format!(
                        "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('E', 'agg-{agg}', '{{\"txn\": {no}, \"i\": {i}}}');"
                    ));
                }
                sql.push_str("COMMIT; SELECT pg_current_wal_lsn()::text;");
                let res = tokio::time::timeout(Duration::from_secs(30), c.simple_query(&sql)).await;
                let lsn_after = match res {
                    Ok(Ok(msgs)) => msgs.iter().find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => r.get(0).and_then(|s| s.parse().ok()),
                        _ => None,
                    }),
                    _ => None,
                };
                if lsn_after.is_none() {
                    client = None;
                }
                log.push(Txn {
                    events: n,
                    lsn_after,
                });
                a.store(log.len(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(if lsn_after.is_some() {
                    10
                } else {
                    200
                }))
                .await;
            }
            log
        });
        Writer {
            stop,
            attempted,
            task,
        }
    }

    fn attempted(&self) -> usize {
        self.attempted.load(Ordering::Relaxed)
    }

    async fn stop(self) -> Vec<Txn> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// A monitoring connection (direct to Postgres) that reconnects.
struct Monitor {
    url: String,
    client: Option<Client>,
}

impl Monitor {
    fn new(url: &str) -> Monitor {
        Monitor {
            url: url.to_string(),
            client: None,
        }
    }

    async fn text(&mut self, sql: &str) -> Option<String> {
        if self.client.is_none() {
            self.client = connect(&self.url).await;
        }
        let c = self.client.as_ref()?;
        match c.simple_query(sql).await {
            Ok(msgs) => msgs.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            }),
            Err(_) => {
                self.client = None;
                None
            }
        }
    }

    async fn wal(&mut self) -> Option<Lsn> {
        self.text("SELECT pg_current_wal_lsn()::text")
            .await
            .and_then(|s| s.parse().ok())
    }

    async fn confirmed(&mut self, slot: &str) -> Option<Lsn> {
        self.text(&format!(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .and_then(|s| s.parse().ok())
    }

    async fn active_pid(&mut self, slot: &str) -> Option<i32> {
        self.text(&format!(
            "SELECT active_pid::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .and_then(|s| s.parse().ok())
    }

    /// Keeps asking until Postgres answers (it may be restarting).
    async fn confirmed_now(&mut self, slot: &str) -> Lsn {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.confirmed(slot).await {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "Postgres did not answer for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wal_now(&mut self) -> Lsn {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.wal().await {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "Postgres did not answer for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------- bookkeeping

/// Transactions a fault may make the relay send again: those ending after the
/// slot's confirmed position at the fault, and committed before the relay
/// was seen streaming again (`end`, in writer transactions).
#[derive(Debug)]
struct Window {
    fault: String,
    start: Lsn,
    end: Option<usize>,
    /// Sessions the relay had announced at the fault: those announced after
    /// it say the position they resumed from.
    sessions_before: usize,
}

/// One scenario: its relay settings, the load, the faults and the figures.
struct Run {
    name: String,
    slot: String,
    topic: String,
    /// Direct URL of the database (the writer, monitor and checker use it).
    url: String,
    monitor: Monitor,
    writer: Option<Writer>,
    windows: Vec<Window>,
    resumes: Vec<(String, Duration)>,
    /// With `--delivery exactly-once`: its progress topic. Then no
    /// duplicate at all is allowed.
    progress_topic: Option<String>,
}

impl Run {
    fn new(name: &str, url: &str, slot: &str, topic: &str, rng: &Rng) -> Run {
        Run {
            name: name.into(),
            slot: slot.into(),
            topic: topic.into(),
            url: url.into(),
            monitor: Monitor::new(url),
            writer: Some(Writer::start(url, rng.clone())),
            windows: Vec::new(),
            resumes: Vec::new(),
            progress_topic: None,
        }
    }

    /// The same scenario with `--delivery exactly-once`.
    fn exactly_once(mut self, eos: bool) -> Run {
        if eos {
            self.name = format!("{} (exactly-once)", self.name);
            self.progress_topic = Some(unique("fault_progress"));
        }
        self
    }

    fn relay_args(&self, database_url: &str, brokers: &str, extra: &[&str]) -> Vec<String> {
        // The backoff cap bounds the test's waits; the default is 30 s.
        let to = [
            "--slot",
            &self.slot,
            "--topic",
            &self.topic,
            "--reconnect-max-backoff",
            "5",
        ];
        let mut args = url_args(database_url, brokers, &to);
        if let Some(progress) = &self.progress_topic {
            args.extend(
                ["--delivery", "exactly-once", "--progress-topic", progress].map(String::from),
            );
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Records a fault, before it happens (`relay`: the relay that will see
    /// it; None when the fault replaces the relay). Transactions ending after
    /// the slot's confirmed position now may be sent again, and, if the slot
    /// falls back (a Postgres restart: PostgreSQL 15 does not save a logical
    /// slot's confirmed position when only that moved), those after the
    /// position each new session resumes from.
    async fn fault(&mut self, what: &str, relay: Option<&Relay>) {
        let start = self.monitor.confirmed_now(&self.slot).await;
        self.windows.push(Window {
            fault: what.into(),
            start,
            end: None,
            sessions_before: relay.map_or(0, |r| r.resumed_from().len()),
        });
    }

    /// Call when the fault is over: waits until the slot confirms a position
    /// past the server's WAL position now, i.e. events committed after the
    /// fault ended went through, and prints the time that took.
    async fn resumed(&mut self, what: &str, relay: &mut Relay) -> Duration {
        self.resumed_since(what, relay, Instant::now()).await
    }

    /// As `resumed`, timed from `cleared`: when the fault's end took a while
    /// itself (a Kafka node starting), the time to resume includes it.
    async fn resumed_since(&mut self, what: &str, relay: &mut Relay, cleared: Instant) -> Duration {
        let target = self.monitor.wal_now().await;
        let deadline = cleared + Duration::from_secs(120);
        loop {
            if self
                .monitor
                .confirmed(&self.slot)
                .await
                .is_some_and(|c| c > target)
            {
                break;
            }
            assert!(
                relay.is_running(),
                "{}: the relay exited after {what}; log:\n{}",
                self.name,
                relay.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "{}: not resumed 120 s after {what}; relay log:\n{}",
                self.name,
                relay.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = cleared.elapsed();
        // Anything committed from now on is after the resume.
        let end = self.writer.as_ref().unwrap().attempted() + 1;
        let resumes = relay.resumed_from();
        for w in self.windows.iter_mut().filter(|w| w.end.is_none()) {
            w.end = Some(end);
            let resumed_from = resumes
                .get(w.sessions_before..)
                .unwrap_or(&[])
                .iter()
                .copied()
                .min();
            if let Some(r) = resumed_from.filter(|r| *r < w.start) {
                eprintln!(
                    "{}: {}: the slot fell back from {} to {r}: everything after it is sent again",
                    self.name, w.fault, w.start
                );
                w.start = r;
            }
        }
        eprintln!(
            "{}: {what}: time to resume: {:.1} s",
            self.name,
            took.as_secs_f64()
        );
        self.resumes.push((what.to_string(), took));
        took
    }

    /// Call right after a fault that leaves nothing acknowledgeable: for
    /// `how_long`, the slot must stay at or before the server's WAL position
    /// now (nothing committed from now on can have been delivered), and the
    /// relay must keep running. Returns the highest position seen and that
    /// bound.
    async fn slot_holds(&mut self, how_long: Duration, relay: &mut Relay) -> (Lsn, Lsn) {
        let at_cut = self.monitor.wal_now().await;
        let until = Instant::now() + how_long;
        let mut highest = Lsn::default();
        while Instant::now() < until {
            if let Some(c) = self.monitor.confirmed(&self.slot).await {
                highest = highest.max(c);
                assert!(
                    c <= at_cut,
                    "{}: the slot moved to {c}, past {at_cut}, while nothing could be acknowledged",
                    self.name
                );
            }
            assert!(
                relay.is_running(),
                "{}: relay exited during the fault:\n{}",
                self.name,
                relay.log_text()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (highest, at_cut)
    }

    /// `check`, then the relay stopped gracefully (it must still run and
    /// exit 0); `survived` opens the summary line.
    async fn finish(&mut self, brokers: &str, mut relay: Relay, survived: &str) -> Report {
        let report = self.check(brokers, &mut relay).await;
        eprintln!(
            "{}: {survived}{} events checked, {} replication sessions",
            self.name,
            report.rows,
            sessions(&relay)
        );
        stop_relay(relay, &self.name).await;
        report
    }

    /// Stops the load, waits for the relay to catch up, runs the checker and
    /// asserts: nothing lost, nothing out of order or altered, duplicates
    /// only from the faults' windows. Returns the report.
    async fn check(&mut self, brokers: &str, relay: &mut Relay) -> Report {
        let log = self.writer.take().unwrap().stop().await;
        let target = self.monitor.wal_now().await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self
            .monitor
            .confirmed(&self.slot)
            .await
            .is_none_or(|c| c < target)
        {
            assert!(
                relay.is_running(),
                "{}: relay exited:\n{}",
                self.name,
                relay.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "{}: the relay did not catch up with the load within 120 s; log:\n{}",
                self.name,
                relay.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for w in self.windows.iter_mut().filter(|w| w.end.is_none()) {
            w.end = Some(log.len());
        }

        let cfg = RelayConfig::resolve(Options {
            database_url: Some(self.url.clone()),
            kafka_brokers: Some(brokers.into()),
            slot: Some(self.slot.clone()),
            topic: Some(self.topic.clone()),
            ..Options::default()
        })
        .expect("checker config");
        let settings = VerifySettings {
            order: OrderBy::Default,
            // Every duplicate, so each can be matched to a fault.
            max_examples: usize::MAX,
            read_timeout: Duration::from_secs(120),
        };
        let report = verify::verify(&cfg, &settings).await.expect("verify");
        let summary = || {
            let mut r = report.clone();
            r.duplicates.examples.truncate(10);
            format!("{r}")
        };
        assert!(report.rows > 0, "{}: no events written", self.name);
        assert_eq!(
            report.missing.count,
            0,
            "{}: events LOST\n{}",
            self.name,
            summary()
        );
        assert_eq!(
            report.unpublishable.count,
            0,
            "{}\n{}",
            self.name,
            summary()
        );
        assert_eq!(
            report.order_violations.count,
            0,
            "{}: events OUT OF ORDER\n{}",
            self.name,
            summary()
        );
        assert_eq!(report.split_keys.count, 0, "{}\n{}", self.name, summary());
        assert_eq!(report.mismatches.count, 0, "{}\n{}", self.name, summary());
        assert_eq!(report.unexpected.count, 0, "{}\n{}", self.name, summary());
        assert_eq!(
            report.duplicates.differing,
            0,
            "{}: copies that differ are not redeliveries\n{}",
            self.name,
            summary()
        );
        assert!(report.passed(false), "{}\n{}", self.name, summary());
        if self.progress_topic.is_some() {
            assert_eq!(
                report.duplicates.events,
                0,
                "{}: exactly-once, yet events arrived more than once\n{}",
                self.name,
                summary()
            );
        }

        // Bound the duplicates: each extra copy must come from a fault whose
        // window holds the event's transaction.
        let rows = sql_client(&self.url)
            .await
            .query(
                "SELECT event_id::text, (payload->>'txn')::bigint FROM outbox",
                &[],
            )
            .await
            .unwrap();
        let txn_of: HashMap<String, usize> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
            .collect();
        let in_window = |w: &Window, t: usize| {
            t < w.end.unwrap() && log[t].lsn_after.is_none_or(|l| l > w.start)
        };
        let bound: u64 = self
            .windows
            .iter()
            .map(|w| {
                (0..w.end.unwrap().min(log.len()))
                    .filter(|&t| in_window(w, t))
                    .map(|t| log[t].events)
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(
            report.duplicates.examples.len() as u64,
            report.duplicates.events,
            "every duplicate listed"
        );
        for d in &report.duplicates.examples {
            let t = txn_of[&d.event_id];
            let windows: Vec<&Window> = self.windows.iter().filter(|w| in_window(w, t)).collect();
            assert!(
                d.copies - 1 <= windows.len() as u64,
                "{}: event {} of transaction {t} (committed before {:?}) has {} copies, but only {} fault(s) could resend it: {:?}",
                self.name,
                d.event_id,
                log[t].lsn_after,
                d.copies,
                windows.len(),
                windows.iter().map(|w| &w.fault).collect::<Vec<_>>()
            );
        }
        assert!(report.duplicates.extra_records <= bound);
        let longest = self
            .resumes
            .iter()
            .max_by_key(|(_, d)| *d)
            .cloned()
            .unwrap_or_default();
        eprintln!(
            "{}: {} faults; {} events in {} transactions checked ({} records): 0 lost, 0 out of order; {} duplicated events ({} extra records, bound {}); longest time to resume: {:.1} s ({})",
            self.name,
            self.windows.len(),
            report.rows,
            log.len(),
            report.records,
            report.duplicates.events,
            report.duplicates.extra_records,
            bound,
            longest.1.as_secs_f64(),
            longest.0
        );
        report
    }
}

/// Stops the relay gracefully: it must still be running and exit 0.
async fn stop_relay(mut relay: Relay, name: &str) {
    assert!(
        relay.is_running(),
        "{name}: relay exited:\n{}",
        relay.log_text()
    );
    relay
        .stop_expecting("TERM", Duration::from_secs(60), Some(0))
        .await;
}

fn sessions(relay: &Relay) -> usize {
    relay.resumed_from().len()
}

// ---------------------------------------------------------------- scenarios

// Each scenario runs twice: at least once, and with `--delivery exactly-once`
// (the test named exactly_once_…), where no duplicate at all may arrive.
both_deliveries! {
    relay_sigkill_at_random_moments_scenario => relay_sigkill_at_random_moments, exactly_once_relay_sigkill_at_random_moments;
    broker_sigkill_and_restart_scenario => broker_sigkill_and_restart, exactly_once_broker_sigkill_and_restart;
    postgres_restarted_and_walsender_terminated_scenario => postgres_restarted_and_walsender_terminated, exactly_once_postgres_restarted_and_walsender_terminated;
    cluster_leader_sigkill_and_restart_scenario => cluster_leader_sigkill_and_restart, exactly_once_cluster_leader_sigkill_and_restart;
    cluster_all_nodes_down_scenario => cluster_all_nodes_down, exactly_once_cluster_all_nodes_down;
}

/// SIGKILL at random moments: mostly while streaming under load, one time in
/// four while the previous relay is still starting or catching up.
async fn relay_sigkill_at_random_moments_scenario(eos: bool) {
    let _serial = SERIAL.lock().await;
    let name = "relay SIGKILL";
    let kills = env_number("OUTBOX_RELAY_KILLS", 20);
    let mut rng = Rng::for_test(name);
    let (db, slot) = TestDb::classic("fault_kill").await;
    let topic = unique("fault_kill");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let mut run = Run::new(name, &db.url, &slot, &topic, &rng).exactly_once(eos);
    let args = run.relay_args(&db.url, &brokers(), &[]);
    let mut relay = Relay::start(&args);
    run.resumed("first start", &mut relay).await;
    let mut waited = true;
    for k in 1..=kills {
        tokio::time::sleep(if waited {
            rng.millis(50, 1500)
        } else {
            rng.millis(0, 700)
        })
        .await;
        relay.signal("KILL");
        assert_eq!(
            relay.wait(Duration::from_secs(30)).await,
            None,
            "killed by SIGKILL"
        );
        drop(relay);
        run.fault(&format!("kill {k}"), None).await;
        relay = Relay::start(&args);
        // One time in four, kill again before it has resumed.
        waited = k == kills || rng.below(4) != 0;
        if waited {
            run.resumed(&format!("kill {k}"), &mut relay).await;
        }
    }
    let report = run.check(&brokers(), &mut relay).await;
    eprintln!(
        "{name}: {kills} kills survived, {} events checked",
        report.rows
    );
    stop_relay(relay, name).await;
    db.drop().await;
}

/// The broker (one Apache Kafka node) is killed with -9 and restarted on its
/// port with its log dirs: once for 2 s and once for 14 s. Deliveries never time out (the
/// relay refuses a finite message.timeout.ms: librdkafka would skip the
/// timed-out records and write later ones first), so the same producer
/// reconnects and retries in order, however long the broker is away.
async fn broker_sigkill_and_restart_scenario(eos: bool) {
    let _serial = SERIAL.lock().await;
    let name = "broker SIGKILL";
    let mut rng = Rng::for_test(name);
    let (db, slot) = TestDb::classic("fault_broker").await;
    let broker = Kafka::start(free_port()).await;
    let topic = unique("fault_broker");
    create_topics(&broker.brokers(), &[&topic], PARTITIONS).await;
    let mut run = Run::new(name, &db.url, &slot, &topic, &rng).exactly_once(eos);
    let mut relay = Relay::start(&run.relay_args(&db.url, &broker.brokers(), &[]));
    run.resumed("first start", &mut relay).await;
    for (i, down) in [Duration::from_secs(2), Duration::from_secs(14)]
        .iter()
        .enumerate()
    {
        tokio::time::sleep(rng.millis(500, 2000)).await;
        let what = format!("broker kill -9 {} ({} s down)", i + 1, down.as_secs());
        run.fault(&what, Some(&relay)).await;
        broker.kill(1);
        tokio::time::sleep(*down).await;
        assert!(
            relay.is_running(),
            "{name}: relay exited while the broker was down:\n{}",
            relay.log_text()
        );
        let restarted = Instant::now();
        broker.start_node(1, true).await;
        run.resumed_since(&what, &mut relay, restarted).await;
    }
    run.finish(&broker.brokers(), relay, "2 broker kills survived, ")
        .await;
    db.drop().await;
}

/// The broker unreachable (every connection refused, open ones cut) for
/// OUTBOX_RELAY_OUTAGE_SECS: the relay keeps running, the slot never moves
/// past what was committed before the outage, and everything arrives after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_for_a_while() {
    let _serial = SERIAL.lock().await;
    let name = "broker outage";
    let outage = Duration::from_secs(env_number("OUTBOX_RELAY_OUTAGE_SECS", 20));
    let rng = Rng::for_test(name);
    let (db, slot) = TestDb::classic("fault_outage").await;
    let listen = free_port();
    let proxy = Proxy::start(format!("127.0.0.1:{listen}").parse().unwrap()).await;
    let broker = Kafka::behind_proxy(listen, proxy.port).await;
    let topic = unique("fault_outage");
    create_topics(&broker.brokers(), &[&topic], PARTITIONS).await;
    let mut run = Run::new(name, &db.url, &slot, &topic, &rng);
    let mut relay = Relay::start(&run.relay_args(&db.url, &broker.brokers(), &[]));
    run.resumed("first start", &mut relay).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let what = format!("broker unreachable {} s", outage.as_secs());
    run.fault(&what, Some(&relay)).await;
    proxy.refuse_and_cut();
    let (highest, at_cut) = run.slot_holds(outage, &mut relay).await;
    let refused = proxy.refused();
    proxy.set_mode(Mode::Pass);
    run.resumed(&what, &mut relay).await;
    eprintln!("{name}: slot held at {highest} (≤ {at_cut}) during the outage; {refused} connections refused");
    run.finish(&broker.brokers(), relay, "").await;
    db.drop().await;
}

/// A cluster of the test's own: restarted (fast: a clean shutdown; then
/// immediate: a crash), then its walsender terminated three times. After a
/// restart PostgreSQL 15 may bring the slot back to an older position than
/// the relay confirmed (it saves a logical slot's confirmed position only
/// with other changes to the slot; 17 saves it at shutdown): more repeats,
/// never a loss. The duplicate bound follows the position the relay resumed
/// from.
async fn postgres_restarted_and_walsender_terminated_scenario(eos: bool) {
    let _serial = SERIAL.lock().await;
    let name = "postgres restart";
    let mut rng = Rng::for_test(name);
    let cluster = TempCluster::start(&[], &["wal_sender_timeout=60s"]);
    let (url, admin) = cluster.with_outbox().await;
    let slot = "fault_pg".to_string();
    let (code, out, err) = relay_cmd(&["setup", "--database-url", &url, "--slot", &slot]);
    assert_eq!(code, 0, "setup failed: {out}{err}");
    drop(admin);
    let topic = unique("fault_pg");
    create_topics(&brokers(), &[&topic], PARTITIONS).await;
    let mut run = Run::new(name, &url, &slot, &topic, &rng).exactly_once(eos);
    let mut relay = Relay::start(&run.relay_args(&url, &brokers(), &[]));
    run.resumed("first start", &mut relay).await;

    for mode in ["fast", "immediate"] {
        tokio::time::sleep(rng.millis(500, 2000)).await;
        let what = format!("pg_ctl restart -m {mode}");
        run.fault(&what, Some(&relay)).await;
        tokio::task::block_in_place(|| cluster.restart(mode));
        run.resumed(&what, &mut relay).await;
    }

    for i in 1..=3 {
        tokio::time::sleep(rng.millis(300, 1500)).await;
        let pid = run
            .monitor
            .active_pid(&slot)
            .await
            .expect("a walsender holds the slot");
        let what = format!("pg_terminate_backend {i}");
        run.fault(&what, Some(&relay)).await;
        let ended = run
            .monitor
            .text(&format!("SELECT pg_terminate_backend({pid})::text"))
            .await;
        assert_eq!(ended.as_deref(), Some("true"), "terminate walsender {pid}");
        run.resumed(&what, &mut relay).await;
    }
    run.finish(
        &brokers(),
        relay,
        "2 restarts and 3 terminated walsenders survived, ",
    )
    .await;
}

/// The fault proxy between the relay and Postgres and between the relay and
/// the broker (a broker advertising the proxy's address, so that every
/// connection goes through it): cut, slow, stall and refuse on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cuts_stalls_and_slows_both_connections() {
    let _serial = SERIAL.lock().await;
    let name = "proxy";
    let mut rng = Rng::for_test(name);
    let (db, slot) = TestDb::classic("fault_proxy").await;
    let pg = Proxy::start(pg_addr(&db.url)).await;
    let listen = free_port();
    let kafka = Proxy::start(format!("127.0.0.1:{listen}").parse().unwrap()).await;
    let broker = Kafka::behind_proxy(listen, kafka.port).await;
    let topic = unique("fault_proxy");
    create_topics(&broker.brokers(), &[&topic], PARTITIONS).await;
    let mut run = Run::new(name, &db.url, &slot, &topic, &rng);
    let mut relay =
        Relay::start(&run.relay_args(&via(&db.url, &pg.addr()), &broker.brokers(), &[]));
    run.resumed("first start", &mut relay).await;
    assert!(
        pg.accepted() > 0 && kafka.accepted() > 0,
        "both connections go through the proxies"
    );

    for (proxy, service) in [(&pg, "postgres"), (&kafka, "broker")] {
        for fault in ["cut", "slow", "stall", "refuse"] {
            tokio::time::sleep(rng.millis(300, 1500)).await;
            let what = format!("{service} {fault}");
            run.fault(&what, Some(&relay)).await;
            match fault {
                "cut" => proxy.set_mode(Mode::Cut),
                "slow" => {
                    proxy.set_mode(Mode::Slow(Duration::from_millis(50)));
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    proxy.set_mode(Mode::Pass);
                }
                "stall" => {
                    proxy.set_mode(Mode::Stall);
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    proxy.set_mode(Mode::Pass);
                }
                "refuse" => {
                    proxy.refuse_and_cut();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    proxy.set_mode(Mode::Pass);
                }
                _ => unreachable!(),
            }
            assert!(
                relay.is_running(),
                "{name}: relay exited after {what}:\n{}",
                relay.log_text()
            );
            run.resumed(&what, &mut relay).await;
        }
    }
    let report = run.check(&broker.brokers(), &mut relay).await;
    eprintln!(
        "{name}: 8 proxy faults survived, {} events checked, {} replication sessions; postgres proxy: {} connections, broker proxy: {} connections",
        report.rows,
        sessions(&relay),
        pg.accepted(),
        kafka.accepted()
    );
    stop_relay(relay, name).await;
    db.drop().await;
}

// ------------------------------------------------- three-node Kafka cluster

/// A three-node Kafka (RF 3, min.insync.replicas=2) with the fault test's
/// topic on it, and a relay writing to it under load.
async fn cluster_run(name: &str, rng: &Rng, eos: bool) -> (TestDb, Kafka, Run, Relay) {
    let (db, slot) = TestDb::classic(&format!("fault_{}", name.replace(' ', "_"))).await;
    let kafka = Kafka::options().nodes(3).start().await;
    let topic = unique("fault_cluster");
    create_replicated_topics(&kafka.brokers(), &[&topic], PARTITIONS, 3).await;
    let mut run = Run::new(name, &db.url, &slot, &topic, rng).exactly_once(eos);
    let mut relay = Relay::start(&run.relay_args(&db.url, &kafka.brokers(), &[]));
    run.resumed("first start", &mut relay).await;
    (db, kafka, run, relay)
}

/// The leader of the partition being written is SIGKILLed, and restarted
/// 10 s later. The other two nodes elect a new leader from the in-sync
/// replicas; the relay's idempotent producer follows it without a gap.
async fn cluster_leader_sigkill_and_restart_scenario(eos: bool) {
    let _serial = SERIAL.lock().await;
    let name = "cluster leader SIGKILL";
    let mut rng = Rng::for_test(name);
    let (db, kafka, mut run, mut relay) = cluster_run(name, &rng, eos).await;
    tokio::time::sleep(rng.millis(1000, 3000)).await;
    let leader = kafka.leader(&run.topic, 0);
    let what = format!("leader (node {leader}) of partition 0 SIGKILLed for 10 s");
    run.fault(&what, Some(&relay)).await;
    kafka.kill(leader);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Two of three in sync: writes go on while the node is away.
    run.resumed(&what, &mut relay).await;
    let back = format!("node {leader} restarted");
    run.fault(&back, Some(&relay)).await;
    let restarted = Instant::now();
    kafka.start_node(leader, true).await;
    run.resumed_since(&back, &mut relay, restarted).await;
    run.finish(&kafka.brokers(), relay, "").await;
    db.drop().await;
}

/// Two of three nodes down: fewer in-sync replicas than
/// min.insync.replicas=2 (and no controller quorum), so no write can be
/// acknowledged. The slot does not move past what was committed before,
/// and everything arrives once they are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_of_three_nodes_down() {
    let _serial = SERIAL.lock().await;
    let name = "cluster two down";
    let mut rng = Rng::for_test(name);
    let down = Duration::from_secs(env_number("OUTBOX_RELAY_CLUSTER_DOWN_SECS", 20));
    let (db, kafka, mut run, mut relay) = cluster_run(name, &rng, false).await;
    tokio::time::sleep(rng.millis(1000, 3000)).await;
    let first = kafka.leader(&run.topic, 0);
    let second = first % 3 + 1;
    let what = format!(
        "nodes {first} and {second} SIGKILLed for {} s",
        down.as_secs()
    );
    run.fault(&what, Some(&relay)).await;
    kafka.kill(first);
    kafka.kill(second);
    let (highest, at_cut) = run.slot_holds(down, &mut relay).await;
    // One node back makes a quorum and two in-sync replicas again. The time
    // to resume counts from the restart, Kafka's own start-up included.
    let restarted = Instant::now();
    kafka.start_node(first, false).await;
    kafka.start_node(second, true).await;
    kafka.start_node(first, true).await;
    run.resumed_since(&what, &mut relay, restarted).await;
    eprintln!("{name}: slot held at {highest} (≤ {at_cut}) while two nodes were down");
    run.finish(&kafka.brokers(), relay, "").await;
    db.drop().await;
}

/// Every node down (SIGKILL) for OUTBOX_RELAY_CLUSTER_OUTAGE_SECS (default
/// 60): the relay keeps running, the slot holds, and the same producer
/// delivers everything once the cluster is back.
async fn cluster_all_nodes_down_scenario(eos: bool) {
    let _serial = SERIAL.lock().await;
    let name = "cluster all down";
    let mut rng = Rng::for_test(name);
    let outage = Duration::from_secs(env_number("OUTBOX_RELAY_CLUSTER_OUTAGE_SECS", 60));
    let (db, kafka, mut run, mut relay) = cluster_run(name, &rng, eos).await;
    tokio::time::sleep(rng.millis(1000, 3000)).await;
    let what = format!("all three nodes SIGKILLed for {} s", outage.as_secs());
    run.fault(&what, Some(&relay)).await;
    for n in 1..=3 {
        kafka.kill(n);
    }
    let (highest, at_cut) = run.slot_holds(outage, &mut relay).await;
    let restarted = Instant::now();
    kafka.start_node(1, false).await;
    kafka.start_node(2, false).await;
    for n in 1..=3 {
        kafka.start_node(n, true).await;
    }
    run.resumed_since(&what, &mut relay, restarted).await;
    eprintln!("{name}: slot held at {highest} (≤ {at_cut}) while the cluster was down");
    run.finish(&kafka.brokers(), relay, "").await;
    db.drop().await;
}

/// The stage of the moved-slot tests: relay A published ten events, froze
/// while B took the slot over and moved it on with ten more, and B stopped.
/// Kafka is a node of the test's own behind `proxy`, for A to wake to.
struct MovedWhileFrozen {
    db: TestDb,
    slot: String,
    proxy: Proxy,
    _broker: Kafka,
    a: Relay,
}

async fn moved_while_frozen(name: &str) -> MovedWhileFrozen {
    let (db, slot) = TestDb::classic(name).await;
    let listen = free_port();
    let proxy = Proxy::start(format!("127.0.0.1:{listen}").parse().unwrap()).await;
    let broker = Kafka::behind_proxy(listen, proxy.port).await;
    let topic = unique(name);
    create_topics(&broker.brokers(), &[&topic], 1).await;
    let progress = unique("progress");
    let extra = [
        "--progress-topic",
        &progress,
        "--reconnect-max-backoff",
        "1",
    ];
    let args = slot_args_via(&broker.brokers(), &db, &slot, &topic, &extra);
    let a = Relay::start(&args);
    let end = write_numbered(&db, 0, 10).await;
    db.wait_confirmed_by(&a, &slot, end, "A published the first ten")
        .await;
    a.signal("STOP");
    db.release_slot(&slot).await;
    let mut b = Relay::start(&args);
    let end = write_numbered(&db, 10, 20).await;
    db.wait_confirmed_by(&b, &slot, end, "B published the next ten")
        .await;
    b.stop_clean().await;
    MovedWhileFrozen {
        db,
        slot,
        proxy,
        _broker: broker,
        a,
    }
}

/// One-event transactions numbered `from..to`; the WAL position after them.
async fn write_numbered(db: &TestDb, from: i64, to: i64) -> Lsn {
    for n in from..to {
        db.exec(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', '{{\"n\": {n}}}')"
        ))
        .await;
    }
    db.current_wal_lsn().await
}

/// Review N6: a relay that finds its slot moved on (a standby took over
/// while it was frozen) at a moment when Kafka cannot be read is not
/// stopped as if someone had moved the slot by hand: the progress topic
/// cannot say yet, so the session ends and the next asks again; once Kafka
/// answers, the record shows the move was a relay of ours and it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_slot_while_kafka_is_unreachable_is_asked_again_not_a_stop() {
    let _serial = SERIAL.lock().await;
    let MovedWhileFrozen {
        db,
        slot,
        proxy,
        _broker,
        mut a,
    } = moved_while_frozen("fault_moved_unread").await;
    let a_addr = a.http_address().await;

    // Kafka unreachable as A wakes and finds the slot past where it left it.
    proxy.refuse_and_cut();
    a.signal("CONT");
    wait_metric(&a_addr, "outbox_reconnects_total", |v| {
        v.unwrap_or(0.0) >= 2.0
    })
    .await;
    assert!(a.is_running(), "A stopped:\n{}", a.log_text());
    proxy.set_mode(Mode::Pass);
    let end = write_numbered(&db, 20, 30).await;
    db.wait_confirmed_by(&a, &slot, end, "A, Kafka back, to publish the last ten")
        .await;
    assert!(a.is_running(), "A stopped:\n{}", a.log_text());
    assert_eq!(a.stopped_for(), None, "A announced a stop");
    a.stop_clean().await;
    db.drop().await;
}

/// Review N5: between START_REPLICATION and the session's first turn the
/// relay may wait on Kafka (here: the slot found moved, and the progress
/// topic unreachable, for up to 15 s). Status updates keep going out
/// meanwhile (the server sees replies, so a relay with
/// --terminate-stale-walsender sees a live holder), and a SIGTERM in that
/// phase stops the relay at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_of_a_session_answers_the_server_and_a_stop() {
    let _serial = SERIAL.lock().await;
    let MovedWhileFrozen {
        db,
        slot,
        proxy,
        _broker,
        mut a,
    } = moved_while_frozen("fault_starting").await;

    // A wakes with Kafka unreachable: its next session holds the slot and
    // waits on the progress topic.
    proxy.refuse_and_cut();
    a.signal("CONT");
    let replied = || async {
        db.client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE s.slot_name = $1 AND r.reply_time > now() - interval '3 seconds'",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
    };
    wait_until(
        Duration::from_secs(30),
        "A's starting session to send status updates",
        replied,
    )
    .await;
    a.stop_within(Some(0), Duration::from_secs(5)).await;
    proxy.set_mode(Mode::Pass);
    db.drop().await;
}

// ------------------------------------------------ partitions added under load

/// Review M10: partitions added to a topic while events of an aggregate are
/// still in flight to its partition. That partition's only replica is on a
/// node that is stopped, so the relay's records for it wait; the topic then
/// gains partitions on the other nodes and more events of the same
/// aggregates follow. Kafka's own partitioner would send those to the new
/// partitions at once, and they would be written before the older events
/// still waiting: a consumer would see an aggregate's later events first.
/// The relay keeps each key on its partition until nothing of the topic is
/// in flight, and only then maps keys by the new count. The topic stamps
/// each record with the broker's append time, which shows the order of
/// writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_while_records_are_held() {
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 12;
    const EACH: usize = 8;
    let (db, slot) = TestDb::classic("fault_parts").await;
    let kafka = Kafka::options().nodes(3).start().await;
    let topic = unique("fault_parts");
    // Partition 0 on node 1 alone; the partitions added later on 2 and 3.
    kafka.topic_tool(&[
        "--create",
        "--topic",
        &topic,
        "--replica-assignment",
        "1",
        "--config",
        "message.timestamp.type=LogAppendTime",
        "--config",
        "min.insync.replicas=1",
    ]);
    let relay = Relay::start(&slot_args_via(
        &kafka.brokers(),
        &db,
        &slot,
        &topic,
        &[
            // librdkafka learns the new count from its own metadata refresh.
            "--kafka-property",
            "topic.metadata.refresh.interval.ms=1000",
        ],
    ));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    let insert = |seq: std::ops::Range<usize>| {
        format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) \
             SELECT 'T', 'k' || k, json_build_object('seq', s)::text::jsonb \
             FROM generate_series({}, {}) s, generate_series(0, {}) k ORDER BY s, k",
            seq.start,
            seq.end - 1,
            KEYS - 1
        )
    };
    let topics = std::slice::from_ref(&topic);
    db.exec(&insert(0..1)).await;
    consume(&kafka.brokers(), topics, KEYS, Duration::from_secs(60)).await;

    kafka.stop(1);
    // One event per transaction, so each is read, enqueued and held alone.
    for s in 1..EACH {
        db.exec(&insert(s..s + 1)).await;
    }
    let held = (KEYS * (EACH - 1)) as f64;
    wait_metric(&addr, "outbox_inflight_events", |v| v == Some(held)).await;
    kafka.topic_tool(&[
        "--alter",
        "--topic",
        &topic,
        "--partitions",
        "6",
        "--replica-assignment",
        "1,2,3,2,3,2",
    ]);
    let gauge = format!("outbox_topic_partitions{{topic=\"{topic}\"}}");
    wait_metric(&addr, &gauge, |v| v == Some(6.0)).await;
    // librdkafka refreshes its metadata every second: past two refreshes,
    // its partitioner knows the new count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for s in EACH..2 * EACH {
        db.exec(&insert(s..s + 1)).await;
    }
    let all = 2 * EACH * KEYS;
    wait_until(
        Duration::from_secs(30),
        "the relay to enqueue every event",
        || async {
            let text = http_get(&addr, "/metrics").await.1;
            let published =
                metric(&text, "outbox_events_published_total{event_type=\"T\"}").unwrap_or(0.0);
            let inflight = metric(&text, "outbox_inflight_events").unwrap_or(0.0);
            published + inflight == all as f64
        },
    )
    .await;
    kafka.start_node(1, true).await;
    if let Err((why, got)) =
        consume_or_timeout(&kafka.brokers(), topics, all, Duration::from_secs(90)).await
    {
        panic!("{why}\n{}\n{}", offset_summary(&got), relay.log_text());
    }
    // With nothing in flight, the next events of each key follow the new count.
    db.exec(&insert(2 * EACH..3 * EACH)).await;
    let total = all + EACH * KEYS;
    let records = consume(&kafka.brokers(), topics, total, Duration::from_secs(90)).await;
    assert_eq!(records.len(), total, "{}", offset_summary(&records));

    let mut by_key: HashMap<String, Vec<(i64, i32, u64)>> = HashMap::new();
    for r in &records {
        let (ts, kind) = r.timestamp.expect("a timestamp");
        assert_eq!(kind, "LogAppendTime");
        let seq = r.payload_json()["seq"].as_u64().expect("seq");
        by_key
            .entry(r.key_str())
            .or_default()
            .push((ts, r.partition, seq));
    }
    let mut moved = 0;
    for (key, mut events) in by_key {
        events.sort_by_key(|(_, p, seq)| (*seq, *p));
        let seqs: Vec<u64> = events.iter().map(|e| e.2).collect();
        assert_eq!(
            seqs,
            (0..3 * EACH as u64).collect::<Vec<_>>(),
            "{key}: each event once"
        );
        let now = murmur2_partition(key.as_bytes(), 6);
        // One switch, from partition 0 to the key's partition by 6, after
        // every event written to 0: no later event written first.
        let partitions: Vec<i32> = events.iter().map(|e| e.1).collect();
        let switch = partitions
            .iter()
            .position(|p| *p != 0)
            .unwrap_or(events.len());
        if switch < events.len() {
            moved += 1;
        }
        assert!(
            partitions[switch..].iter().all(|p| *p == now),
            "{key}: partitions in seq order {partitions:?}"
        );
        let last_old = events[..switch].iter().map(|e| e.0).max();
        let first_new = events[switch..].iter().map(|e| e.0).min();
        if let (Some(old), Some(new)) = (last_old, first_new) {
            assert!(
                old <= new,
                "{key}: seq {switch} was written to partition {now} {} ms before seq {} to partition 0; partitions in seq order {partitions:?}",
                old - new,
                switch - 1
            );
        }
    }
    assert!(moved > 0, "no key moved to a new partition");
    let changes = format!("outbox_partition_count_changes_total{{topic=\"{topic}\"}}");
    wait_metric(&addr, &changes, |v| v == Some(1.0)).await;
    stop_relay(relay, "partitions added").await;
    db.drop().await;
}
