//! Every option in its three spellings (flag, `OUTBOX_RELAY_*` variable,
//! TOML key), each optional so that the layers merge; the TOML file reader.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pipeline::policy::Policy;

use super::*;

/// Every option, each optional so that the layers can be merged. Field names
/// are the TOML keys. Its Debug shows nothing: the URL, the password and
/// Kafka properties may hold secrets.
#[derive(Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// PostgreSQL connection, as a libpq URL (postgres://user:pass@host:5432/db)
    /// or keyword string (host=… user=… dbname=…).
    #[arg(long, env = "OUTBOX_RELAY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Database password, overriding the URL's (prefer the environment
    /// variable or --database-password-file to the flag).
    #[arg(long, env = "OUTBOX_RELAY_DATABASE_PASSWORD", hide_env_values = true)]
    pub database_password: Option<String>,

    /// File holding the database password (one trailing newline is ignored).
    #[arg(long, env = "OUTBOX_RELAY_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,

    /// TLS to Postgres, as libpq's sslmode; overrides the URL's `sslmode`
    /// [default: prefer].
    #[arg(long, env = "OUTBOX_RELAY_SSL_MODE", value_enum)]
    pub ssl_mode: Option<crate::pg::tls::SslMode>,

    /// CA certificate(s) (PEM) for the server's certificate; overrides the
    /// URL's `sslrootcert`.
    #[arg(long, env = "OUTBOX_RELAY_SSL_ROOT_CERT")]
    pub ssl_root_cert: Option<PathBuf>,

    /// Client certificate (PEM) for `cert` authentication; overrides the
    /// URL's `sslcert`.
    #[arg(long, env = "OUTBOX_RELAY_SSL_CERT")]
    pub ssl_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM); overrides the URL's `sslkey`.
    #[arg(long, env = "OUTBOX_RELAY_SSL_KEY")]
    pub ssl_key: Option<PathBuf>,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Table shape whose defaults to use for every column and the topic.
    #[arg(long, env = "OUTBOX_RELAY_PRESET", value_enum)]
    pub preset: Option<Preset>,

    /// Outbox table, `table` or `schema.table` [default: from the preset].
    #[arg(long, env = "OUTBOX_RELAY_TABLE")]
    pub table: Option<String>,

    /// Publication over the outbox table [default: outbox_pub].
    #[arg(long, env = "OUTBOX_RELAY_PUBLICATION")]
    pub publication: Option<String>,

    /// Logical replication slot (pgoutput) [default: outbox_relay].
    #[arg(long, env = "OUTBOX_RELAY_SLOT")]
    pub slot: Option<String>,

    /// Topic, or a template over columns such as `outbox.event.{aggregatetype}`.
    #[arg(long, env = "OUTBOX_RELAY_TOPIC")]
    pub topic: Option<String>,

    /// Column whose value is the record key (the aggregate id).
    #[arg(long, env = "OUTBOX_RELAY_KEY_COLUMN")]
    pub key_column: Option<String>,

    /// `raw`: the key column's text as the key's bytes; `json-string`: that
    /// text as a JSON string, quotes included, as Kafka Connect's
    /// JsonConverter (schemas off) writes a string key, so keys, and the
    /// partitions they hash to, stay as they were with Debezium [default: raw].
    #[arg(long, env = "OUTBOX_RELAY_KEY_FORMAT", value_enum)]
    pub key_format: Option<crate::pipeline::route::config::KeyFormat>,

    /// Column holding the event id; sent as the `id` header.
    #[arg(long, env = "OUTBOX_RELAY_ID_COLUMN")]
    pub id_column: Option<String>,

    /// Column whose value (as stored) is the record value.
    #[arg(long, env = "OUTBOX_RELAY_PAYLOAD_COLUMN")]
    pub payload_column: Option<String>,

    /// Columns sent as headers, comma-separated `column` or `column:header-name`.
    #[arg(long, env = "OUTBOX_RELAY_HEADER_COLUMNS", value_delimiter = ',')]
    pub header_columns: Option<Vec<String>>,

    /// librdkafka producer property KEY=VALUE, passed as is (repeatable; `;`
    /// separates several in one value, `\;` is a `;` inside a value).
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_PROPERTY")]
    pub kafka_property: Option<Vec<String>>,

    /// Most events handed to the producer and not yet acknowledged; reading
    /// the WAL pauses at this limit [default: 5000].
    #[arg(long, env = "OUTBOX_RELAY_MAX_INFLIGHT")]
    pub max_inflight: Option<u64>,

    /// Publish logical decoding messages whose prefix starts with this, as
    /// events without an outbox row: pg_logical_emit_message(true,
    /// 'PREFIX' || 'TYPE:KEY', payload) [default: off].
    #[arg(long, env = "OUTBOX_RELAY_MESSAGE_PREFIX")]
    pub message_prefix: Option<String>,

    /// Topic for message events; `{type}` is the TYPE from the prefix
    /// [default: outbox.event.{type}].
    #[arg(long, env = "OUTBOX_RELAY_MESSAGE_TOPIC")]
    pub message_topic: Option<String>,

    /// Have the server stream large transactions before they commit
    /// (pgoutput `streaming`, PostgreSQL 14+). They are buffered here, within
    /// --stream-memory-budget and spilled to --spill-dir beyond it, and
    /// published only at commit [default: off].
    #[arg(long, env = "OUTBOX_RELAY_STREAMING", num_args = 0..=1, default_missing_value = "true")]
    pub streaming: Option<bool>,

    /// Bytes of streamed, uncommitted changes kept in memory [default: 64 MiB].
    #[arg(long, env = "OUTBOX_RELAY_STREAM_MEMORY_BUDGET")]
    pub stream_memory_budget: Option<u64>,

    /// Directory for spilled streamed changes [default: the system temp dir].
    #[arg(long, env = "OUTBOX_RELAY_SPILL_DIR")]
    pub spill_dir: Option<std::path::PathBuf>,

    /// Seconds between heartbeat messages written to the relay's database
    /// (pg_logical_emit_message), so the slot advances even when the
    /// database sees no writes for a long time [default: off].
    #[arg(long, env = "OUTBOX_RELAY_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<f64>,

    /// Most payload and key bytes in flight; reading pauses at this limit
    /// [default: 16 MiB].
    #[arg(long, env = "OUTBOX_RELAY_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<u64>,

    /// pgoutput protocol version (1-4) [default: the newest the server
    /// supports: 1 before PostgreSQL 14, 2 on 14, 3 on 15, 4 from 16].
    #[arg(long, env = "OUTBOX_RELAY_PROTOCOL_VERSION")]
    pub protocol_version: Option<u32>,

    /// Seconds between standby status updates; capped at half the server's
    /// wal_sender_timeout [default: 10].
    #[arg(long, env = "OUTBOX_RELAY_STATUS_INTERVAL")]
    pub status_interval: Option<f64>,

    /// Seconds a graceful shutdown waits for in-flight deliveries [default: 30].
    #[arg(long, env = "OUTBOX_RELAY_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<f64>,

    /// Seconds without any message from the server (data or keepalive) after
    /// which the replication connection counts as dead and is replaced, as
    /// Postgres's own wal_receiver_timeout; the relay asks the server for a
    /// keepalive after half of it. Also bounds each query of the session's
    /// set-up. 0 turns it off [default: 60].
    #[arg(long, env = "OUTBOX_RELAY_REPLICATION_TIMEOUT")]
    pub replication_timeout: Option<f64>,

    /// When the slot is held, terminate the holding walsender if its client
    /// sent nothing for twice the status interval (at least 5 s): a crashed
    /// relay's lingering connection. A holder that reports is left alone, so
    /// two relays never end each other's. Without it the relay waits as a
    /// standby.
    #[arg(long, env = "OUTBOX_RELAY_TERMINATE_STALE_WALSENDER", num_args = 0..=1, default_missing_value = "true")]
    pub terminate_stale_walsender: Option<bool>,

    /// When the slot is missing, invalidated, or left by an unfinished
    /// `recover`: recover it (`outbox-relay recover`: a new slot, and the
    /// events Kafka lacks published from the outbox table) and stream on,
    /// instead of stopping. Needs a progress topic to bound what it reads.
    #[arg(long, env = "OUTBOX_RELAY_RECOVER_SLOT", num_args = 0..=1, default_missing_value = "true")]
    pub recover_slot: Option<bool>,

    /// `--recover-slot`: the column that grows with commit order, which the
    /// rows are compared from and published in [default: id].
    #[arg(long, env = "OUTBOX_RELAY_RECOVER_ORDER_COLUMN")]
    pub recover_order_column: Option<String>,

    /// Longest wait, in seconds, between reconnection attempts after a lost
    /// connection [default: 30].
    #[arg(long, env = "OUTBOX_RELAY_RECONNECT_MAX_BACKOFF")]
    pub reconnect_max_backoff: Option<f64>,

    /// `at-least-once`: a crash may publish an event again, with the same id.
    /// `exactly-once`: one Kafka transaction per Postgres transaction (or
    /// several whole ones), with the position kept in --progress-topic, so
    /// a read_committed consumer sees each event once [default: at-least-once].
    #[arg(long, env = "OUTBOX_RELAY_DELIVERY", value_enum)]
    pub delivery: Option<Delivery>,

    /// With exactly-once: the producer's transactional.id [default:
    /// outbox-relay-<system identifier>-<slot>].
    #[arg(long, env = "OUTBOX_RELAY_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// The compacted topic where the relay records every position before it
    /// confirms it to the slot (so a relay that finds the slot moved can
    /// tell another relay of ours from a manual advance) and, with
    /// exactly-once, the last transaction Kafka holds; created if missing.
    /// `off` (at-least-once only): no record, and a slot found moved stops
    /// the relay [default: outbox-relay.progress].
    #[arg(long, env = "OUTBOX_RELAY_PROGRESS_TOPIC")]
    pub progress_topic: Option<String>,

    /// With exactly-once: seconds a Kafka transaction may collect whole
    /// Postgres transactions before it commits [default: 0.1].
    #[arg(long, env = "OUTBOX_RELAY_TRANSACTION_MAX_DURATION")]
    pub transaction_max_duration: Option<f64>,

    /// What to do with an event that cannot be published as configured:
    /// `halt` (stop; the slot stays before it) or `dead-letter` [default: halt].
    #[arg(long, env = "OUTBOX_RELAY_ON_ERROR", value_enum)]
    pub on_error: Option<Policy>,

    /// Per-kind policy KIND=POLICY (repeatable; kinds: key, event-id, topic,
    /// too-large, payload-json, topic-missing, authorization, table-shape).
    #[arg(long, env = "OUTBOX_RELAY_ON_ERROR_OVERRIDE", value_delimiter = ',')]
    pub on_error_override: Option<Vec<String>>,

    /// Topic for dead-lettered events [default: outbox.dead-letter].
    #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// `json` refuses payloads that are not valid JSON (checked for text
    /// columns; json/jsonb are valid by construction), `any` sends them as
    /// stored [default: any].
    #[arg(long, env = "OUTBOX_RELAY_PAYLOAD_FORMAT", value_enum)]
    pub payload_format: Option<PayloadFormat>,

    /// Column whose value labels events in metrics and logs [default: from
    /// the preset; `none` for no label].
    #[arg(long, env = "OUTBOX_RELAY_EVENT_TYPE_COLUMN")]
    pub event_type_column: Option<String>,

    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz), or `off`
    /// [default: 127.0.0.1:9464; use 0.0.0.0:9464 in a container].
    #[arg(long, env = "OUTBOX_RELAY_HTTP_ADDRESS")]
    pub http_address: Option<String>,

    /// Log format [default: text].
    #[arg(long, env = "OUTBOX_RELAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Several outbox tables: `[[tables]]` sections of the --config file,
    /// each with its own mapping. There is no flag: the one-table flags
    /// above describe a single table; with sections, `--table` picks one of
    /// them for the commands that work on one table.
    #[arg(skip)]
    pub tables: Option<Vec<TableOptions>>,
}

macro_rules! merge_fields {
    ($hi:ident, $lo:ident, $($f:ident),*) => {
        Options { $($f: $hi.$f.or($lo.$f)),* }
    };
}

impl Options {
    /// Fills every option not set here from `lower`.
    pub fn or(self, lower: Options) -> Options {
        let hi = self;
        let lo = lower;
        merge_fields!(
            hi,
            lo,
            database_url,
            database_password,
            database_password_file,
            ssl_mode,
            ssl_root_cert,
            ssl_cert,
            ssl_key,
            kafka_brokers,
            preset,
            table,
            publication,
            slot,
            topic,
            key_column,
            key_format,
            id_column,
            payload_column,
            header_columns,
            kafka_property,
            max_inflight,
            max_inflight_bytes,
            protocol_version,
            message_prefix,
            message_topic,
            heartbeat_interval,
            streaming,
            stream_memory_budget,
            spill_dir,
            status_interval,
            shutdown_timeout,
            replication_timeout,
            terminate_stale_walsender,
            recover_slot,
            recover_order_column,
            reconnect_max_backoff,
            event_type_column,
            http_address,
            delivery,
            transactional_id,
            progress_topic,
            transaction_max_duration,
            on_error,
            on_error_override,
            dead_letter_topic,
            payload_format,
            log_format,
            tables
        )
    }

    /// Reads a TOML file of options.
    pub fn from_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// One `[[tables]]` section: an outbox table and how its rows become
/// records, with the same keys (and meanings) as the one-table options.
/// Unset keys come from the section's `preset` (classic by default), never
/// from another section or the top level.
#[derive(Clone, Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TableOptions {
    pub table: Option<String>,
    pub preset: Option<Preset>,
    pub topic: Option<String>,
    pub key_column: Option<String>,
    pub key_format: Option<crate::pipeline::route::config::KeyFormat>,
    pub id_column: Option<String>,
    pub payload_column: Option<String>,
    pub header_columns: Option<Vec<String>>,
    pub event_type_column: Option<String>,
    pub payload_format: Option<PayloadFormat>,
}

impl Options {
    /// The one-table mapping options, taken out as a section.
    pub(super) fn take_table_options(&mut self) -> TableOptions {
        TableOptions {
            table: self.table.take(),
            preset: self.preset.take(),
            topic: self.topic.take(),
            key_column: self.key_column.take(),
            key_format: self.key_format.take(),
            id_column: self.id_column.take(),
            payload_column: self.payload_column.take(),
            header_columns: self.header_columns.take(),
            event_type_column: self.event_type_column.take(),
            payload_format: self.payload_format.take(),
        }
    }
}

impl TableOptions {
    /// The keys set here, by their option names.
    pub(super) fn set_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut note = |set: bool, k: &'static str| {
            if set {
                keys.push(k)
            }
        };
        note(self.table.is_some(), "table");
        note(self.preset.is_some(), "preset");
        note(self.topic.is_some(), "topic");
        note(self.key_column.is_some(), "key_column");
        note(self.key_format.is_some(), "key_format");
        note(self.id_column.is_some(), "id_column");
        note(self.payload_column.is_some(), "payload_column");
        note(self.header_columns.is_some(), "header_columns");
        note(self.event_type_column.is_some(), "event_type_column");
        note(self.payload_format.is_some(), "payload_format");
        keys
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").finish_non_exhaustive()
    }
}
