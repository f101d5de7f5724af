//! Test support: real Postgres and Apache Kafka, started by `scripts/stack up`
//! (or `scripts/test`), plus the relay binary as a child process so that
//! SIGTERM and SIGKILL are real.
//!
//! Each test gets its own database (slots and publications are per database)
//! and its own topic names, so tests share the services but not state. What
//! lives where: `pg` (databases, throwaway clusters), `kafka` (topics, reading
//! records back, brokers of a test's own), `relay` (the binary under test),
//! `proxy` (the fault proxy), `certs` (a test CA); reproducible randomness
//! is the library's `outbox_relay::testing`, shared with the unit tests.
//! This file keeps only what all of them share.

#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

pub mod certs;
pub mod kafka;
pub mod pg;
pub mod proxy;
pub mod relay;

// Most tests want all of it through `use support::*`.
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use pg::*;
#[allow(unused_imports)]
pub use relay::*;

pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the local Postgres and broker. \
             Run them with scripts/test, or `scripts/stack up && source $OUTBOX_RELAY_STACK_DIR/env` first"
        )
    })
}

/// Admin URL of the test cluster (a superuser on the `postgres` database).
pub fn admin_url() -> String {
    env("OUTBOX_RELAY_DATABASE_URL")
}

pub fn brokers() -> String {
    env("OUTBOX_RELAY_KAFKA_BROKERS")
}

/// A name unique to this test run, usable in SQL and topic names.
/// A unique topic prefix and the template `{prefix}.{event_type}` that
/// routes each event type to a topic of its own under it.
pub fn templated(name: &str) -> (String, String) {
    let prefix = unique(name);
    let template = format!("{prefix}.{{event_type}}");
    (prefix, template)
}

pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound then released).
/// A broker address nothing listens on.
pub fn no_broker() -> String {
    format!("127.0.0.1:{}", free_port())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP endpoint");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs a command of the test's set-up (a script, a Java tool) and returns
/// its stdout; panics with its status and output when it fails.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The relay's value of one metric, read over HTTP from its endpoint at `addr`.
/// Asserts that `text` (an error, a log, a report) says `needle`.
#[track_caller]
pub fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
}

pub async fn relay_metric(addr: &str, sample: &str) -> Option<f64> {
    metric(&http_get(addr, "/metrics").await.1, sample)
}

/// Waits (60 s) until the relay at `addr` exports `sample` with a value
/// `ok` accepts (None while it exports none).
pub async fn wait_metric(addr: &str, sample: &str, ok: impl Fn(Option<f64>) -> bool) {
    let what = format!("the relay's {sample} to reach the value waited for");
    wait_until(Duration::from_secs(60), &what, || async {
        ok(relay_metric(addr, sample).await)
    })
    .await;
}

/// A URL with a query parameter (`key=value`) added.
pub fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// The value of one sample line of a Prometheus exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l[sample.len()..].trim().parse().ok())
}

/// A scenario written once for both deliveries, as two tests: the first
/// name runs `scenario(false)` (at least once), the second `scenario(true)`
/// (`--delivery exactly-once`). A module lists its pairs in one table.
macro_rules! both_deliveries {
    ($($scenario:ident => $at_least_once:ident, $exactly_once:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $at_least_once() {
            $scenario(false).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $exactly_once() {
            $scenario(true).await
        }
    )*};
}
