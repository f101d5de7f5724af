//! The relay under test as a child process: `setup`, `run` with the bench's
//! arguments, its /metrics, its CPU and RSS, and stopping it. The only place that
//! spawns the relay, so every scenario runs it with the same flags.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::kafka::linger_ms;
use super::proc::{log_tail, proc_cpu_secs, proc_status_kb};
use super::Cfg;
use crate::log;

/// Which relay a scenario runs. The default is the relay as an operator starts it
/// (at-least-once, slot `outbox_relay`); exactly-once runs on a slot of its own
/// (so it can read the same WAL as an at-least-once relay in the same database)
/// with a progress topic of the run's own, so that no earlier run's position is
/// taken for this one's.
#[derive(Clone, Debug, Default)]
pub(crate) struct Mode {
    /// `--progress-topic` with `--delivery exactly-once`; None: at-least-once.
    pub(crate) progress_topic: Option<String>,
}

/// The exactly-once relay's slot. Its transactional.id is the relay's default,
/// `outbox-relay-<system identifier>-<slot>`, so it never fences another relay
/// (a test's, the at-least-once run's) on the same cluster.
pub(crate) const EXACTLY_ONCE_SLOT: &str = "bench_exactly_once";

/// Whether the relay under test has `--delivery exactly-once` (a relay from before
/// it, as `scripts/bench --rev` may build, has not: its scenarios then leave the
/// exactly-once runs out, with a line in the log).
pub(crate) fn has_exactly_once(cfg: &Cfg) -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let has = Command::new(&cfg.a.relay_bin)
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--delivery"))
            .unwrap_or(false);
        if !has {
            log("this relay has no --delivery option: the exactly-once runs are left out");
        }
        has
    })
}

/// An at-least-once relay's progress topic, of the scenario's own (named after
/// its outbox topic, or template). The default topic would carry one scenario's record into
/// the next, whose database (and slot of the same name) is new: a relay that
/// checks the slot against its record (review N10) would take the new slot for
/// one moved while no relay ran, and stop. Left out for a relay from before
/// `--progress-topic`.
fn own_progress_topic(cfg: &Cfg, mode: &Mode, topic: &str) -> Vec<String> {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let has = *HAS.get_or_init(|| {
        Command::new(&cfg.a.relay_bin)
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--progress-topic"))
            .unwrap_or(false)
    });
    if !has || mode.is_exactly_once() {
        return Vec::new();
    }
    // A topic template's braces are not allowed in a topic name.
    let name: String = topic.chars().filter(|c| !matches!(c, '{' | '}')).collect();
    vec!["--progress-topic".into(), format!("{name}-progress")]
}

impl Mode {
    pub(crate) fn exactly_once(progress_topic: String) -> Mode {
        Mode {
            progress_topic: Some(progress_topic),
        }
    }

    pub(crate) fn is_exactly_once(&self) -> bool {
        self.progress_topic.is_some()
    }

    /// The slot the relay reads.
    pub(crate) fn slot(&self) -> &'static str {
        if self.is_exactly_once() {
            EXACTLY_ONCE_SLOT
        } else {
            "outbox_relay"
        }
    }

    /// `setup`'s arguments beyond the connection and topic: the slot, when not the default.
    fn setup_args(&self) -> Vec<String> {
        if self.is_exactly_once() {
            vec!["--slot".into(), self.slot().into()]
        } else {
            Vec::new()
        }
    }

    /// `run`'s: the slot and the delivery guarantee.
    fn run_args(&self) -> Vec<String> {
        let mut a = self.setup_args();
        if let Some(t) = &self.progress_topic {
            a.extend([
                "--delivery".into(),
                "exactly-once".into(),
                "--progress-topic".into(),
                t.clone(),
            ]);
        }
        a
    }
}

pub(crate) struct Relay {
    child: Child,
    log: PathBuf,
    /// The relay's /metrics endpoint, for its commit → acknowledgement histogram.
    http: String,
}

impl Relay {
    fn args(url: &str, brokers: &str, topic: &str) -> Vec<String> {
        [
            "--database-url",
            url,
            "--kafka-brokers",
            brokers,
            "--topic",
            topic,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub(crate) fn setup(cfg: &Cfg, url: &str, topic: &str) -> Result<()> {
        Relay::setup_as(cfg, url, topic, &Mode::default())
    }

    /// `outbox-relay setup` for the relay `mode` describes: the publication, and its slot.
    pub(crate) fn setup_as(cfg: &Cfg, url: &str, topic: &str, mode: &Mode) -> Result<()> {
        let out = Command::new(&cfg.a.relay_bin)
            .arg("setup")
            .args(Relay::args(url, &cfg.a.brokers, topic))
            .args(mode.setup_args())
            .env_remove("OUTBOX_RELAY_DATABASE_URL")
            .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
            .output()?;
        if !out.status.success() {
            bail!(
                "outbox-relay setup failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub(crate) fn start(cfg: &Cfg, url: &str, topic: &str, name: &str) -> Result<Relay> {
        Relay::start_as(cfg, url, topic, name, &Mode::default())
    }

    /// `outbox-relay run` as `mode` describes, with the bench's arguments.
    pub(crate) fn start_as(
        cfg: &Cfg,
        url: &str,
        topic: &str,
        name: &str,
        mode: &Mode,
    ) -> Result<Relay> {
        let log = cfg.a.log_dir.join(format!("bench-relay-{name}.log"));
        let http = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.to_string()
        };
        let child = Command::new(&cfg.a.relay_bin)
            .arg("run")
            .args(Relay::args(url, &cfg.a.brokers, topic))
            .args(["--http-address", &http])
            .args(mode.run_args())
            .args(own_progress_topic(cfg, mode, topic))
            .args(&cfg.a.relay_arg)
            .args(
                linger_ms()
                    .map(|l| vec!["--kafka-property".to_string(), format!("linger.ms={l}")])
                    .unwrap_or_default(),
            )
            .env_remove("OUTBOX_RELAY_DATABASE_URL")
            .env_remove("OUTBOX_RELAY_KAFKA_BROKERS")
            .env_remove("OUTBOX_RELAY_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn outbox-relay run")?;
        Ok(Relay { child, log, http })
    }

    /// The relay's Prometheus exposition text.
    pub(crate) fn metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.http)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "the relay exited ({st}); last lines of {}:\n{}",
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// CPU seconds and peak RSS (MB) so far.
    pub(crate) fn resources(&self, clk_tck: f64) -> (f64, f64) {
        (
            proc_cpu_secs(self.pid(), clk_tck).unwrap_or(f64::NAN),
            proc_status_kb(self.pid(), "VmHWM:")
                .map(|k| k as f64 / 1024.0)
                .unwrap_or(f64::NAN),
        )
    }

    pub(crate) async fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    log(format!(
                        "relay exited with {st} on SIGTERM (log {})",
                        self.log.display()
                    ));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("relay did not stop within 40 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of a numeric option passed with --relay-arg, if it was.
pub(crate) fn relay_setting(args: &[String], flag: &str) -> Option<f64> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.parse().ok()
}
