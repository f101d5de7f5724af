//! The operator commands, one module each, all entered the same way:
//! `command(config_file, args) -> exit status`, where `args` are the
//! command's own clap arguments. A command owns its arguments, its output
//! and its exit status; what every command does first (load and check the
//! options, exit 2 naming a bad one) is [`Entry::with_config`]. The pipeline's stages are
//! not run from here except by `backfill`, `recover` and `run`.

use std::future::Future;
use std::path::Path;

use crate::config::{Options, RelayConfig};

pub mod backfill;
pub mod check;
pub mod cleanup;
pub mod recover;
pub mod run;
pub mod setup;
pub mod status;
pub mod tail;
pub mod verify;

/// Whether a command needs the Kafka options (`--kafka-brokers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kafka {
    Required,
    Optional,
}

/// How a command is entered: its name, as its messages start (`outbox-relay
/// NAME: ...`), and whether it needs Kafka.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    name: &'static str,
    kafka: Kafka,
}

impl Entry {
    pub const fn new(name: &'static str, kafka: Kafka) -> Self {
        Entry { name, kafka }
    }

    /// The shared prologue: runs `body` with the relay's options from flags,
    /// environment and the config file, checked. A bad option is exit status
    /// 2 before `body` starts, with one line that names the command, the
    /// option and the fix.
    pub async fn with_config<F>(
        self,
        config: Option<&Path>,
        options: Options,
        body: impl FnOnce(RelayConfig) -> F,
    ) -> u8
    where
        F: Future<Output = u8>,
    {
        match crate::config::load(config, options, self.kafka == Kafka::Required) {
            Ok(cfg) => body(cfg).await,
            Err(e) => self.fail(format_args!("configuration error: {e}"), 2),
        }
    }

    /// A failure on one line of stderr, named after the command; returns
    /// `status`, the exit status it ends the command with.
    pub fn fail(self, e: impl std::fmt::Display, status: u8) -> u8 {
        eprintln!("outbox-relay {}: {e}", self.name);
        status
    }
}

/// Where a command's step-by-step lines go: stdout, one a line.
pub fn say(line: String) {
    println!("{line}");
}

/// An error and its causes on one line, without repeating a cause whose
/// text the message before it already includes (the relay's messages embed
/// their cause so they read well on their own).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
