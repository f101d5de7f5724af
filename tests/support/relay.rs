//! The relay binary under test, as a command run to completion or as a
//! child process whose log, announcements and exit the tests observe.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use outbox_relay::lsn::Lsn;

use super::pg::TestDb;
use super::{unique, wait_until};

/// The relay binary under test: this build's, or OUTBOX_RELAY_TEST_BIN (to
/// run the suite against another build, such as a release binary or an
/// older commit, to show that a test fails without its fix).
pub fn relay_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("OUTBOX_RELAY_TEST_BIN") {
        return PathBuf::from(bin);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// Runs `outbox-relay <args>` to completion: (exit code, stdout, stderr).
pub fn relay_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(relay_bin())
        .args(args)
        .env_remove("OUTBOX_RELAY_DATABASE_URL")
        .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
        // Tests run relays side by side: never the fixed default port.
        .env("OUTBOX_RELAY_HTTP_ADDRESS", "127.0.0.1:0")
        .output()
        .expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `outbox-relay COMMAND --database-url URL --kafka-brokers BROKERS
/// <extra>`: (exit code, stdout, stderr).
pub fn relay_cmd_on(
    command: &str,
    url: &str,
    brokers: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![command, "--database-url", url, "--kafka-brokers", brokers];
    args.extend_from_slice(extra);
    relay_cmd(&args)
}

/// A missing topic dead-lettered, and found missing within 2 s: with
/// automatic topic creation off, the broker never creates it.
pub const MISSING_TOPIC_DEAD_LETTERED: &[&str] = &[
    "--on-error-override",
    "topic-missing=dead-letter",
    "--kafka-property",
    "allow.auto.create.topics=false",
    "--kafka-property",
    "topic.metadata.propagation.max.ms=2000",
];

/// Runs `outbox-relay setup <args>`, which must succeed; returns what it
/// printed.
pub fn relay_setup(args: &[&str]) -> String {
    let mut all = vec!["setup"];
    all.extend_from_slice(args);
    let (code, out, err) = relay_cmd(&all);
    assert_eq!(code, 0, "setup {args:?} failed: {out}{err}");
    out
}

/// The relay as a child process; killed when dropped. Its log (stderr) and
/// its announcements (stdout, one JSON object per line) go to files.
pub struct Relay {
    child: Child,
    pub log: PathBuf,
    pub out: PathBuf,
}

impl Relay {
    pub fn start(args: &[String]) -> Relay {
        let name = unique("relay");
        let log = std::env::temp_dir().join(format!("{name}.relay.log"));
        let out = std::env::temp_dir().join(format!("{name}.relay.out"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(relay_bin())
            .arg("run")
            .args(args)
            .env_remove("OUTBOX_RELAY_DATABASE_URL")
            .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
            .env("OUTBOX_RELAY_LOG", "info,outbox_relay=debug")
            .env("OUTBOX_RELAY_HTTP_ADDRESS", "127.0.0.1:0")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn outbox-relay");
        Relay { child, log, out }
    }

    /// The relay's announcements so far (`outbox_relay::observe::announce`), with
    /// the given `event`.
    pub fn announced(&self, event: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// The positions the relay's sessions resumed from, oldest first: one
    /// per session that started streaming.
    pub fn resumed_from(&self) -> Vec<Lsn> {
        self.announced("streaming")
            .iter()
            .filter_map(|v| v["resume_from"].as_str()?.parse().ok())
            .collect()
    }

    /// The bad-event kind of the relay's `stopped` line (Some(None) when it
    /// stopped for another reason; None when it has not said it stopped).
    pub fn stopped_for(&self) -> Option<Option<String>> {
        self.announced("stopped")
            .last()
            .map(|v| v["bad_event_kind"].as_str().map(str::to_string))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns the exit code (None when killed by a signal).
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "relay did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: the relay, still running, must finish its in-flight work
    /// and exit 0.
    pub async fn stop_clean(&mut self) {
        assert!(
            self.is_running(),
            "the relay stopped before it was asked to; log:\n{}",
            self.log_text()
        );
        self.stop_expecting("TERM", Duration::from_secs(30), Some(0))
            .await;
    }

    /// Sends `sig` and asserts the exit code the relay ends with within
    /// `timeout` (None: killed by a signal), showing its log when it differs.
    pub async fn stop_expecting(&mut self, sig: &str, timeout: Duration, code: Option<i32>) {
        self.signal(sig);
        self.expect_exit(timeout, code).await;
    }

    /// SIGTERM, and the exit code it must end with in less than `limit`
    /// (it waits for nothing it should not).
    pub async fn stop_within(&mut self, code: Option<i32>, limit: Duration) {
        let asked = Instant::now();
        self.stop_expecting("TERM", Duration::from_secs(30), code)
            .await;
        let took = asked.elapsed();
        assert!(took < limit, "the stop took {took:?}, more than {limit:?}");
    }

    /// Asserts the exit code the relay ends with, on its own, within
    /// `timeout` (None: killed by a signal), showing its log when it differs.
    pub async fn expect_exit(&mut self, timeout: Duration, code: Option<i32>) {
        assert_eq!(self.wait(timeout).await, code, "log:\n{}", self.log_text());
    }

    /// The address of the relay's HTTP endpoint, once it announced it.
    pub async fn http_address(&self) -> String {
        let mut found = None;
        wait_until(
            Duration::from_secs(30),
            "the HTTP endpoint to listen",
            || {
                found = self
                    .announced("http_listening")
                    .first()
                    .and_then(|v| v["address"].as_str().map(String::from));
                let ok = found.is_some();
                async move { ok }
            },
        )
        .await;
        found.unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The relay's peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the relay's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc status")
            * 1024
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard relay arguments for a test database.
pub fn relay_args(db: &TestDb, brokers: &str, extra: &[&str]) -> Vec<String> {
    url_args(&db.url, brokers, extra)
}

/// Standard relay arguments for a test database, its slot and one topic
/// (or topic template), then `extra`.
pub fn slot_args(db: &TestDb, slot: &str, topic: &str, extra: &[&str]) -> Vec<String> {
    slot_args_via(&super::brokers(), db, slot, topic, extra)
}

/// [`slot_args`] for a broker of the test's own.
pub fn slot_args_via(
    brokers: &str,
    db: &TestDb,
    slot: &str,
    topic: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args = relay_args(db, brokers, &["--slot", slot, "--topic", topic]);
    args.extend(strings(extra));
    args
}

/// Standard relay arguments for a database URL (a cluster of the test's own).
pub fn url_args(url: &str, brokers: &str, extra: &[&str]) -> Vec<String> {
    let mut args = plain_args(url, brokers, &["--status-interval", "1"]);
    args.extend(strings(extra));
    args
}

/// The two arguments every relay needs, then `extra`; nothing else (the
/// relay's own defaults, e.g. its status interval).
pub fn plain_args(url: &str, brokers: &str, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&["--database-url", url, "--kafka-brokers", brokers]);
    args.extend(strings(extra));
    args
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}
