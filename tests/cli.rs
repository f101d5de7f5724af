//! The command line: configuration layering and the errors a user sees.

use crate::support;

use support::*;

#[test]
fn missing_options_name_flag_env_and_config_key() {
    let (code, _, err) = relay_cmd(&["run", "--kafka-brokers", "x:1"]);
    assert_eq!(code, 2);
    assert_contains(
        &err,
        "database_url is required: pass --database-url or set OUTBOX_RELAY_DATABASE_URL",
    );
}

#[test]
fn invalid_values_are_refused_before_connecting() {
    let (code, _, err) = relay_cmd_on(
        "run",
        "postgres://u@h/db",
        "x:1",
        &["--kafka-property", "linger.ms"],
    );
    assert_eq!(code, 2);
    assert_contains(
        &err,
        "invalid kafka_property \"linger.ms\": expected KEY=VALUE",
    );
    let (code, _, err) = relay_cmd_on("run", "postgres://u@h/db", "x:1", &["--topic", "bad topic"]);
    assert_eq!(code, 2);
    assert_contains(&err, "invalid topic");
    let (code, _, err) = relay_cmd_on("run", "postgres://u:hunter2@h:notaport/db", "x:1", &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid database_url") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn config_file_is_a_layer_below_env_and_flags() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    // `run` with a config file of the two settings every relay needs and `line`.
    let run_with = |line: &str| {
        let base = "database_url = \"postgres://u@h/db\"\nkafka_brokers = \"x:1\"\n";
        std::fs::write(&file, format!("{base}{line}\n")).unwrap();
        relay_cmd(&["--config", file.to_str().unwrap(), "run"])
    };
    let (code, _, err) = run_with("not_an_option = 1");
    assert_eq!(code, 2);
    assert_contains(&err, &format!("config file {}", file.display()));
    assert_contains(&err, "not_an_option");

    // The file supplies what flags do not; a flag overrides the file. The
    // relay then fails on the (bad) value from the file, proving it was read.
    let (code, _, err) = run_with("topic = \"from file\"");
    assert_eq!(code, 2);
    assert_contains(&err, "invalid topic \"from file\"");
    let out = std::process::Command::new(relay_bin())
        .args([
            "--config",
            file.to_str().unwrap(),
            "run",
            "--topic",
            "bad flag",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_contains(&err, "invalid topic \"bad flag\"");
    // An environment variable sits between the file and the flags.
    let out = std::process::Command::new(relay_bin())
        .args(["--config", file.to_str().unwrap(), "run"])
        .env("OUTBOX_RELAY_TOPIC", "bad env")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_contains(&err, "invalid topic \"bad env\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_setup_says_to_run_setup() {
    let db = TestDb::new("cli_noslot").await;
    db.exec(CLASSIC_TABLE).await;
    let (code, _, err) = relay_cmd_on("run", &db.url, &brokers(), &["--slot", "nope"]);
    assert_eq!(code, 1);
    assert_contains(&err, "replication slot \"nope\" does not exist: on a new installation run `outbox-relay setup` first");
    assert_contains(&err, "outbox-relay recover");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_names_a_missing_column_and_lists_the_real_ones() {
    let db = TestDb::new("cli_nocol").await;
    db.exec(CLASSIC_TABLE).await;
    let (code, _, err) = relay_cmd_on("setup", &db.url, "x:1", &["--key-column", "customer_id"]);
    assert_eq!(code, 1);
    assert_contains(&err, "table public.outbox has no column customer_id (set by --key-column); its columns are: id, event_id, event_type, aggregate_id, payload");
    let (code, _, err) = relay_cmd_on("setup", &db.url, "x:1", &["--table", "missing"]);
    assert_eq!(code, 1);
    assert_contains(&err, "table public.missing does not exist");
    // Nothing was created by the failed runs.
    let n: i64 = scalar(
        &db.client,
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
        &[],
    )
    .await;
    assert_eq!(n, 0);
    db.drop().await;
}

/// L4 of the December 2026 review: `tail` escapes control characters, takes
/// --kafka-property, and ends when its reader goes away (`tail | head`).
#[test]
fn tail_escapes_control_characters_and_stops_when_the_reader_leaves() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::io::BufRead;
    let topic = unique("tail");
    let producer: BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for i in 0..200 {
        let payload = format!("{{\"n\": {i}, \"evil\": \"\u{1b}[2J\"}}");
        producer
            .send(BaseRecord::to(&topic).key("k").payload(&payload))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(std::time::Duration::from_secs(30)).unwrap();
    let mut child = std::process::Command::new(relay_bin())
        .args([
            "tail",
            "--kafka-brokers",
            &brokers(),
            "--topic-prefix",
            &topic,
            "--from-beginning",
            "--kafka-property",
            "client.id=tail-test",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains("\\u{1b}[2J") && !line.contains('\u{1b}'),
        "{line:?}"
    );
    // Read everything, so tail is idle when its reader leaves: no write of
    // its own would then tell it the pipe is closed.
    for _ in 1..200 {
        line.clear();
        out.read_line(&mut line).unwrap();
    }
    drop(out);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tail went on after its reader left"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
