//! Configuration: command-line flags, `OUTBOX_RELAY_*` environment variables
//! and an optional TOML file, resolved into one validated [`RelayConfig`].
//!
//! Precedence, highest first: flag, environment variable, TOML file, preset,
//! built-in default. Every option has all three spellings: `--key-column`,
//! `OUTBOX_RELAY_KEY_COLUMN`, `key_column`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::policy::ErrorPolicy;
use crate::pipeline::route::router::{
    validate_topic, HeaderColumn, RouterConfig, TableName, TopicTemplate,
};

mod duration;
mod options;
mod presets;

pub use duration::{parse_duration, BareNumber};
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
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
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

#[derive(Debug, Clone)]
pub struct StreamingConfig {
    pub memory_budget: usize,
    pub spill_dir: PathBuf,
}

/// The validated configuration of one relay. Its Debug leaves out secrets:
/// the database password (tokio-postgres redacts it) and Kafka property
/// values (only their names are shown).
#[derive(Clone)]
pub struct RelayConfig {
    /// Connection settings, TLS and password included.
    pub database: crate::pg::config::DatabaseConfig,
    pub kafka_brokers: String,
    pub publication: String,
    pub slot: String,
    pub router: RouterConfig,
    pub kafka_properties: Vec<(String, String)>,
    pub max_inflight: u64,
    pub max_inflight_bytes: u64,
    /// None: chosen from the server version.
    pub protocol_version: Option<u32>,
    pub messages: Option<crate::pipeline::route::messages::MessageConfig>,
    pub heartbeat_interval: Option<Duration>,
    /// Some when in-progress transactions are streamed.
    pub streaming: Option<StreamingConfig>,
    pub status_interval: Duration,
    pub shutdown_timeout: Duration,
    /// None: off. See `--replication-timeout`.
    pub replication_timeout: Option<Duration>,
    pub terminate_stale_walsender: bool,
    pub reconnect_max_backoff: Duration,
    /// None when the HTTP endpoint is off.
    pub http_address: Option<std::net::SocketAddr>,
    pub error_policy: ErrorPolicy,
    pub log_format: LogFormat,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let property_names: Vec<&str> = self
            .kafka_properties
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        f.debug_struct("RelayConfig")
            .field("database", &self.database)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("table", &self.router.table.to_string())
            .field("topic", &self.router.topic.to_string())
            .field("kafka_properties (values not shown)", &property_names)
            .finish_non_exhaustive()
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

impl RelayConfig {
    /// Resolves merged options for `run`, which needs every setting.
    pub fn resolve(o: Options) -> Result<RelayConfig, ConfigError> {
        Self::resolve_with(o, true)
    }

    /// Resolves merged options for `setup`, which never talks to Kafka and
    /// so does not need the brokers.
    pub fn resolve_for_setup(o: Options) -> Result<RelayConfig, ConfigError> {
        Self::resolve_with(o, false)
    }

    fn resolve_with(o: Options, need_kafka: bool) -> Result<RelayConfig, ConfigError> {
        let url = o.database_url.ok_or(ConfigError::Missing {
            option: "database_url",
        })?;
        let overrides = crate::pg::config::Overrides {
            ssl_mode: o.ssl_mode,
            ssl_root_cert: o.ssl_root_cert,
            ssl_cert: o.ssl_cert,
            ssl_key: o.ssl_key,
            password: o.database_password,
            password_file: o.database_password_file,
            pgpassword: std::env::var("PGPASSWORD").ok(),
        };
        let database = crate::pg::config::DatabaseConfig::resolve(&url, overrides).map_err(
            |(option, reason)| {
                ConfigError::Invalid {
                    option,
                    // Never echo the URL or a password.
                    value: "<redacted>".into(),
                    reason,
                }
            },
        )?;
        if database.get_user().is_none() {
            return Err(ConfigError::Invalid {
                option: "database_url",
                value: "<redacted>".into(),
                reason: "it names no user".into(),
            });
        }
        let kafka_brokers = o.kafka_brokers.unwrap_or_default();
        if need_kafka && kafka_brokers.trim().is_empty() {
            return Err(ConfigError::Missing {
                option: "kafka_brokers",
            });
        }
        let preset = o.preset.unwrap_or(Preset::Classic).defaults();
        let table_text = o.table.unwrap_or_else(|| preset.table.to_string());
        let table = TableName::parse(&table_text).map_err(|reason| ConfigError::Invalid {
            option: "table",
            value: table_text.clone(),
            reason,
        })?;
        let topic_text = o.topic.unwrap_or_else(|| preset.topic.to_string());
        let topic = TopicTemplate::parse(&topic_text).map_err(|reason| ConfigError::Invalid {
            option: "topic",
            value: topic_text.clone(),
            reason,
        })?;
        let headers = match o.header_columns {
            Some(list) => list
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    HeaderColumn::parse(s).map_err(|reason| ConfigError::Invalid {
                        option: "header_columns",
                        value: s.clone(),
                        reason,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => preset
                .headers
                .iter()
                .map(|h| HeaderColumn {
                    column: h.to_string(),
                    header: h.to_string(),
                })
                .collect(),
        };
        let column = |option: &'static str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_string());
            sql_name(option, v)
        };
        let router = RouterConfig {
            table,
            id_column: column("id_column", o.id_column, preset.id)?,
            key_column: column("key_column", o.key_column, preset.key)?,
            payload_column: column("payload_column", o.payload_column, preset.payload)?,
            topic,
            headers,
            event_type_column: match o.event_type_column {
                Some(c) if c.eq_ignore_ascii_case("none") => None,
                Some(c) => Some(sql_name("event_type_column", c)?),
                None => Some(preset.event_type.to_string()),
            },
            require_json: o.payload_format == Some(PayloadFormat::Json),
        };
        let mut error_policy = ErrorPolicy {
            default: o.on_error.unwrap_or_default(),
            overrides: Default::default(),
            dead_letter_topic: o
                .dead_letter_topic
                .unwrap_or_else(|| "outbox.dead-letter".to_string()),
        };
        if let Err(reason) = validate_topic(&error_policy.dead_letter_topic) {
            return Err(ConfigError::Invalid {
                option: "dead_letter_topic",
                value: error_policy.dead_letter_topic,
                reason,
            });
        }
        for o in o.on_error_override.unwrap_or_default() {
            if o.trim().is_empty() {
                continue;
            }
            let (kind, policy) =
                ErrorPolicy::parse_override(&o).map_err(|reason| ConfigError::Invalid {
                    option: "on_error_override",
                    value: o.clone(),
                    reason,
                })?;
            error_policy.overrides.insert(kind, policy);
        }
        let kafka_properties = kafka_properties(o.kafka_property.unwrap_or_default())?;
        // Enough to keep a local broker busy (a 1M-event backlog drained as
        // fast with 5000 as with 10000 in the benchmark), small enough that
        // the relay stays within ~25 MB; raise both for a distant broker:
        // the window must cover throughput × round trip.
        let max_inflight = o.max_inflight.unwrap_or(5_000);
        if max_inflight == 0 {
            return Err(ConfigError::Invalid {
                option: "max_inflight",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let max_inflight_bytes = o.max_inflight_bytes.unwrap_or(16 << 20);
        if max_inflight_bytes == 0 {
            return Err(ConfigError::Invalid {
                option: "max_inflight_bytes",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let messages = match o.message_prefix {
            None => None,
            Some(prefix) => {
                let text = o
                    .message_topic
                    .unwrap_or_else(|| "outbox.event.{type}".to_string());
                let topic = TopicTemplate::parse(&text).map_err(|reason| ConfigError::Invalid {
                    option: "message_topic",
                    value: text.clone(),
                    reason,
                })?;
                if let Some(c) = topic.columns().find(|c| *c != "type") {
                    return Err(ConfigError::Invalid {
                        option: "message_topic",
                        value: text.clone(),
                        reason: format!("message topics know only {{type}}, not {{{c}}}"),
                    });
                }
                Some(crate::pipeline::route::messages::MessageConfig { prefix, topic })
            }
        };
        if let Some(v) = o.protocol_version.filter(|v| !(1..=4).contains(v)) {
            return Err(ConfigError::Invalid {
                option: "protocol_version",
                value: v.to_string(),
                reason: "pgoutput knows protocol versions 1 to 4".into(),
            });
        }
        Ok(RelayConfig {
            database,
            kafka_brokers,
            publication: sql_name(
                "publication",
                o.publication.unwrap_or_else(|| "outbox_pub".into()),
            )?,
            slot: slot_name(o.slot.unwrap_or_else(|| "outbox_relay".into()))?,
            router,
            kafka_properties,
            max_inflight,
            max_inflight_bytes,
            protocol_version: o.protocol_version,
            messages,
            streaming: o.streaming.unwrap_or(false).then(|| StreamingConfig {
                memory_budget: o.stream_memory_budget.unwrap_or(64 << 20) as usize,
                spill_dir: o
                    .spill_dir
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join("outbox-relay-spill")),
            }),
            heartbeat_interval: o
                .heartbeat_interval
                .map(|v| seconds("heartbeat_interval", v))
                .transpose()?,
            status_interval: seconds("status_interval", o.status_interval.unwrap_or(10.0))?,
            shutdown_timeout: seconds("shutdown_timeout", o.shutdown_timeout.unwrap_or(30.0))?,
            replication_timeout: match o.replication_timeout.unwrap_or(60.0) {
                0.0 => None,
                v => Some(seconds("replication_timeout", v)?),
            },
            terminate_stale_walsender: o.terminate_stale_walsender.unwrap_or(false),
            reconnect_max_backoff: seconds(
                "reconnect_max_backoff",
                o.reconnect_max_backoff.unwrap_or(30.0),
            )?,
            http_address: match o.http_address.as_deref().map(str::trim) {
                Some("off") | Some("") => None,
                Some(a) => Some(a.parse().map_err(|_| ConfigError::Invalid {
                    option: "http_address",
                    value: a.to_string(),
                    reason: "expected host:port such as 0.0.0.0:9464, or `off`".into(),
                })?),
                None => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
            },
            error_policy,
            log_format: o.log_format.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests;
