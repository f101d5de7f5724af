//! The settings a relay's pipeline runs on, defined beside it: `config`
//! reads flags, the environment and the TOML file into them (and checks
//! them); the pipeline never looks at where a value came from.

use std::path::PathBuf;
use std::time::Duration;

use crate::observe::LogFormat;
use crate::pipeline::policy::ErrorPolicy;
use crate::pipeline::route::router::RouterConfig;

/// `--delivery exactly-once`: where the position is kept and how Kafka
/// transactions are cut.
#[derive(Debug, Clone)]
pub struct ExactlyOnceConfig {
    /// None: derived from the system identifier and the slot.
    pub transactional_id: Option<String>,
    /// How long a Kafka transaction may collect whole Postgres transactions.
    pub max_duration: Duration,
    /// The producer's transaction.timeout.ms (librdkafka's default 60 s):
    /// the coordinator aborts a transaction open longer.
    pub transaction_timeout: Duration,
}

impl ExactlyOnceConfig {
    /// The transactional.id: the operator's, or one per database and slot,
    /// so that a second relay on the same slot (or a `recover` of it)
    /// fences the first.
    pub fn transactional_id(&self, system_id: &str, slot: &str) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("outbox-relay-{system_id}-{slot}"))
    }
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
    /// The outbox tables, at least one, each with its mapping (one-table
    /// options, or the file's `[[tables]]` sections).
    pub tables: Vec<RouterConfig>,
    /// `--table` picked one of several `[[tables]]` sections: fine for the
    /// commands that look at one table, refused by `run`, which would leave
    /// the other tables' rows unpublished.
    pub table_picked: bool,
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
    /// Some with `--recover-slot`: how a lost slot is recovered by `run`.
    pub recover_slot: Option<crate::pipeline::recover::settings::RecoverSettings>,
    pub reconnect_max_backoff: Duration,
    /// None when the HTTP endpoint is off.
    pub http_address: Option<std::net::SocketAddr>,
    pub error_policy: ErrorPolicy,
    /// Some with `--delivery exactly-once`.
    pub exactly_once: Option<ExactlyOnceConfig>,
    /// Where every position the relay confirms is recorded first (and, with
    /// exactly-once, what Kafka holds); None with `--progress-topic off`.
    pub progress_topic: Option<String>,
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
            .field(
                "tables",
                &self
                    .tables
                    .iter()
                    .map(|t| format!("{} -> {}", t.table, t.topic))
                    .collect::<Vec<_>>(),
            )
            .field("kafka_properties (values not shown)", &property_names)
            .finish_non_exhaustive()
    }
}

impl RelayConfig {
    /// More than one table (several sections, or a schema pattern): the
    /// commands that look at tables go through them one by one.
    pub fn several_tables(&self) -> bool {
        self.tables.len() > 1 || !self.patterns().is_empty()
    }

    /// The sections' schema patterns (`tenant_*.outbox`), in order.
    pub fn patterns(&self) -> Vec<&crate::pipeline::route::router::TableName> {
        self.tables
            .iter()
            .map(|t| &t.table)
            .filter(|t| t.is_pattern())
            .collect()
    }

    /// The tables' names, comma-separated, for messages and logs.
    pub fn table_names(&self) -> String {
        self.tables
            .iter()
            .map(|t| t.table.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// For a command whose slot serves every table (backfill, recover): a
    /// `--table` pick refused, the message ending in `but` and the
    /// command's own reason and fix.
    pub fn refuse_picked(&self, but: &str) -> Result<(), String> {
        if !self.table_picked {
            return Ok(());
        }
        Err(format!(
            "--table {} picks one of the config file's [[tables]] sections, but {but}",
            self.table_names()
        ))
    }
}
