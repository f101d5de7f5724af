//! `outbox-relay verify`: checks what reached Kafka against the outbox table.
//!
//! It reads every row of the outbox (over an ordinary SQL connection) and
//! every record of the routed topics (an rdkafka `BaseConsumer` assigned to
//! each partition from its low watermark up to the high watermark captured at
//! the start; no consumer group, nothing committed), matches them by event id
//! (the `id` header) and reports:
//!
//! - **missing** events: in the table, not in Kafka (and rows the relay could
//!   never publish: NULL id or key, a topic template it cannot fill);
//! - **unexpected** records: an `id` header the table does not hold (expected
//!   when rows are deleted after publishing; never a failure by itself);
//! - **duplicates**: for each, whether its copies are identical (a
//!   redelivery, which at-least-once allows) or differ;
//! - **order violations**: within a partition, for each key, the first copy of
//!   each event must follow the order of the ordering column (by default the
//!   table's integer primary key), or of a header (`--order-header`);
//! - **keys spread over several partitions** of a topic;
//! - **mismatches**: topic, key, payload bytes or a header column differing
//!   from what the row says.
//!
//! The table is read before the watermarks are captured, so with a running
//! relay an event committed just before the check may still be in flight and
//! show as missing: verify once the relay has caught up.

use std::path::Path;
use std::time::Duration;

use crate::config::{Options, RelayConfig};
use crate::pipeline::route::router::RouterConfig;

mod compare;
mod outbox;
mod report;
#[cfg(test)]
mod tests;

pub use crate::pipeline::sink::read_back::{
    read_topics, KafkaRecord, ReadBackError, Snapshot, TopicSelection,
};
pub use compare::compare;
pub use outbox::*;
pub use report::*;

/// `outbox-relay verify`: the relay's own options plus the checker's.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub options: Options,

    /// Column giving the order of one aggregate's events (compared with SQL's
    /// ORDER BY) [default: the table's single-column integer primary key;
    /// without one, order is not checked].
    #[arg(long)]
    pub order_column: Option<String>,

    /// Check order by this record header instead of a column (integers compare
    /// numerically, other values as text). For tables emptied by
    /// delete-after-insert.
    #[arg(long, conflicts_with = "order_column")]
    pub order_header: Option<String>,

    /// Examples listed per kind of problem.
    #[arg(long, default_value_t = 10)]
    pub max_examples: usize,

    /// Print the report as JSON (with "ok" and "failures") instead of text.
    #[arg(long)]
    pub json: bool,

    /// Exit 1 on duplicates too (by default they are reported but allowed:
    /// delivery is at least once).
    #[arg(long)]
    pub fail_on_duplicates: bool,

    /// Seconds allowed for reading the topics up to their high watermarks.
    #[arg(long, default_value_t = 60.0)]
    pub read_timeout: f64,
}

/// Where the expected order of one aggregate's events comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderBy {
    /// The table's single-column integer primary key, if it has one.
    Default,
    Column(String),
    Header(String),
}

#[derive(Debug, Clone)]
pub struct VerifySettings {
    pub order: OrderBy,
    pub max_examples: usize,
    pub read_timeout: Duration,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            order: OrderBy::Default,
            max_examples: 10,
            read_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("outbox table {0} does not exist (or is not visible to this user)")]
    NoTable(String),
    /// The table lacks a configured column: the relay's own error for it.
    #[error(transparent)]
    Columns(#[from] crate::pipeline::route::router::RouteError),
    #[error(transparent)]
    ReadBack(#[from] ReadBackError),
    #[error("the Kafka reader task failed: {0}")]
    Task(String),
}

/// Runs the whole check: the table first, then the topics up to the high
/// watermarks taken after it.
pub async fn verify(cfg: &RelayConfig, settings: &VerifySettings) -> Result<Report, VerifyError> {
    let mapping = cfg
        .single_table("verify")
        .map_err(|e| VerifyError::Config(e.to_string()))?;
    verify_table(cfg, mapping, settings).await
}

/// Checks every table of the configuration, a schema pattern's as they
/// exist now: one report per table, each against its own topics.
pub async fn verify_all(
    cfg: &RelayConfig,
    settings: &VerifySettings,
) -> Result<Vec<Report>, VerifyError> {
    let (client, conn) = crate::pg::sql::connect(&cfg.database).await?;
    let tables = crate::pipeline::tables::expand(&client, &cfg.tables).await;
    drop(client);
    let _ = conn.await;
    let tables =
        tables.map_err(|e| crate::pg::sql::sql("finding the tables of the schema patterns")(e))?;
    let mut reports = Vec::with_capacity(tables.len());
    for t in &tables {
        reports.push(verify_table(cfg, t, settings).await?);
    }
    Ok(reports)
}

/// The check of one table (`mapping`, a concrete table).
async fn verify_table(
    cfg: &RelayConfig,
    mapping: &RouterConfig,
    settings: &VerifySettings,
) -> Result<Report, VerifyError> {
    let (client, conn) = crate::pg::sql::connect(&cfg.database).await?;
    let outbox = read_outbox(&client, mapping, &settings.order).await;
    drop(client);
    let _ = conn.await;
    let outbox = outbox?;

    let template = &mapping.topic;
    let selection = match template.fixed() {
        Some(t) => TopicSelection::Names([t.to_string()].into()),
        None if outbox.rows.is_empty() => TopicSelection::Matching(template.clone()),
        None => TopicSelection::Names(
            outbox
                .rows
                .iter()
                .filter_map(|r| r.topic.as_ref().ok().cloned())
                .collect(),
        ),
    };
    let brokers = cfg.kafka_brokers.clone();
    let props = cfg.kafka_properties.clone();
    let timeout = settings.read_timeout;
    let snapshot = tokio::task::spawn_blocking(move || {
        read_topics(&brokers, &props, &selection, None, timeout)
    })
    .await
    .map_err(|e| VerifyError::Task(e.to_string()))??;
    let mut report = compare(&outbox, &snapshot, &settings.order, settings.max_examples);
    if outbox.rows.is_empty() && template.fixed().is_none() {
        report.notes.push(format!(
            "topics chosen by matching the broker's topic names against {template}"
        ));
    }
    Ok(report)
}

const VERIFY: super::Entry = super::Entry::new("verify", super::Kafka::Required);

/// The `verify` subcommand: prints the report; returns the exit code (0 all
/// good, 1 loss/order/mismatch (or duplicates with --fail-on-duplicates), 2
/// the check could not be made).
pub async fn command(config: Option<&Path>, args: VerifyArgs) -> u8 {
    VERIFY
        .with_config(config, args.options.clone(), |cfg| async move {
            let Some(read_timeout) = Duration::try_from_secs_f64(args.read_timeout)
                .ok()
                .filter(|d| !d.is_zero())
            else {
                return VERIFY.fail("--read-timeout must be a positive number of seconds", 2);
            };
            let settings = VerifySettings {
                order: match (args.order_column.clone(), args.order_header.clone()) {
                    (Some(c), _) => OrderBy::Column(c),
                    (None, Some(h)) => OrderBy::Header(h),
                    (None, None) => OrderBy::Default,
                },
                max_examples: args.max_examples,
                read_timeout,
            };
            if cfg.several_tables() {
                return match verify_all(&cfg, &settings).await {
                    Ok(reports) => print_all(&reports, &args),
                    Err(e) => VERIFY.fail(e, 2),
                };
            }
            match verify(&cfg, &settings).await {
                Ok(report) => {
                    if args.json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report.to_json(args.fail_on_duplicates))
                                .unwrap_or_default()
                        );
                    } else {
                        println!("{report}");
                        if args.fail_on_duplicates && report.duplicates.events > 0 {
                            println!("FAILED: duplicates (--fail-on-duplicates)");
                        }
                    }
                    u8::from(!report.passed(args.fail_on_duplicates))
                }
                Err(e) => VERIFY.fail(e, 2),
            }
        })
        .await
}

/// Several tables' reports: each in turn (text), or one JSON object with
/// `ok`, the union of `failures` and `tables`, the reports. Exit 1 if any
/// table failed.
fn print_all(reports: &[Report], args: &VerifyArgs) -> u8 {
    let fail = args.fail_on_duplicates;
    let ok = reports.iter().all(|r| r.passed(fail));
    if args.json {
        let mut failures: Vec<&str> = reports.iter().flat_map(|r| r.failures(fail)).collect();
        failures.sort_unstable();
        failures.dedup();
        let v = serde_json::json!({
            "ok": ok,
            "failures": failures,
            "tables": reports.iter().map(|r| r.to_json(fail)).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for r in reports {
            println!("{r}");
            if fail && r.duplicates.events > 0 {
                println!("FAILED: duplicates (--fail-on-duplicates)");
            }
            println!();
        }
        println!(
            "{} table(s) checked: {}",
            reports.len(),
            if ok { "all passed" } else { "FAILED" }
        );
    }
    u8::from(!ok)
}
