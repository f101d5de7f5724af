//! `outbox-relay status` and `outbox-relay check` against a real Postgres and
//! broker: exact lines, JSON fields and exit codes.

use crate::support;

use std::time::Duration;

use support::*;

/// Tests on the shared cluster take turns: WAL is cluster-wide, and "0 bytes
/// unconfirmed" only holds while no other test writes WAL.
static SHARED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whitespace collapsed, so that column alignment does not matter.
fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The value of the `status` table row labelled `label`.
fn row(table: &str, label: &str) -> String {
    table
        .lines()
        .find_map(|l| {
            l.strip_prefix(label)
                .filter(|rest| rest.starts_with("  "))
                .map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{table}"))
}

/// The `check` line for `name`, whitespace collapsed: `OUTCOME name detail…`.
fn check_line(out: &str, name: &str) -> String {
    out.lines()
        .map(collapse)
        .find(|l| {
            l.get(5..)
                .is_some_and(|rest| rest.starts_with(name) && rest[name.len()..].starts_with(' '))
        })
        .unwrap_or_else(|| panic!("no check line {name:?} in:\n{out}"))
}

fn status(db: &TestDb, slot: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["status", "--database-url", &db.url, "--slot", slot];
    args.extend_from_slice(extra);
    relay_cmd(&args)
}

fn status_json(db: &TestDb, slot: &str) -> serde_json::Value {
    let (code, out, err) = status(db, slot, &["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn check(url: &str, brokers: &str, slot: &str, extra: &[&str]) -> (i32, String, String) {
    relay_cmd_on("check", url, brokers, &[&["--slot", slot], extra].concat())
}

/// Slot names are per cluster: each test has its own.
fn slot_name() -> String {
    unique("slot").to_lowercase()
}

fn setup(db: &TestDb, slot: &str) {
    relay_setup(&["--database-url", &db.url, "--slot", slot]);
}

/// A database of the test's own with the classic outbox, and a slot name of
/// its own; `setup` run for both when `set_up`.
async fn classic(name: &str, set_up: bool) -> (TestDb, String) {
    let db = TestDb::new(name).await;
    let slot = slot_name();
    db.exec(CLASSIC_TABLE).await;
    if set_up {
        setup(&db, &slot);
    }
    (db, slot)
}

const STATUS_KEYS: [&str; 29] = [
    "slot",
    "slot_exists",
    "slot_type",
    "plugin",
    "slot_database",
    "active",
    "active_pid",
    "confirmed_flush_lsn",
    "restart_lsn",
    "retained_wal_bytes",
    "unconfirmed_bytes",
    "wal_status",
    "invalidation_in_s",
    "invalidated_by",
    "invalidation_reason",
    "safe_wal_size",
    "failover",
    "synced",
    "current_wal_lsn",
    "publication",
    "publication_exists",
    "publishes_inserts",
    "publication_all_tables",
    "publication_tables",
    "table",
    "table_published",
    "database",
    "server_version",
    "server_version_num",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_before_setup_says_the_slot_is_missing() {
    let _turn = SHARED.lock().await;
    let (db, slot) = classic("status_noslot", false).await;

    let (code, out, err) = status(&db, &slot, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        err.trim(),
        format!(
            "outbox-relay status: replication slot \"{slot}\" does not exist (database \"{}\"): run `outbox-relay setup` first, or check --slot and the database in the URL",
            db.name
        )
    );
    assert_eq!(row(&out, "slot"), slot);
    assert_eq!(
        row(&out, "slot exists"),
        "no: run `outbox-relay setup` (check --slot and the database in the URL)"
    );
    assert_eq!(row(&out, "publication exists"), "no");
    assert_eq!(row(&out, "table published"), "no");
    assert_eq!(row(&out, "database"), db.name);

    let (code, out, err) = status(&db, &slot, &["--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["slot_exists"], false);
    assert_eq!(v["slot"], slot.as_str());
    assert_eq!(v["confirmed_flush_lsn"], serde_json::Value::Null);
    assert_eq!(v["retained_wal_bytes"], serde_json::Value::Null);
    assert_eq!(v["publication_exists"], false);
    assert_contains(&err, "does not exist");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_after_setup_shows_the_slot_and_retained_wal_grows() {
    let _turn = SHARED.lock().await;
    let (db, slot) = classic("status_slot", true).await;

    // Right after setup nothing is unconfirmed. Background processes may
    // write a WAL record now and then: allow a few attempts.
    let mut table = String::new();
    for _ in 0..20 {
        let (code, out, err) = status(&db, &slot, &[]);
        assert_eq!(code, 0, "{out}{err}");
        table = out;
        if row(&table, "unconfirmed bytes") == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(row(&table, "unconfirmed bytes"), "0", "{table}");
    assert!(
        table.starts_with(&format!("slot                 {slot}\n")),
        "{table}"
    );
    assert_eq!(row(&table, "slot exists"), "yes");
    assert_eq!(row(&table, "slot type"), "logical (pgoutput)");
    assert_eq!(row(&table, "slot database"), db.name);
    assert_eq!(row(&table, "active"), "no (no relay is connected)");
    assert_eq!(row(&table, "active pid"), "-");
    assert_eq!(row(&table, "wal status"), "reserved");
    assert_eq!(
        row(&table, "safe wal size"),
        "unlimited (max_slot_wal_keep_size = -1)"
    );
    assert_eq!(row(&table, "publishes inserts"), "yes");
    assert_eq!(row(&table, "publication tables"), "public.outbox");
    assert_eq!(row(&table, "table published"), "yes");
    let confirmed = db.confirmed_flush_lsn(&slot).await.to_string();
    assert_eq!(row(&table, "confirmed flush lsn"), confirmed);

    let before = status_json(&db, &slot);
    let object = before.as_object().expect("a JSON object");
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected = STATUS_KEYS.to_vec();
    expected.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, expected);
    assert_eq!(before["slot_exists"], true);
    assert_eq!(before["plugin"], "pgoutput");
    assert_eq!(before["active"], false);
    assert_eq!(before["confirmed_flush_lsn"], confirmed.as_str());
    assert_eq!(
        before["publication_tables"],
        serde_json::json!(["public.outbox"])
    );
    let retained_before = before["retained_wal_bytes"].as_i64().expect("a number");
    assert!(retained_before >= 0);

    // No relay runs: the slot holds everything written from now on.
    db.exec(
        "INSERT INTO outbox (event_id, event_type, aggregate_id, payload)
         SELECT gen_random_uuid(), 'order_created', 'order-' || i, jsonb_build_object('i', i)
           FROM generate_series(1, 500) AS i",
    )
    .await;
    let after = status_json(&db, &slot);
    let retained_after = after["retained_wal_bytes"].as_i64().expect("a number");
    let unconfirmed_after = after["unconfirmed_bytes"].as_i64().expect("a number");
    assert!(
        retained_after > retained_before + 10_000,
        "retained WAL {retained_before} -> {retained_after}"
    );
    assert!(unconfirmed_after > 10_000, "{after}");
    assert_eq!(after["confirmed_flush_lsn"], confirmed.as_str());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup() {
    let _turn = SHARED.lock().await;
    let (db, slot) = classic("check_good", true).await;

    let (code, out, err) = check(&db.url, &brokers(), &slot, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<String> = out.lines().map(collapse).collect();
    let outcomes: Vec<(&str, &str)> = lines[..lines.len() - 1]
        .iter()
        .map(|l| (&l[..4], l[5..].split(' ').next().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("PASS", "postgres"),
            ("PASS", "postgres"),
            ("PASS", "wal_level"),
            ("PASS", "free"),
            ("PASS", "free"),
            ("WARN", "max_slot_wal_keep_size"),
            ("PASS", "outbox"),
            ("PASS", "publication"),
            ("PASS", "slot"),
            ("PASS", "slot"),
            ("PASS", "replication"),
            ("PASS", "table"),
            ("PASS", "kafka"),
            ("WARN", "kafka"),
            ("PASS", "progress"),
        ],
        "{out}"
    );
    assert_eq!(lines.last().unwrap(), "13 passed, 2 warning(s), 0 failed");
    assert!(
        check_line(&out, "postgres identity")
            .starts_with("PASS postgres identity sslmode=prefer, and the server is on this host"),
        "{out}"
    );
    assert_eq!(
        check_line(&out, "wal_level"),
        "PASS wal_level wal_level = logical"
    );
    assert_eq!(
        check_line(&out, "publication"),
        "PASS publication publication outbox_pub covers public.outbox and publishes inserts"
    );
    assert!(
        check_line(&out, "free slots")
            .starts_with("PASS free slots the relay's slot exists, so it needs none ("),
        "{out}"
    );
    assert!(
        check_line(&out, "max_slot_wal_keep_size").contains(
            "fix: ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf();"
        ),
        "{out}"
    );
    assert!(
        check_line(&out, "kafka topic").starts_with(
            "WARN kafka topic topic template events.{event_type}: each row's topic comes from column(s) event_type;"
        ),
        "{out}"
    );

    // A fixed topic: PASS when it exists, WARN with a fix when it does not.
    let topic = unique("check_topic");
    create_topics(&brokers(), &[&topic], 3).await;
    let (code, out, err) = check(&db.url, &brokers(), &slot, &["--topic", &topic]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        check_line(&out, "kafka topic"),
        format!("PASS kafka topic topic {topic} exists (3 partition(s))")
    );
    let missing = unique("check_missing");
    let (code, out, err) = check(&db.url, &brokers(), &slot, &["--topic", &missing]);
    assert_eq!(code, 0, "{out}{err}");
    let line = check_line(&out, "kafka topic");
    assert!(
        line.starts_with(&format!("WARN kafka topic topic {missing} does not exist"))
            && line.contains("; fix: create it"),
        "{line}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_an_unreachable_broker() {
    let _turn = SHARED.lock().await;
    let (db, slot) = classic("check_nobroker", true).await;
    let dead = no_broker();
    let (code, out, err) = check(&db.url, &dead, &slot, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let line = check_line(&out, "kafka brokers");
    assert!(
        line.starts_with(&format!(
            "FAIL kafka brokers no answer from {dead} within 5 s: "
        )),
        "{line}"
    );
    assert!(
        line.ends_with("; fix: check --kafka-brokers (host:port of a listener reachable from here), that the brokers run, firewalls, and the brokers' advertised.listeners"),
        "{line}"
    );
    // The broker is the only failure, and without it no topic is judged.
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{out}"
    );
    assert!(!out.contains("kafka topic"), "{out}");
    assert!(
        out.ends_with("11 passed, 1 warning(s), 1 failed\n"),
        "{out}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_wal_level_is_replica() {
    let cluster = TempCluster::start(&[], &["wal_level=replica"]);
    let (code, out, err) = check(
        &cluster.url("postgres", None),
        &brokers(),
        "outbox_relay",
        &[],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        check_line(&out, "wal_level"),
        "FAIL wal_level wal_level = replica, but logical replication needs logical; fix: ALTER SYSTEM SET wal_level = logical; then restart Postgres (a reload is not enough)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_for_a_role_without_replication() {
    let _turn = SHARED.lock().await;
    let (db, slot) = classic("check_role", true).await;
    let role = unique("norepl").to_lowercase();
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON public.outbox TO {role};"
    ))
    .await;
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(
        url, db.url,
        "the test URL has no user postgres@: {}",
        db.url
    );

    // `check` as the role fails once: the two privilege lines, the output.
    let privileges = || {
        let (code, out, err) = check(&url, &brokers(), &slot, &[]);
        assert_eq!(code, 1, "{out}{err}");
        let lines = ["replication privilege", "table privilege"].map(|n| check_line(&out, n));
        (lines, out)
    };
    let ([replication, table], out) = privileges();
    assert_eq!(
        replication,
        format!("FAIL replication privilege role {role} has neither REPLICATION nor superuser, so it cannot stream from a slot; fix: ALTER ROLE {role} REPLICATION; (as a superuser)")
    );
    assert_eq!(
        table,
        format!("PASS table privilege role {role} may SELECT from public.outbox")
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{out}"
    );

    // With REPLICATION but no SELECT, the table line fails instead.
    db.exec(&format!(
        "ALTER ROLE {role} REPLICATION; REVOKE SELECT ON public.outbox FROM {role};"
    ))
    .await;
    let ([replication, table], _) = privileges();
    assert_eq!(
        replication,
        format!("PASS replication privilege role {role} has REPLICATION")
    );
    assert_eq!(
        table,
        format!("FAIL table privilege role {role} lacks SELECT on public.outbox; fix: GRANT SELECT ON public.outbox TO {role};")
    );
    db.drop().await;
    let admin = sql_client(&admin_url()).await;
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_publication_lacks_the_table() {
    let _turn = SHARED.lock().await;
    let (db, slot) = classic("check_pub", false).await;
    db.exec(
        "CREATE TABLE other (id int PRIMARY KEY);
         CREATE PUBLICATION outbox_pub FOR TABLE other WITH (publish = 'insert');",
    )
    .await;
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await;

    let (code, out, err) = check(&db.url, &brokers(), &slot, &[]);
    assert_eq!(code, 1, "{out}{err}");
    let line = check_line(&out, "publication");
    assert_eq!(
        line,
        "FAIL publication publication outbox_pub does not include public.outbox; fix: ALTER PUBLICATION outbox_pub ADD TABLE public.outbox; (or run outbox-relay setup, which adds it)"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{out}"
    );

    let (code, table, err) = status(&db, &slot, &[]);
    assert_eq!(code, 0, "{table}{err}");
    assert_eq!(row(&table, "publication tables"), "public.other");
    assert_eq!(row(&table, "table published"), "no");

    // The suggested fix is valid SQL and ends the failure; the other table
    // stays in the publication, which is said (its rows are skipped).
    let fix = line.split("; fix: ").nth(1).unwrap();
    let sql = &fix[..fix.find(" (or").unwrap()];
    db.exec(sql).await;
    let (code, out, err) = check(&db.url, &brokers(), &slot, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        check_line(&out, "publication").starts_with(
            "WARN publication publication outbox_pub covers public.outbox and publishes inserts, and it also covers 1 other table(s): public.other."
        ),
        "{out}"
    );

    // A publication that does not publish inserts fails with its own fix.
    db.exec("ALTER PUBLICATION outbox_pub SET (publish = 'update')")
        .await;
    let (code, out, _) = check(&db.url, &brokers(), &slot, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        check_line(&out, "publication"),
        "FAIL publication publication outbox_pub does not publish inserts; fix: ALTER PUBLICATION outbox_pub SET (publish = 'insert');"
    );
    db.drop().await;
}

/// H3 of the December 2026 review: a publication shared with other tables.
/// `check` says which tables it found (WARN, not FAIL); `run` skips their
/// rows, counts them by table, publishes every outbox row in order and keeps
/// confirming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_with_other_tables_is_reported_and_their_rows_skipped() {
    let (db, slot) = classic("pub_shared", true).await;
    db.exec(
        "CREATE TABLE orders (id serial PRIMARY KEY, note text);
         ALTER PUBLICATION outbox_pub ADD TABLE orders;",
    )
    .await;
    let topic = unique("pub_shared");
    create_topics(&brokers(), &[&topic], 1).await;

    let (code, out, err) = check(&db.url, &brokers(), &slot, &["--topic", &topic]);
    assert_eq!(code, 0, "another table is no failure: {out}{err}");
    let line = check_line(&out, "publication");
    assert!(
        line.starts_with("WARN publication publication outbox_pub covers public.outbox and publishes inserts, and it also covers 1 other table(s): public.orders.")
            && line.contains("fix: "),
        "{line}"
    );

    let mut relay = Relay::start(&slot_args(&db, &slot, &topic, &[]));
    let addr = relay.http_address().await;
    db.wait_streaming(&slot).await;
    const TXNS: usize = 20;
    for i in 0..TXNS {
        db.exec(&format!(
            "BEGIN;
             INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', '{{\"n\": {}}}');
             INSERT INTO orders (note) VALUES ('in between');
             INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ('T', 'a', '{{\"n\": {}}}');
             COMMIT;
             INSERT INTO orders (note) VALUES ('alone');",
            2 * i,
            2 * i + 1
        ))
        .await;
    }
    let after = db.current_wal_lsn().await;
    let records = consume(
        &brokers(),
        std::slice::from_ref(&topic),
        2 * TXNS,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        payload_numbers_by_offset(&records, "n"),
        (0..2 * TXNS as u64).collect::<Vec<_>>(),
        "every outbox row, in order, nothing else"
    );
    db.wait_confirmed_past(&slot, after, "the shared publication's rows")
        .await;
    let text = http_get(&addr, "/metrics").await.1;
    assert_eq!(
        metric(&text, "outbox_skipped_rows_total{table=\"public.orders\"}"),
        Some(2.0 * TXNS as f64),
        "{text}"
    );
    relay.stop_clean().await;
    db.drop().await;
}

/// `check --delivery exactly-once`: the progress topic (missing: `run`
/// creates it; not compacted: FAIL), the brokers' transaction settings, and
/// a transactional producer started under a throwaway id.
#[tokio::test]
async fn check_exactly_once_reports_transactions_and_the_progress_topic() {
    let (db, slot) = classic("check_eos", true).await;
    let progress = unique("check_progress");
    let eos = [
        "--delivery",
        "exactly-once",
        "--progress-topic",
        progress.as_str(),
    ];
    let (_, out, err) = check(&db.url, &brokers(), &slot, &eos);
    assert!(
        check_line(&out, "progress topic").starts_with("PASS"),
        "{out}{err}"
    );
    assert!(
        check_line(&out, "kafka transaction settings").starts_with("PASS"),
        "{out}"
    );
    assert!(
        check_line(&out, "kafka transactions").starts_with("PASS"),
        "{out}"
    );
    // A topic kept by time, not by key, grows forever: refused.
    create_topics(&brokers(), &[&progress], 1).await;
    let (code, out, _) = check(&db.url, &brokers(), &slot, &eos);
    let line = check_line(&out, "progress topic");
    assert!(
        line.starts_with("FAIL") && line.contains("cleanup.policy=delete"),
        "{out}"
    );
    assert_ne!(code, 0);
    db.drop().await;
}
