//! Postgres failover through a failover slot (issue 16, part 2), on
//! PostgreSQL 17 and later: a primary with a physical standby that keeps a
//! synchronised copy of the relay's slot (`sync_replication_slots`,
//! `hot_standby_feedback`, `synchronized_standby_slots`). Under load the
//! primary stops and the standby is promoted; the relay, given both hosts
//! with `target_session_attrs=read-write`, resumes on the new primary from
//! the copy. `verify` against the new primary then finds nothing missing and
//! nothing Kafka holds that the new primary does not (no event published
//! from WAL the standby never had), and the repeats are one run of events
//! from the window the copy had not yet caught up with.
//!
//! The version matrix runs this file; before 17 there is nothing to fail
//! over to, and the test says so and returns (e2e.rs tests the refusal).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// A writer that inserts one-event transactions at about `per_s` through a
/// multi-host URL, and rides out the failover: on an error it reconnects
/// (to whichever host is read-write), looks whether the insert it was
/// making committed, and goes on. `n` in each payload is its number.
struct Writer {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<BTreeSet<i64>>>,
    reconnects: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

const INSERT: &str = "INSERT INTO outbox (event_type, aggregate_id, payload) \
     VALUES ('T', 'agg-' || ($1::bigint % 7), jsonb_build_object('n', $1::bigint))";

impl Writer {
    fn start(url: String, per_s: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
        let reconnects = Arc::new(AtomicU64::new(0));
        let (s, acked, re) = (stop.clone(), acknowledged.clone(), reconnects.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut unsure = false;
            let start = Instant::now();
            let mut n: i64 = 0;
            while !s.load(Ordering::Relaxed) {
                let Some(c) = client.as_ref() else {
                    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            client = Some(c);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                    continue;
                };
                if unsure {
                    // The insert before the error may have committed.
                    let found = c
                        .query_opt(
                            "SELECT 1 FROM outbox WHERE payload->>'n' = $1::bigint::text",
                            &[&n],
                        )
                        .await;
                    match found {
                        Ok(Some(_)) => {
                            acked.lock().unwrap().insert(n);
                            n += 1;
                        }
                        Ok(None) => {}
                        Err(_) => {
                            client = None;
                            continue;
                        }
                    }
                    unsure = false;
                }
                match c.execute(INSERT, &[&n]).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(n);
                        n += 1;
                    }
                    Err(_) => {
                        client = None;
                        unsure = true;
                        re.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                let due = start + Duration::from_secs_f64(n as f64 / per_s as f64);
                tokio::time::sleep_until(due.into()).await;
            }
        });
        Writer {
            stop,
            acknowledged,
            reconnects,
            task,
        }
    }

    fn written(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Stops the writer; returns the numbers whose commit it saw.
    async fn stop(self) -> (BTreeSet<i64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer");
        let acked = self.acknowledged.lock().unwrap().clone();
        (acked, self.reconnects.load(Ordering::Relaxed))
    }
}

async fn server_version(url: &str) -> i32 {
    let client = sql_client(url).await;
    scalar(
        &client,
        "SELECT current_setting('server_version_num')::int",
        &[],
    )
    .await
}

/// The standby's copy of `slot`: (synced and persistent, confirmed_flush_lsn).
async fn standby_copy(standby: &tokio_postgres::Client, slot: &str) -> Option<(bool, String)> {
    let row = standby
        .query_opt(
            "SELECT synced AND NOT temporary AND invalidation_reason IS NULL,
                    coalesce(confirmed_flush_lsn::text, '0/0')
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()?;
    Some((row.get(0), row.get(1)))
}

async fn relay_json(args: &[String]) -> (i32, serde_json::Value, String) {
    let args = args.to_vec();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        relay_cmd(&refs)
    })
    .await
    .unwrap();
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v, err)
}

/// The line of `check`'s output for the check `name`.
async fn check_line(args: &[String], name: &str) -> String {
    let mut all = vec!["check".to_string()];
    all.extend(args.iter().cloned());
    let (_, out, err) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        relay_cmd(&refs)
    })
    .await
    .unwrap();
    out.lines()
        .find(|l| l.split("  ").nth(1).map(str::trim) == Some(name))
        .unwrap_or_else(|| panic!("no `{name}` line in check's output:\n{out}{err}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_promotion_the_relay_resumes_from_the_synchronised_slot_and_loses_nothing() {
    let primary = TempCluster::start(&[], &[]);
    let primary_url = primary.url("postgres", None);
    let version = server_version(&primary_url).await;
    if version < 170000 {
        eprintln!("skipped: failover slots need PostgreSQL 17 or later; this is {version}");
        return;
    }
    let physical = "standby1";
    let admin = sql_client(&primary_url).await;
    admin.batch_execute(CLASSIC_TABLE).await.unwrap();
    let slot = unique("fo").to_lowercase();
    let (code, out, err) = relay_cmd(&[
        "setup",
        "--database-url",
        &primary_url,
        "--slot",
        &slot,
        "--failover",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let primary_args = |url: &str| -> Vec<String> {
        ["--database-url", url, "--slot", &slot]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let check = check_line(&primary_args(&primary_url), "synchronized_standby_slots").await;
    assert!(check.starts_with("WARN"), "{check}");
    // Logical walsenders of failover slots send only what this standby has
    // flushed: nothing reaches Kafka that a promoted standby could lack.
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET synchronized_standby_slots = '{physical}'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let standby = TempCluster::standby_of(&primary, physical, &["hot_standby_feedback=on"]);
    let standby_client = sql_client(&standby.url("postgres", None)).await;

    // Both hosts, the primary first; the relay and the writer each take the
    // one that is read-write.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=2",
        primary.port, standby.port
    );
    let topic = unique("fo");
    let template = format!("{topic}.{{event_type}}");
    let args: Vec<String> = url_args(&url, &brokers(), &["--slot", &slot, "--topic", &template]);
    let mut relay = Relay::start(&args);
    let relay_addr = relay.http_address().await;
    wait_metric(&relay_addr, "outbox_up", |v| v == Some(1.0)).await;

    let writer = Writer::start(url.clone(), 500);
    // Without sync_replication_slots the standby keeps no copy, and check
    // says what to set.
    let check = check_line(&args, "standby slot copy").await;
    assert!(
        check.starts_with("WARN") && check.contains("sync_replication_slots = on"),
        "{check}"
    );
    for sql in [
        "ALTER SYSTEM SET sync_replication_slots = on",
        "SELECT pg_reload_conf()",
    ] {
        standby_client.batch_execute(sql).await.unwrap();
    }
    // The standby's copy becomes usable once the primary's slot has moved
    // past where the standby's own WAL starts; the relay's confirmations do
    // that.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(standby_copy(&standby_client, &slot).await, Some((true, _))) {
        assert!(
            Instant::now() < deadline,
            "the standby has no synchronised copy of the slot after 60 s ({:?}); its log:\n{}",
            standby_copy(&standby_client, &slot).await,
            standby.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `check`, given both hosts, finds the copy.
    let check = check_line(&args, "standby slot copy").await;
    assert!(check.starts_with("PASS"), "{check}");
    let check = check_line(&args, "synchronized_standby_slots").await;
    assert!(check.starts_with("PASS"), "{check}");
    // So does `status`.
    let mut status_args = vec!["status".to_string(), "--json".to_string()];
    status_args.extend(args.iter().cloned());
    let (_, status, _) = relay_json(&status_args).await;
    let copies = status["standbys"].as_array().cloned().unwrap_or_default();
    assert_eq!(copies.len(), 1, "{status:#}");
    assert_eq!(
        (&copies[0]["server"], &copies[0]["copy"]),
        (
            &serde_json::json!(format!("127.0.0.1:{}", standby.port)),
            &serde_json::json!("synced")
        ),
        "{status:#}"
    );

    // Load across the switchover: a few seconds before, then the primary
    // stops (fast: it sends the standby all its WAL first) and the standby
    // is promoted.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let primary_confirmed: String = scalar(
        &admin,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await;
    let copy_at_stop = standby_copy(&standby_client, &slot).await.unwrap().1;
    drop(admin);
    primary.stop("fast");
    // Nothing commits between the stop and the promotion.
    let at_stop = writer.written();
    let promoting = Instant::now();
    standby.promote();
    let promoted = promoting.elapsed();
    // The standby's copy of postgresql.auto.conf names its own physical
    // slot, which it does not have: until that is reset, its logical
    // walsenders wait for a standby that will never connect (runbook step).
    let new_primary = sql_client(&standby.url("postgres", None)).await;
    let check = check_line(
        &primary_args(&standby.url("postgres", None)),
        "synchronized_standby_slots",
    )
    .await;
    assert!(
        check.starts_with("WARN")
            && check.contains(&format!("names {physical} that is not a physical slot")),
        "{check}"
    );
    for sql in [
        "ALTER SYSTEM RESET synchronized_standby_slots",
        "SELECT pg_reload_conf()",
    ] {
        new_primary.batch_execute(sql).await.unwrap();
    }
    wait_until(
        Duration::from_secs(60),
        "the relay to resume on the promoted standby",
        || async { relay.resumed_from().len() >= 2 },
    )
    .await;
    let resumed_after = promoting.elapsed();
    let resumed_at = *relay.resumed_from().last().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (acknowledged, writer_reconnects) = writer.stop().await;

    let end: String = scalar(&new_primary, "SELECT pg_current_wal_lsn()::text", &[]).await;
    let end: outbox_relay::lsn::Lsn = end.parse().unwrap();
    let confirmed_on_new = || confirmed_flush_lsn(&new_primary, &slot);
    let deadline = Instant::now() + Duration::from_secs(60);
    while confirmed_on_new().await < end {
        assert!(
            Instant::now() < deadline,
            "the relay has not confirmed {end} on the new primary after 60 s (it is at {}); its log:\n{}\nthe new primary's:\n{}",
            confirmed_on_new().await,
            relay.log_text(),
            standby.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every commit the writer saw survived the switchover (a fast stop),
    // so the table on the new primary is the whole truth.
    let rows: i64 = scalar(&new_primary, "SELECT count(*) FROM outbox", &[]).await;
    assert_eq!(rows as usize, acknowledged.len(), "rows on the new primary");

    let mut verify_args = vec!["verify".to_string(), "--json".to_string()];
    verify_args.extend(args.iter().cloned());
    let (code, report, err) = relay_json(&verify_args).await;
    assert_eq!(report["missing"]["count"], 0, "events LOST: {report:#}");
    assert_eq!(
        report["unexpected"]["count"], 0,
        "Kafka holds events the new primary does not: {report:#}"
    );
    assert_eq!(report["order_violations"]["count"], 0, "{report:#}");
    assert_eq!(report["mismatches"]["count"], 0, "{report:#}");
    assert_eq!(report["rows"], rows, "{report:#}");
    assert_eq!(code, 0, "{report:#}\n{err}");

    // The repeats: one run of consecutive events, all from before the stop.
    let records = consume_topic(&format!("{topic}.T"), rows as usize).await;
    let mut copies: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &records {
        *copies
            .entry(r.payload_json()["n"].as_u64().unwrap())
            .or_default() += 1;
    }
    let repeated: Vec<u64> = copies
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    if let (Some(first), Some(last)) = (repeated.first(), repeated.last()) {
        assert_eq!(
            (last - first + 1) as usize,
            repeated.len(),
            "repeats are not one run of consecutive events: {repeated:?}"
        );
        assert!(
            (*last as usize) < at_stop,
            "a repeat of an event committed after the switchover: {last} ({at_stop} committed before it)"
        );
    }
    assert!(
        copies.values().all(|c| *c <= 2),
        "an event published three times"
    );
    eprintln!(
        "failover: promote took {promoted:?}; the relay resumed {resumed_after:?} after the promotion began, \
         at {resumed_at} (the primary's slot was at {primary_confirmed}, the standby's copy at {copy_at_stop} just before the stop); \
         {rows} events, {} repeated ({:?}..={:?}); the writer reconnected {writer_reconnects} time(s)",
        repeated.len(),
        repeated.first(),
        repeated.last()
    );
    relay.stop_clean().await;
}
