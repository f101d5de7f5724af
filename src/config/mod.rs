//! Configuration: command-line flags, `OUTBOX_RELAY_*` environment variables
//! and an optional TOML file, resolved into one validated [`RelayConfig`].
//!
//! Precedence, highest first: flag, environment variable, TOML file, preset,
//! built-in default. Every option has all three spellings: `--key-column`,
//! `OUTBOX_RELAY_KEY_COLUMN`, `key_column`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::route::router::RouterConfig;

mod options;
mod presets;
mod resolve;

pub use crate::duration::{parse_duration, BareNumber};
pub use crate::observe::LogFormat;
pub use crate::pipeline::settings::{ExactlyOnceConfig, RelayConfig, StreamingConfig};
pub use options::Options;
pub use presets::Preset;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    #[default]
    Any,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{option} is required: pass --{flag} or set OUTBOX_RELAY_{env} (or `{key}` in the --config file)", flag = option.replace('_', "-"), env = option.to_uppercase(), key = option)]
    Missing { option: &'static str },
    #[error("invalid {option} {value:?}: {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl RelayConfig {
    /// The one table a one-table command (`backfill`, `cleanup`, `verify`)
    /// works on, or an error that says how to pick one.
    pub fn single_table(&self, command: &str) -> Result<&RouterConfig, ConfigError> {
        match self.tables.as_slice() {
            [one] if one.table.is_pattern() => Err(ConfigError::Invalid {
                option: "table",
                value: one.table.to_string(),
                reason: format!(
                    "{command} works on one outbox table at a time, and {} is a pattern: pass --table with one of the tables it stands for (e.g. --table {})",
                    one.table,
                    one.table.in_schema(&one.table.schema.replace('*', "a"))
                ),
            }),
            [one] => Ok(one),
            many => Err(ConfigError::Invalid {
                option: "table",
                value: "(none)".into(),
                reason: format!(
                    "{command} works on one outbox table at a time and the config file has {} [[tables]] sections ({}): pass --table with one of them, once per table",
                    many.len(),
                    self.table_names()
                ),
            }),
        }
    }
}

fn seconds(option: &'static str, v: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::Invalid {
            option,
            value: v.to_string(),
            reason: "expected a positive number of seconds".into(),
        })
}

fn sql_name(option: &'static str, v: String) -> Result<String, ConfigError> {
    if v.is_empty() || v.len() > 63 || v.contains('\0') {
        return Err(ConfigError::Invalid {
            option,
            value: v,
            reason: "expected a name of 1 to 63 bytes".into(),
        });
    }
    Ok(v)
}

/// `--kafka-property KEY=VALUE` values, for every Kafka client the relay
/// builds (the producer, check, verify, tail).
pub fn kafka_properties(raw: Vec<String>) -> Result<Vec<(String, String)>, ConfigError> {
    raw.iter()
        .flat_map(|value| split_unescaped(value))
        .filter(|s| !s.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            // Only the name is echoed: in a mistyped
            // `sasl.password:secret` what follows it is a secret.
            _ => Err(ConfigError::Invalid {
                option: "kafka_property",
                value: match kv.find(|c: char| c == ':' || c.is_whitespace()) {
                    Some(i) => format!("{}… (the rest is not shown)", &kv[..i]),
                    None => kv.clone(),
                },
                reason: "expected KEY=VALUE, e.g. compression.type=lz4".into(),
            }),
        })
        .collect()
}

/// Splits at `;` but not at `\;` (which becomes `;`), so that a password
/// with a `;` in it survives (review L3).
fn split_unescaped(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&';') => {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(';')
                }
            }
            ';' => parts.push(String::new()),
            c => {
                if let Some(p) = parts.last_mut() {
                    p.push(c)
                }
            }
        }
    }
    parts
}

/// PostgreSQL's own rule for replication slot names: 1 to 63 lower-case
/// letters, digits and underscores. Checked here so that a bad name is a
/// configuration error, not a server error halfway through a session.
fn slot_name(v: String) -> Result<String, ConfigError> {
    let ok = (1..=63).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(ConfigError::Invalid {
            option: "slot",
            value: v,
            reason: "a replication slot name is 1 to 63 lower-case letters, digits and underscores"
                .into(),
        });
    }
    Ok(v)
}

/// The configuration a command runs with: its flags and environment over
/// the `--config` file, resolved. `need_kafka` is false for the commands that
/// never talk to Kafka (`setup`, `status`, `check`, `cleanup`), which then do
/// not require the brokers. The one loader of every command.
pub fn load(
    file: Option<&Path>,
    options: Options,
    need_kafka: bool,
) -> Result<RelayConfig, ConfigError> {
    let merged = match file {
        Some(path) => options.or(Options::from_file(path)?),
        None => options,
    };
    if need_kafka {
        RelayConfig::resolve(merged)
    } else {
        RelayConfig::resolve_for_setup(merged)
    }
}

#[cfg(test)]
mod tests;
