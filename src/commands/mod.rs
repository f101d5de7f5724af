//! The operator commands, one module each, all entered the same way:
//! `command(config_file, args) -> exit status`, where `args` are the
//! command's own clap arguments. A command owns its arguments, its output
//! and its exit status; what every command does first (load and check the
//! options, exit 2 naming a bad one) is [`load`]. The pipeline's stages are
//! not run from here except by `backfill`, `recover` and `run`.

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

/// The shared prologue: the relay's options from flags, environment and the
/// config file, checked. A bad option is exit status 2, with one line that
/// names the command, the option and the fix.
pub fn load(
    name: &str,
    config: Option<&Path>,
    options: Options,
    kafka: Kafka,
) -> Result<RelayConfig, u8> {
    crate::config::load(config, options, kafka == Kafka::Required).map_err(|e| {
        eprintln!("outbox-relay {name}: configuration error: {e}");
        2
    })
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
