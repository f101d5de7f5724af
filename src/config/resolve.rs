//! From merged [`Options`] to a validated [`RelayConfig`]: defaults applied,
//! every value checked, one function per part of the configuration. Reads
//! only `PGPASSWORD` from the environment (clap and the file did the rest);
//! touches no server.

use crate::pg::config::{DatabaseConfig, Overrides};
use crate::pipeline::policy::{ErrorKind, ErrorPolicy, Policy};
use crate::pipeline::route::messages::MessageConfig;
use crate::pipeline::route::router::{
    validate_topic, HeaderColumn, RouterConfig, TableName, TopicTemplate,
};

use super::options::TableOptions;
use super::{
    kafka_properties, seconds, slot_name, sql_name, ConfigError, Delivery, ExactlyOnceConfig,
    Options, PayloadFormat, Preset, RelayConfig, StreamingConfig,
};

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

    fn resolve_with(mut o: Options, need_kafka: bool) -> Result<RelayConfig, ConfigError> {
        let database = database(&mut o)?;
        let kafka_brokers = o.kafka_brokers.take().unwrap_or_default();
        if need_kafka && kafka_brokers.trim().is_empty() {
            return Err(ConfigError::Missing {
                option: "kafka_brokers",
            });
        }
        let (tables, table_picked) = tables(&mut o)?;
        let error_policy = error_policy(&mut o)?;
        let kafka_properties = kafka_properties(o.kafka_property.take().unwrap_or_default())?;
        // Enough to keep a local broker busy (a 1M-event backlog drained as
        // fast with 5000 as with 10000 in the benchmark), small enough that
        // the relay stays within ~25 MB; raise both for a distant broker:
        // the window must cover throughput × round trip.
        let max_inflight = at_least_one("max_inflight", o.max_inflight.unwrap_or(5_000))?;
        let max_inflight_bytes = at_least_one(
            "max_inflight_bytes",
            o.max_inflight_bytes.unwrap_or(16 << 20),
        )?;
        let messages = messages(&mut o)?;
        let exactly_once = exactly_once(&mut o, &error_policy, &kafka_properties)?;
        let progress_topic = progress_topic(&mut o, exactly_once.is_some())?;
        check_protocol_version(o.protocol_version)?;
        Ok(RelayConfig {
            database,
            kafka_brokers,
            publication: sql_name(
                "publication",
                o.publication.take().unwrap_or_else(|| "outbox_pub".into()),
            )?,
            slot: slot_name(o.slot.take().unwrap_or_else(|| "outbox_relay".into()))?,
            tables,
            table_picked,
            kafka_properties,
            max_inflight,
            max_inflight_bytes,
            protocol_version: o.protocol_version,
            messages,
            streaming: streaming(&o),
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
            recover_slot: recover_slot(&o),
            reconnect_max_backoff: seconds(
                "reconnect_max_backoff",
                o.reconnect_max_backoff.unwrap_or(30.0),
            )?,
            http_address: http_address(o.http_address.as_deref())?,
            error_policy,
            exactly_once,
            progress_topic,
            log_format: o.log_format.unwrap_or_default(),
        })
    }
}

fn check_protocol_version(v: Option<u32>) -> Result<(), ConfigError> {
    match v.filter(|v| !(1..=4).contains(v)) {
        Some(v) => Err(ConfigError::Invalid {
            option: "protocol_version",
            value: v.to_string(),
            reason: "pgoutput knows protocol versions 1 to 4".into(),
        }),
        None => Ok(()),
    }
}

fn streaming(o: &Options) -> Option<StreamingConfig> {
    o.streaming.unwrap_or(false).then(|| StreamingConfig {
        memory_budget: o.stream_memory_budget.unwrap_or(64 << 20) as usize,
        spill_dir: o
            .spill_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("outbox-relay-spill")),
    })
}

/// `run --recover-slot`: a lost slot is recovered, but only on a slot a
/// relay ran on before.
fn recover_slot(o: &Options) -> Option<crate::pipeline::recover::settings::RecoverSettings> {
    o.recover_slot
        .unwrap_or(false)
        .then(|| crate::pipeline::recover::settings::RecoverSettings {
            order_column: o
                .recover_order_column
                .clone()
                .unwrap_or_else(|| "id".into()),
            only_after_a_relay: true,
            ..Default::default()
        })
}

fn database(o: &mut Options) -> Result<DatabaseConfig, ConfigError> {
    let url = o.database_url.take().ok_or(ConfigError::Missing {
        option: "database_url",
    })?;
    let overrides = Overrides {
        ssl_mode: o.ssl_mode.take(),
        ssl_root_cert: o.ssl_root_cert.take(),
        ssl_cert: o.ssl_cert.take(),
        ssl_key: o.ssl_key.take(),
        password: o.database_password.take(),
        password_file: o.database_password_file.take(),
        pgpassword: std::env::var("PGPASSWORD").ok(),
    };
    let database = DatabaseConfig::resolve(&url, overrides).map_err(|(option, reason)| {
        ConfigError::Invalid {
            option,
            // Never echo the URL or a password.
            value: "<redacted>".into(),
            reason,
        }
    })?;
    if database.get_user().is_none() {
        return Err(ConfigError::Invalid {
            option: "database_url",
            value: "<redacted>".into(),
            reason: "it names no user".into(),
        });
    }
    Ok(database)
}

/// The outbox tables: the one-table options, or the `[[tables]]` sections
/// of the file. With sections, `--table` (or `table` at the top level) picks
/// one of them; the other one-table options are refused, since it would be
/// a guess which section they were meant for. Returns whether a section was
/// picked.
fn tables(o: &mut Options) -> Result<(Vec<RouterConfig>, bool), ConfigError> {
    let one = o.take_table_options();
    let Some(sections) = o.tables.take() else {
        return Ok((vec![router(one, None)?], false));
    };
    if sections.is_empty() {
        return Err(ConfigError::Invalid {
            option: "tables",
            value: "[]".into(),
            reason: "give at least one [[tables]] section, or none and the one-table options"
                .into(),
        });
    }
    if let Some(key) = one.set_keys().into_iter().find(|k| *k != "table") {
        return Err(ConfigError::Invalid {
            option: key,
            value: "(set)".into(),
            reason: format!(
                "the config file has [[tables]] sections, and {key} applies to one table: set it inside the section it belongs to (and unset --{} / OUTBOX_RELAY_{})",
                key.replace('_', "-"),
                key.to_uppercase()
            ),
        });
    }
    let tables = sections_routed(sections)?;
    match one.table {
        None => Ok((tables, false)),
        Some(pick) => Ok((vec![picked(tables, pick)?], true)),
    }
}

/// Each `[[tables]]` section's mapping, refusing sections that name the same
/// table or that an earlier pattern section would shadow.
fn sections_routed(sections: Vec<TableOptions>) -> Result<Vec<RouterConfig>, ConfigError> {
    let mut tables: Vec<RouterConfig> = Vec::with_capacity(sections.len());
    for (i, section) in sections.into_iter().enumerate() {
        let Some(name) = section.table.clone() else {
            return Err(ConfigError::Invalid {
                option: "tables",
                value: format!("section {}", i + 1),
                reason: "every [[tables]] section needs `table = \"schema.table\"`".into(),
            });
        };
        let r = router(section, Some(&name))?;
        // The first section that matches a table routes it: a later one
        // that an earlier pattern already matches would never be used.
        if let Some(earlier) = tables.iter().find(|t| {
            t.table.is_pattern()
                && !r.table.is_pattern()
                && t.table.matches(&r.table.schema, &r.table.name)
        }) {
            return Err(ConfigError::Invalid {
                option: "tables",
                value: r.table.to_string(),
                reason: format!(
                    "the earlier section {} already matches this table, and the first section that matches a table routes it: move this section before that one",
                    earlier.table
                ),
            });
        }
        if tables.iter().any(|t| t.table == r.table) {
            return Err(ConfigError::Invalid {
                option: "tables",
                value: r.table.to_string(),
                reason: "two [[tables]] sections name this table: merge them".into(),
            });
        }
        tables.push(r);
    }
    Ok(tables)
}

/// The section `--table` picks. A table a pattern section stands for is
/// picked with that section's mapping (`--table tenant_a.outbox` of
/// `tenant_*.outbox`).
fn picked(tables: Vec<RouterConfig>, pick: String) -> Result<RouterConfig, ConfigError> {
    let wanted = TableName::parse(&pick).map_err(|reason| ConfigError::Invalid {
        option: "table",
        value: pick.clone(),
        reason,
    })?;
    let picked = tables
        .into_iter()
        .find(|t| t.table == wanted || t.table.matches(&wanted.schema, &wanted.name));
    match picked {
        Some(t) => Ok(RouterConfig {
            table: wanted,
            ..t
        }),
        None => Err(ConfigError::Invalid {
            option: "table",
            value: pick,
            reason: "with [[tables]] sections, --table picks one of them, and no section names this table".into(),
        }),
    }
}

/// One table's mapping: its options over its preset's defaults. `section`
/// names the [[tables]] section in errors.
fn router(t: TableOptions, section: Option<&str>) -> Result<RouterConfig, ConfigError> {
    let invalid = |option: &'static str, value: String, reason: String| ConfigError::Invalid {
        option,
        value,
        reason: match section {
            Some(s) => format!("{reason} (in the [[tables]] section of {s})"),
            None => reason,
        },
    };
    let preset = t.preset.unwrap_or(Preset::Classic).defaults();
    let table_text = t.table.unwrap_or_else(|| preset.table.to_string());
    let table = TableName::parse(&table_text)
        .map_err(|reason| invalid("table", table_text.clone(), reason))?;
    let topic_text = t.topic.unwrap_or_else(|| preset.topic.to_string());
    let topic = TopicTemplate::parse(&topic_text)
        .map_err(|reason| invalid("topic", topic_text.clone(), reason))?;
    let headers = match t.header_columns {
        Some(list) => list
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                HeaderColumn::parse(s)
                    .map_err(|reason| invalid("header_columns", s.clone(), reason))
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
        sql_name(option, v).map_err(|e| match e {
            ConfigError::Invalid {
                option,
                value,
                reason,
            } => invalid(option, value, reason),
            other => other,
        })
    };
    Ok(RouterConfig {
        table,
        id_column: column("id_column", t.id_column, preset.id)?,
        key_column: column("key_column", t.key_column, preset.key)?,
        key_format: t.key_format.unwrap_or_default(),
        payload_column: column("payload_column", t.payload_column, preset.payload)?,
        topic,
        headers,
        event_type_column: match t.event_type_column {
            Some(c) if c.eq_ignore_ascii_case("none") => None,
            Some(c) => Some(column("event_type_column", Some(c), "")?),
            None => Some(preset.event_type.to_string()),
        },
        require_json: t.payload_format == Some(PayloadFormat::Json),
    })
}

fn error_policy(o: &mut Options) -> Result<ErrorPolicy, ConfigError> {
    let mut error_policy = ErrorPolicy {
        default: o.on_error.unwrap_or_default(),
        overrides: Default::default(),
        dead_letter_topic: o
            .dead_letter_topic
            .take()
            .unwrap_or_else(|| "outbox.dead-letter".to_string()),
    };
    if let Err(reason) = validate_topic(&error_policy.dead_letter_topic) {
        return Err(ConfigError::Invalid {
            option: "dead_letter_topic",
            value: error_policy.dead_letter_topic,
            reason,
        });
    }
    for o in o.on_error_override.take().unwrap_or_default() {
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
    Ok(error_policy)
}

fn at_least_one(option: &'static str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            option,
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(v)
}

/// Logical decoding messages as events: only with a prefix to match.
fn messages(o: &mut Options) -> Result<Option<MessageConfig>, ConfigError> {
    let Some(prefix) = o.message_prefix.take() else {
        return Ok(None);
    };
    let text = o
        .message_topic
        .take()
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
    Ok(Some(MessageConfig { prefix, topic }))
}

fn http_address(v: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    Ok(match v.map(str::trim) {
        Some("off") | Some("") => None,
        Some(a) => Some(a.parse().map_err(|_| ConfigError::Invalid {
            option: "http_address",
            value: a.to_string(),
            reason: "expected host:port such as 0.0.0.0:9464, or `off`".into(),
        })?),
        None => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
    })
}

/// `--delivery exactly-once`: its transactional.id and time bounds, and
/// the one kind it cannot dead-letter.
fn exactly_once(
    o: &mut Options,
    policy: &ErrorPolicy,
    kafka_properties: &[(String, String)],
) -> Result<Option<ExactlyOnceConfig>, ConfigError> {
    if o.delivery.unwrap_or_default() != Delivery::ExactlyOnce {
        return Ok(None);
    }
    // A transactional producer registers each partition with the
    // transaction before it writes there: a topic it may not write to fails
    // that registration, and with it the whole transaction, and librdkafka
    // need not tie the failure to a record (it may report them all purged).
    if policy.for_kind(ErrorKind::Authorization) == Policy::DeadLetter {
        return Err(ConfigError::Invalid {
            option: "on_error_override",
            value: "authorization=dead-letter".into(),
            reason: "with --delivery exactly-once a topic the relay may not write to fails the whole Kafka transaction when its partition is registered, and the failure need not name a record to dead-letter: use halt for authorization (with --on-error dead-letter, add --on-error-override authorization=halt); the relay then stops naming the kind, and the fix is to grant it Write on its topics".into(),
        });
    }
    let transactional_id = o.transactional_id.take().filter(|t| !t.trim().is_empty());
    let timeout_ms = match kafka_properties
        .iter()
        .rev()
        .find(|(k, _)| k == "transaction.timeout.ms")
    {
        Some((_, v)) => v.trim().parse().map_err(|_| ConfigError::Invalid {
            option: "kafka_property",
            value: format!("transaction.timeout.ms={v}"),
            reason: "expected a whole number of milliseconds".into(),
        })?,
        None => 60_000,
    };
    let transaction_timeout = std::time::Duration::from_millis(timeout_ms);
    let max_duration = seconds(
        "transaction_max_duration",
        o.transaction_max_duration.unwrap_or(0.1),
    )?;
    // The batch must commit well within the timeout, commit time included.
    if max_duration * 4 > transaction_timeout {
        return Err(ConfigError::Invalid {
            option: "transaction_max_duration",
            value: format!("{}", max_duration.as_secs_f64()),
            reason: format!(
                "must be at most a quarter of transaction.timeout.ms ({} ms)",
                timeout_ms
            ),
        });
    }
    Ok(Some(ExactlyOnceConfig {
        transactional_id,
        max_duration,
        transaction_timeout,
    }))
}

/// The progress topic, or None with `off` (at-least-once only: exactly-once
/// keeps its position there).
fn progress_topic(o: &mut Options, exactly_once: bool) -> Result<Option<String>, ConfigError> {
    let topic = o
        .progress_topic
        .take()
        .unwrap_or_else(|| "outbox-relay.progress".to_string());
    if topic.trim().eq_ignore_ascii_case("off") {
        if exactly_once {
            return Err(ConfigError::Invalid {
                option: "progress_topic",
                value: topic,
                reason:
                    "--delivery exactly-once keeps its position in the progress topic: name one"
                        .into(),
            });
        }
        return Ok(None);
    }
    if let Err(reason) = validate_topic(&topic) {
        return Err(ConfigError::Invalid {
            option: "progress_topic",
            value: topic,
            reason,
        });
    }
    Ok(Some(topic))
}
