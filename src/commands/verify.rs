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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::pipeline::sink::client::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Options, RelayConfig};
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::{RouterConfig, TopicTemplate};

/// Postgres type OIDs the checker cares about.
const BYTEA_OID: u32 = 17;
const INTEGER_OIDS: [u32; 3] = [20, 21, 23];

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
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("outbox table {0} does not exist (or is not visible to this user)")]
    NoTable(String),
    #[error("outbox table {table} has no column {missing} (set by {option}); its columns are: {existing}")]
    MissingColumn {
        table: String,
        missing: String,
        option: &'static str,
        existing: String,
    },
    #[error("Kafka: {what}: {source}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading the topics up to their high watermarks took longer than {timeout:?}; still behind: {behind}")]
    ReadTimeout { timeout: Duration, behind: String },
    #[error("the Kafka reader task failed: {0}")]
    Task(String),
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> VerifyError {
    let what = what.into();
    move |source| VerifyError::Kafka { what, source }
}

/// One outbox row, as the relay would have routed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub event_id: Option<String>,
    pub key: Option<String>,
    /// The record value the relay sends: the column's text, or bytea's bytes.
    pub payload: Option<Vec<u8>>,
    /// The routed topic, or why the template cannot be filled for this row.
    pub topic: Result<String, String>,
    /// Header columns (not `id`), by header name, as text.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Rank in the ordering column (equal values share a rank); None when
    /// order is not checked by column or the value is NULL.
    pub rank: Option<i64>,
    /// The ordering column's value as text, for messages.
    pub order_value: Option<String>,
}

/// One record read from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl KafkaRecord {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The event id: the `id` header as text.
    pub fn event_id(&self) -> Option<String> {
        self.header("id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn location(&self) -> String {
        format!("{}[{}]@{}", self.topic, self.partition, self.offset)
    }

    fn same_content(&self, other: &KafkaRecord) -> bool {
        self.topic == other.topic
            && self.key == other.key
            && self.payload == other.payload
            && self.headers == other.headers
    }
}

/// What the outbox side of the check found.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    pub table: String,
    pub rows: Vec<OutboxRow>,
    /// "column id", or None when order is not checked by a column.
    pub order_column: Option<String>,
    pub notes: Vec<String>,
}

/// What the Kafka side of the check read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub topics: Vec<String>,
    /// Topics the rows route to that the broker does not have.
    pub absent_topics: Vec<String>,
    pub partitions: u64,
    pub records: Vec<KafkaRecord>,
}

/// A count and the first few examples.
#[derive(Debug, Clone, Serialize)]
pub struct Problems<T> {
    pub count: u64,
    pub examples: Vec<T>,
}

impl<T> Problems<T> {
    fn new() -> Self {
        Problems {
            count: 0,
            examples: Vec::new(),
        }
    }

    fn push(&mut self, max: usize, example: impl FnOnce() -> T) {
        self.count += 1;
        if self.examples.len() < max {
            self.examples.push(example());
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Missing {
    pub event_id: String,
    pub key: String,
    pub topic: String,
    pub order_value: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unpublishable {
    pub event_id: Option<String>,
    pub order_value: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unexpected {
    pub location: String,
    pub event_id: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Duplicate {
    pub event_id: String,
    pub copies: u64,
    /// Same topic, key, payload and headers: a redelivery.
    pub identical: bool,
    pub locations: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Duplicates {
    /// Events with more than one record.
    pub events: u64,
    /// Records beyond the first of each event.
    pub extra_records: u64,
    pub redeliveries: u64,
    pub differing: u64,
    pub examples: Vec<Duplicate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderViolation {
    pub topic: String,
    pub partition: i32,
    /// The aggregate (record key).
    pub key: String,
    pub event_id: String,
    pub offset: i64,
    /// The event it should have preceded, seen earlier in the partition.
    pub after_event_id: String,
    pub after_offset: i64,
    /// The two ordering values, later first: "id 7 after id 9".
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitKey {
    pub topic: String,
    pub key: String,
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub event_id: String,
    pub location: String,
    /// `topic`, `key`, `payload` or `header <name>`.
    pub field: String,
    pub expected: String,
    pub actual: String,
}

/// The result of a check: counts and the first examples of each problem.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub table: String,
    pub rows: u64,
    pub topics: Vec<String>,
    pub absent_topics: Vec<String>,
    pub partitions: u64,
    pub records: u64,
    /// Rows with at least one record.
    pub delivered: u64,
    /// How order was checked ("column id", "header seq"), None when it was not.
    pub order_checked_by: Option<String>,
    pub notes: Vec<String>,
    pub missing: Problems<Missing>,
    pub unpublishable: Problems<Unpublishable>,
    pub unexpected: Problems<Unexpected>,
    pub duplicates: Duplicates,
    pub order_violations: Problems<OrderViolation>,
    pub split_keys: Problems<SplitKey>,
    pub mismatches: Problems<Mismatch>,
    /// Mismatches per field.
    pub mismatch_fields: BTreeMap<String, u64>,
}

impl Report {
    /// Why the check fails, empty when it passes. Duplicates and unexpected
    /// records alone do not fail it unless `fail_on_duplicates`.
    pub fn failures(&self, fail_on_duplicates: bool) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.missing.count > 0 || self.unpublishable.count > 0 {
            f.push("loss");
        }
        if self.order_violations.count > 0 || self.split_keys.count > 0 {
            f.push("order");
        }
        if self.mismatches.count > 0 {
            f.push("mismatch");
        }
        if fail_on_duplicates && self.duplicates.events > 0 {
            f.push("duplicates");
        }
        f
    }

    pub fn passed(&self, fail_on_duplicates: bool) -> bool {
        self.failures(fail_on_duplicates).is_empty()
    }

    /// The report as JSON, with `ok` and `failures`.
    pub fn to_json(&self, fail_on_duplicates: bool) -> serde_json::Value {
        let failures = self.failures(fail_on_duplicates);
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("ok".into(), failures.is_empty().into());
            obj.insert("failures".into(), failures.into());
        }
        v
    }
}

fn show(b: Option<&[u8]>) -> String {
    const MAX: usize = 200;
    match b {
        None => "NULL".into(),
        Some(b) => {
            let s = String::from_utf8_lossy(b);
            if s.chars().count() > MAX {
                format!(
                    "{}… ({} bytes)",
                    s.chars().take(MAX).collect::<String>(),
                    b.len()
                )
            } else {
                format!("{s:?}")
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "outbox {}: {} rows; Kafka: {} records in {} topics ({} partitions)",
            self.table,
            self.rows,
            self.records,
            self.topics.len(),
            self.partitions
        )?;
        writeln!(
            f,
            "  delivered:       {} of {} events",
            self.delivered, self.rows
        )?;
        writeln!(f, "  missing:         {}", self.missing.count)?;
        for m in &self.missing.examples {
            writeln!(
                f,
                "    event {} (key {}, topic {}{})",
                m.event_id,
                m.key,
                m.topic,
                m.order_value
                    .as_ref()
                    .map(|o| format!(
                        ", {} {o}",
                        self.order_checked_by
                            .as_deref()
                            .and_then(|b| b.strip_prefix("column "))
                            .unwrap_or("order")
                    ))
                    .unwrap_or_default()
            )?;
        }
        if self.unpublishable.count > 0 {
            writeln!(f, "  unpublishable:   {}", self.unpublishable.count)?;
            for u in &self.unpublishable.examples {
                writeln!(
                    f,
                    "    row {}: {}",
                    u.event_id
                        .as_deref()
                        .or(u.order_value.as_deref())
                        .unwrap_or("?"),
                    u.reason
                )?;
            }
        }
        let d = &self.duplicates;
        writeln!(
            f,
            "  duplicates:      {} events ({} extra records): {} redeliveries, {} with differing copies",
            d.events, d.extra_records, d.redeliveries, d.differing
        )?;
        for x in &d.examples {
            writeln!(
                f,
                "    event {} ×{} {}: {}",
                x.event_id,
                x.copies,
                if x.identical {
                    "identical"
                } else {
                    "DIFFERING"
                },
                x.locations.join(", ")
            )?;
        }
        match &self.order_checked_by {
            Some(by) => writeln!(
                f,
                "  order ({by}): {} violations",
                self.order_violations.count
            )?,
            None => writeln!(f, "  order:           not checked")?,
        }
        for o in &self.order_violations.examples {
            writeln!(
                f,
                "    aggregate {} in {}[{}]: event {} @{} after event {} @{} ({})",
                o.key,
                o.topic,
                o.partition,
                o.event_id,
                o.offset,
                o.after_event_id,
                o.after_offset,
                o.detail
            )?;
        }
        writeln!(
            f,
            "  keys over several partitions: {}",
            self.split_keys.count
        )?;
        for s in &self.split_keys.examples {
            writeln!(
                f,
                "    key {} in {} partitions {:?}",
                s.key, s.topic, s.partitions
            )?;
        }
        let fields = self
            .mismatch_fields
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        if fields.is_empty() {
            writeln!(f, "  mismatches:      0")?;
        } else {
            writeln!(f, "  mismatches:      {} ({fields})", self.mismatches.count)?;
        }
        for m in &self.mismatches.examples {
            writeln!(
                f,
                "    event {} at {}: {} is {}, expected {}",
                m.event_id, m.location, m.field, m.actual, m.expected
            )?;
        }
        writeln!(f, "  unexpected:      {}", self.unexpected.count)?;
        for u in &self.unexpected.examples {
            writeln!(
                f,
                "    {} id {} key {}",
                u.location,
                u.event_id.as_deref().unwrap_or("(no id header)"),
                u.key.as_deref().unwrap_or("(none)")
            )?;
        }
        if !self.absent_topics.is_empty() {
            writeln!(
                f,
                "  topics missing on the broker: {}",
                self.absent_topics.join(", ")
            )?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        let failures = self.failures(false);
        if failures.is_empty() {
            write!(f, "OK: no loss, no order violation, no mismatch")
        } else {
            write!(f, "FAILED: {}", failures.join(", "))
        }
    }
}

/// Fills the template from a row's placeholder values, as the router does.
fn expand_topic(
    t: &TopicTemplate,
    values: &HashMap<String, Option<String>>,
) -> Result<String, String> {
    t.fill(|c| values.get(c).and_then(|v| v.as_deref()))
}

/// Reads the outbox rows with everything needed to check their records.
pub async fn read_outbox(
    client: &tokio_postgres::Client,
    router: &RouterConfig,
    order: &OrderBy,
) -> Result<Outbox, VerifyError> {
    let table = router.table.to_string();
    let q = |what: &str| sql(format!("cannot read the outbox ({what})"));
    let columns: Vec<(String, u32)> = client
        .query(
            "SELECT a.attname::text, a.atttypid FROM pg_attribute a
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&router.table.quoted()],
        )
        .await
        .map_err(q("columns"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if columns.is_empty() {
        return Err(VerifyError::NoTable(table));
    }
    let type_of = |col: &str| columns.iter().find(|(c, _)| c == col).map(|(_, t)| *t);
    let mut wanted = router.referenced_columns();
    if let OrderBy::Column(c) = order {
        wanted.push((c.clone(), "--order-column"));
    }
    for (col, option) in &wanted {
        if type_of(col).is_none() {
            return Err(VerifyError::MissingColumn {
                table,
                missing: col.clone(),
                option,
                existing: columns
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let mut notes = Vec::new();
    let order_column = match order {
        OrderBy::Column(c) => Some(c.clone()),
        OrderBy::Header(_) => None,
        OrderBy::Default => {
            let pk: Vec<(String, u32)> = client
                .query(
                    "SELECT a.attname::text, a.atttypid FROM pg_index i
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                      WHERE i.indrelid = to_regclass($1) AND i.indisprimary",
                    &[&router.table.quoted()],
                )
                .await
                .map_err(q("primary key"))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            match pk.as_slice() {
                [(c, t)] if INTEGER_OIDS.contains(t) => Some(c.clone()),
                _ => {
                    notes.push(
                        "order not checked: the table has no single-column integer primary key \
                         to order by; pass --order-column (a column growing in commit order) or \
                         --order-header"
                            .into(),
                    );
                    None
                }
            }
        }
    };

    let template_cols: Vec<String> = {
        let mut seen = BTreeSet::new();
        router
            .topic
            .columns()
            .filter(|c| seen.insert(c.to_string()))
            .map(str::to_string)
            .collect()
    };
    let text = |c: &str| format!("{}::text", quote_ident(c));
    // Text in UTF-8 bytes, as the relay's replication connection receives it.
    let text_bytes = |c: &str| format!("convert_to({}::text, 'UTF8')", quote_ident(c));
    let payload = if type_of(&router.payload_column) == Some(BYTEA_OID) {
        quote_ident(&router.payload_column)
    } else {
        text_bytes(&router.payload_column)
    };
    let mut select = vec![text(&router.id_column), text(&router.key_column), payload];
    select.extend(template_cols.iter().map(|c| text(c)));
    select.extend(router.headers.iter().map(|h| text_bytes(&h.column)));
    match &order_column {
        Some(c) => {
            let c = quote_ident(c);
            select.push(format!(
                "CASE WHEN {c} IS NULL THEN NULL ELSE rank() OVER (ORDER BY {c}) END::int8"
            ));
            select.push(format!("{c}::text"));
        }
        None => {
            select.push("NULL::int8".into());
            select.push("NULL::text".into());
        }
    }
    let sql = format!(
        "SELECT {} FROM {}",
        select.join(", "),
        router.table.quoted()
    );
    let result = client.query(&sql, &[]).await.map_err(q("rows"))?;
    let ntpl = template_cols.len();
    let nh = router.headers.len();
    let rows = result
        .iter()
        .map(|r| {
            let values: HashMap<String, Option<String>> = template_cols
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), r.get(3 + i)))
                .collect();
            OutboxRow {
                event_id: r.get(0),
                key: r.get(1),
                payload: r.get(2),
                topic: expand_topic(&router.topic, &values),
                headers: router
                    .headers
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (h.header.clone(), r.get(3 + ntpl + i)))
                    .collect(),
                rank: r.get(3 + ntpl + nh),
                order_value: r.get(4 + ntpl + nh),
            }
        })
        .collect();
    Ok(Outbox {
        table,
        rows,
        order_column: order_column.map(|c| format!("column {c}")),
        notes,
    })
}

/// Which topics to read.
#[derive(Debug, Clone)]
pub enum TopicSelection {
    Names(BTreeSet<String>),
    /// Every broker topic the template could have produced.
    Matching(TopicTemplate),
}

/// Reads every record of the topics, from each partition's start to the high
/// watermark captured before reading. Blocking.
pub fn read_topics(
    brokers: &str,
    properties: &[(String, String)],
    selection: &TopicSelection,
    timeout: Duration,
) -> Result<Snapshot, VerifyError> {
    let consumer: BaseConsumer = client_config(brokers, "outbox-relay-verify", &[], properties)
        // Required by librdkafka for a consumer; nothing is ever committed.
        .set("group.id", "outbox-relay-verify")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(kafka("creating the consumer"))?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(kafka("fetching metadata"))?;
    let on_broker: HashMap<&str, Vec<i32>> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name(), t.partitions().iter().map(|p| p.id()).collect()))
        .collect();
    let (topics, absent_topics): (Vec<String>, Vec<String>) = match selection {
        TopicSelection::Names(names) => names
            .iter()
            .cloned()
            .partition(|t| on_broker.contains_key(t.as_str())),
        TopicSelection::Matching(t) => {
            let mut v: Vec<String> = on_broker
                .keys()
                .filter(|n| !n.starts_with("__") && t.matches(n))
                .map(|n| n.to_string())
                .collect();
            v.sort();
            (v, Vec::new())
        }
    };
    let mut high: HashMap<(String, i32), i64> = HashMap::new();
    let mut pending: HashSet<(String, i32)> = HashSet::new();
    let mut tpl = TopicPartitionList::new();
    let mut partitions = 0;
    for t in &topics {
        for &p in &on_broker[t.as_str()] {
            partitions += 1;
            let (lo, hi) = consumer
                .fetch_watermarks(t, p, Duration::from_secs(10))
                .map_err(kafka(format!("watermarks of {t}[{p}]")))?;
            high.insert((t.clone(), p), hi);
            if hi > lo {
                pending.insert((t.clone(), p));
                tpl.add_partition_offset(t, p, Offset::Offset(lo))
                    .map_err(kafka("assigning"))?;
            }
        }
    }
    let mut records = Vec::new();
    if !pending.is_empty() {
        consumer.assign(&tpl).map_err(kafka("assigning"))?;
    }
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            let mut behind: Vec<String> =
                pending.iter().map(|(t, p)| format!("{t}[{p}]")).collect();
            behind.sort();
            return Err(VerifyError::ReadTimeout {
                timeout,
                behind: behind.join(", "),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // The EOF names no topic: ask where each partition stands.
                let pos = consumer.position().map_err(kafka("reading positions"))?;
                for e in pos.elements() {
                    let tp = (e.topic().to_string(), e.partition());
                    if e.partition() != p {
                        continue;
                    }
                    if let (Offset::Offset(o), Some(hi)) = (e.offset(), high.get(&tp)) {
                        if o >= *hi {
                            pending.remove(&tp);
                        }
                    }
                }
            }
            Some(Err(e)) => return Err(kafka("reading")(e)),
            Some(Ok(m)) => {
                let tp = (m.topic().to_string(), m.partition());
                let Some(&hi) = high.get(&tp) else { continue };
                if m.offset() >= hi {
                    // Written after the check started.
                    pending.remove(&tp);
                    continue;
                }
                if m.offset() + 1 >= hi {
                    pending.remove(&tp);
                }
                records.push(KafkaRecord {
                    topic: tp.0,
                    partition: tp.1,
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
        }
    }
    Ok(Snapshot {
        topics,
        absent_topics,
        partitions,
        records,
    })
}

/// A value to order by: integers numerically, anything else as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum OrderKey {
    Int(i128),
    Text(String),
}

/// Compares the two sides. Pure: the unit tests drive it directly.
pub fn compare(
    outbox: &Outbox,
    snapshot: &Snapshot,
    order: &OrderBy,
    max_examples: usize,
) -> Report {
    let max = max_examples;
    let mut notes = outbox.notes.clone();
    let rows = &outbox.rows;
    let records = &snapshot.records;

    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut repeated_ids = 0;
    for (i, r) in rows.iter().enumerate() {
        if let Some(id) = &r.event_id {
            if by_id.insert(id.as_str(), i).is_some() {
                repeated_ids += 1;
            }
        }
    }
    if repeated_ids > 0 {
        notes.push(format!(
            "{repeated_ids} rows repeat another row's event id: they cannot be told apart in Kafka"
        ));
    }
    // Records by event id, in read order (offset order within a partition).
    let mut copies: HashMap<String, Vec<usize>> = HashMap::new();
    let mut unexpected = Problems::new();
    for (i, rec) in records.iter().enumerate() {
        match rec.event_id() {
            Some(id) => copies.entry(id).or_default().push(i),
            None => unexpected.push(max, || Unexpected {
                location: rec.location(),
                event_id: None,
                key: rec
                    .key
                    .as_deref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
            }),
        }
    }

    let mut missing = Problems::new();
    let mut unpublishable = Problems::new();
    let mut mismatches = Problems::new();
    let mut mismatch_fields: BTreeMap<String, u64> = BTreeMap::new();
    let mut delivered = 0;
    for row in rows {
        let why_not = match (&row.event_id, &row.key, &row.topic) {
            (None, _, _) => Some("the event id is NULL".to_string()),
            (_, None, _) => Some("the key is NULL".to_string()),
            (_, Some(k), _) if k.is_empty() => Some("the key is empty".to_string()),
            (_, _, Err(reason)) => Some(reason.clone()),
            _ => None,
        };
        if let Some(reason) = why_not {
            unpublishable.push(max, || Unpublishable {
                event_id: row.event_id.clone(),
                order_value: row.order_value.clone(),
                reason,
            });
            continue;
        }
        let (Some(id), Some(key), Ok(topic)) = (&row.event_id, &row.key, &row.topic) else {
            continue;
        };
        let Some(found) = copies.get(id.as_str()) else {
            missing.push(max, || Missing {
                event_id: id.clone(),
                key: key.clone(),
                topic: topic.clone(),
                order_value: row.order_value.clone(),
            });
            continue;
        };
        delivered += 1;
        let mut fields_seen: HashSet<String> = HashSet::new();
        for &ri in found {
            let rec = &records[ri];
            let mut check = |field: String, expected: Option<&[u8]>, actual: Option<&[u8]>| {
                if expected != actual && fields_seen.insert(field.clone()) {
                    *mismatch_fields.entry(field.clone()).or_default() += 1;
                    mismatches.push(max, || Mismatch {
                        event_id: id.clone(),
                        location: rec.location(),
                        field,
                        expected: show(expected),
                        actual: show(actual),
                    });
                }
            };
            check(
                "topic".into(),
                Some(topic.as_bytes()),
                Some(rec.topic.as_bytes()),
            );
            check("key".into(), Some(key.as_bytes()), rec.key.as_deref());
            check(
                "payload".into(),
                row.payload.as_deref(),
                rec.payload.as_deref(),
            );
            for (name, value) in &row.headers {
                check(format!("header {name}"), value.as_deref(), rec.header(name));
            }
        }
    }
    let outbox_empty = rows.is_empty();
    if outbox_empty {
        notes.push(format!(
            "the outbox table is empty (rows deleted after insert?): {} records cannot be matched \
             to rows, so only Kafka-side checks were made (duplicates, keys over partitions{})",
            records.len(),
            if matches!(order, OrderBy::Header(_)) {
                ", order by header"
            } else {
                "; pass --order-header to check order"
            }
        ));
    } else {
        let mut ids: Vec<&String> = copies
            .keys()
            .filter(|id| !by_id.contains_key(id.as_str()))
            .collect();
        ids.sort_by_key(|id| copies[*id][0]);
        for id in ids {
            for &ri in &copies[id] {
                let rec = &records[ri];
                unexpected.push(max, || Unexpected {
                    location: rec.location(),
                    event_id: Some(id.clone()),
                    key: rec
                        .key
                        .as_deref()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                });
            }
        }
    }

    // Duplicates, over everything read (Kafka side).
    let mut duplicates = Duplicates {
        events: 0,
        extra_records: 0,
        redeliveries: 0,
        differing: 0,
        examples: Vec::new(),
    };
    let mut dup_ids: Vec<&String> = copies
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| k)
        .collect();
    dup_ids.sort_by_key(|id| copies[*id][0]);
    for id in dup_ids {
        let c = &copies[id];
        let first = &records[c[0]];
        let identical = c.iter().all(|&i| records[i].same_content(first));
        duplicates.events += 1;
        duplicates.extra_records += c.len() as u64 - 1;
        if identical {
            duplicates.redeliveries += 1;
        } else {
            duplicates.differing += 1;
        }
        if duplicates.examples.len() < max {
            duplicates.examples.push(Duplicate {
                event_id: id.clone(),
                copies: c.len() as u64,
                identical,
                locations: c.iter().map(|&i| records[i].location()).collect(),
            });
        }
    }

    // Keys over several partitions of one topic.
    let mut split_keys = Problems::new();
    let mut key_parts: BTreeMap<(&str, &[u8]), BTreeSet<i32>> = BTreeMap::new();
    for rec in records {
        if let Some(k) = &rec.key {
            key_parts
                .entry((rec.topic.as_str(), k.as_slice()))
                .or_default()
                .insert(rec.partition);
        }
    }
    for ((topic, key), parts) in &key_parts {
        if parts.len() > 1 {
            split_keys.push(max, || SplitKey {
                topic: topic.to_string(),
                key: String::from_utf8_lossy(key).into_owned(),
                partitions: parts.iter().copied().collect(),
            });
        }
    }

    // Order of each key's first copies within a partition.
    let order_checked_by = match order {
        OrderBy::Header(h) => Some(format!("header {h}")),
        _ => outbox.order_column.clone().filter(|_| !outbox_empty),
    };
    let mut order_violations = Problems::new();
    if order_checked_by.is_some() {
        let rank_of = |rec: &KafkaRecord, id: &str| -> Option<(OrderKey, String)> {
            match order {
                OrderBy::Header(h) => {
                    let v = String::from_utf8_lossy(rec.header(h)?).into_owned();
                    let k = v
                        .trim()
                        .parse::<i128>()
                        .map_or_else(|_| OrderKey::Text(v.clone()), OrderKey::Int);
                    Some((k, format!("{h} {v}")))
                }
                _ => {
                    let row = &rows[*by_id.get(id)?];
                    let col = outbox.order_column.as_deref().unwrap_or("order");
                    let col = col.strip_prefix("column ").unwrap_or(col);
                    Some((
                        OrderKey::Int(row.rank? as i128),
                        format!("{col} {}", row.order_value.as_deref().unwrap_or("?")),
                    ))
                }
            }
        };
        let mut partitions: BTreeMap<(&str, i32), Vec<&KafkaRecord>> = BTreeMap::new();
        for rec in records {
            partitions
                .entry((rec.topic.as_str(), rec.partition))
                .or_default()
                .push(rec);
        }
        for ((topic, partition), mut recs) in partitions {
            recs.sort_by_key(|r| r.offset);
            let mut seen: HashSet<String> = HashSet::new();
            // key -> (order, label, event id, offset) of its last first copy
            let mut last: HashMap<&[u8], (OrderKey, String, String, i64)> = HashMap::new();
            for rec in recs {
                let (Some(id), Some(key)) = (rec.event_id(), rec.key.as_deref()) else {
                    continue;
                };
                if !seen.insert(id.clone()) {
                    continue;
                }
                let Some((rank, label)) = rank_of(rec, &id) else {
                    continue;
                };
                if let Some((prev, prev_label, prev_id, prev_offset)) = last.get(key) {
                    if *prev > rank {
                        order_violations.push(max, || OrderViolation {
                            topic: topic.to_string(),
                            partition,
                            key: String::from_utf8_lossy(key).into_owned(),
                            event_id: id.clone(),
                            offset: rec.offset,
                            after_event_id: prev_id.clone(),
                            after_offset: *prev_offset,
                            detail: format!("{label} after {prev_label}"),
                        });
                    }
                }
                last.insert(key, (rank, label, id, rec.offset));
            }
        }
    }

    Report {
        table: outbox.table.clone(),
        rows: rows.len() as u64,
        topics: snapshot.topics.clone(),
        absent_topics: snapshot.absent_topics.clone(),
        partitions: snapshot.partitions,
        records: records.len() as u64,
        delivered,
        order_checked_by,
        notes,
        missing,
        unpublishable,
        unexpected,
        duplicates,
        order_violations,
        split_keys,
        mismatches,
        mismatch_fields,
    }
}

/// Runs the whole check: the table first, then the topics up to the high
/// watermarks taken after it.
pub async fn verify(cfg: &RelayConfig, settings: &VerifySettings) -> Result<Report, VerifyError> {
    let (client, conn) = crate::pg::sql::connect(&cfg.database).await?;
    let outbox = read_outbox(&client, &cfg.router, &settings.order).await;
    drop(client);
    let _ = conn.await;
    let outbox = outbox?;

    let template = &cfg.router.topic;
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
    let snapshot =
        tokio::task::spawn_blocking(move || read_topics(&brokers, &props, &selection, timeout))
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

/// The `verify` subcommand: prints the report; returns the exit code (0 all
/// good, 1 loss/order/mismatch (or duplicates with --fail-on-duplicates), 2
/// the check could not be made).
pub async fn command(config: Option<&Path>, args: VerifyArgs) -> u8 {
    let cfg = match crate::config::load(config, args.options.clone(), true) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outbox-relay verify: configuration error: {e}");
            return 2;
        }
    };
    let Some(read_timeout) = Duration::try_from_secs_f64(args.read_timeout)
        .ok()
        .filter(|d| !d.is_zero())
    else {
        eprintln!("outbox-relay verify: --read-timeout must be a positive number of seconds");
        return 2;
    };
    let settings = VerifySettings {
        order: match (args.order_column, args.order_header) {
            (Some(c), _) => OrderBy::Column(c),
            (None, Some(h)) => OrderBy::Header(h),
            (None, None) => OrderBy::Default,
        },
        max_examples: args.max_examples,
        read_timeout,
    };
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
        Err(e) => {
            eprintln!("outbox-relay verify: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, key: &str, topic: &str, payload: &str, rank: i64) -> OutboxRow {
        OutboxRow {
            event_id: Some(id.into()),
            key: Some(key.into()),
            payload: Some(payload.as_bytes().to_vec()),
            topic: Ok(topic.into()),
            headers: vec![],
            rank: Some(rank),
            order_value: Some(rank.to_string()),
        }
    }

    fn rec(r: &OutboxRow, partition: i32, offset: i64) -> KafkaRecord {
        KafkaRecord {
            topic: r.topic.clone().unwrap(),
            partition,
            offset,
            key: r.key.as_ref().map(|k| k.as_bytes().to_vec()),
            payload: r.payload.clone(),
            headers: vec![(
                "id".into(),
                r.event_id.as_ref().map(|i| i.as_bytes().to_vec()),
            )],
        }
    }

    fn outbox(rows: Vec<OutboxRow>) -> Outbox {
        Outbox {
            table: "public.outbox".into(),
            rows,
            order_column: Some("column id".into()),
            notes: vec![],
        }
    }

    fn snap(records: Vec<KafkaRecord>) -> Snapshot {
        Snapshot {
            topics: vec!["t".into()],
            absent_topics: vec![],
            partitions: 2,
            records,
        }
    }

    fn rows3() -> Vec<OutboxRow> {
        vec![
            row("e1", "a", "t", "{}", 1),
            row("e2", "a", "t", "{\"n\": 2}", 2),
            row("e3", "b", "t", "{}", 3),
        ]
    }

    #[test]
    fn all_delivered_passes() {
        let rows = rows3();
        let recs = vec![
            rec(&rows[0], 0, 0),
            rec(&rows[1], 0, 1),
            rec(&rows[2], 1, 0),
        ];
        let r = compare(&outbox(rows), &snap(recs), &OrderBy::Default, 5);
        assert!(r.passed(true), "{r}");
        assert_eq!((r.rows, r.records, r.delivered), (3, 3, 3));
        assert!(r
            .to_string()
            .ends_with("OK: no loss, no order violation, no mismatch"));
    }

    #[test]
    fn swapped_events_of_one_key_are_an_order_violation() {
        let rows = rows3();
        let recs = vec![
            rec(&rows[1], 0, 0),
            rec(&rows[0], 0, 1),
            rec(&rows[2], 0, 2),
        ];
        let r = compare(&outbox(rows), &snap(recs), &OrderBy::Default, 5);
        assert_eq!(r.order_violations.count, 1, "{r}");
        let v = &r.order_violations.examples[0];
        assert_eq!(
            (
                v.key.as_str(),
                v.event_id.as_str(),
                v.after_event_id.as_str()
            ),
            ("a", "e1", "e2")
        );
        assert_eq!(r.failures(false), vec!["order"]);
    }

    #[test]
    fn redelivered_suffix_is_not_an_order_violation_but_a_duplicate() {
        let rows = rows3();
        let recs = vec![
            rec(&rows[0], 0, 0),
            rec(&rows[1], 0, 1),
            rec(&rows[0], 0, 2),
            rec(&rows[1], 0, 3),
            rec(&rows[2], 1, 0),
        ];
        let r = compare(&outbox(rows), &snap(recs), &OrderBy::Default, 5);
        assert_eq!(r.order_violations.count, 0, "{r}");
        assert_eq!((r.duplicates.events, r.duplicates.redeliveries), (2, 2));
        assert!(r.passed(false) && !r.passed(true));
    }

    #[test]
    fn differing_copies_missing_split_and_unexpected() {
        let rows = rows3();
        let mut altered = rec(&rows[0], 0, 1);
        altered.payload = Some(b"{\"x\": 1}".to_vec());
        let mut stranger = rec(&rows[2], 1, 1);
        stranger.headers = vec![("id".into(), Some(b"zz".to_vec()))];
        // e3 lost; e1 twice with different payloads; key a on two partitions.
        let recs = vec![rec(&rows[0], 0, 0), altered, rec(&rows[1], 1, 0), stranger];
        let r = compare(&outbox(rows), &snap(recs), &OrderBy::Default, 5);
        assert_eq!(r.missing.count, 1);
        assert_eq!(r.missing.examples[0].event_id, "e3");
        assert_eq!((r.duplicates.events, r.duplicates.differing), (1, 1));
        assert_eq!(r.mismatches.count, 1);
        assert_eq!(r.mismatches.examples[0].field, "payload");
        assert_eq!(r.split_keys.count, 1);
        assert_eq!(r.unexpected.count, 1);
        assert_eq!(r.failures(false), vec!["loss", "order", "mismatch"]);
    }

    #[test]
    fn empty_outbox_makes_only_kafka_side_checks() {
        let rows = rows3();
        let recs = vec![
            rec(&rows[1], 0, 0),
            rec(&rows[0], 0, 1),
            rec(&rows[0], 0, 2),
        ];
        let r = compare(&outbox(vec![]), &snap(recs.clone()), &OrderBy::Default, 5);
        assert_eq!(r.unexpected.count, 0);
        assert_eq!(r.order_checked_by, None);
        assert_eq!(r.duplicates.redeliveries, 1);
        assert!(r.passed(false), "{r}");
        assert!(r.notes[0].contains("outbox table is empty"), "{r}");
        // By a header, the swap shows.
        let with_seq: Vec<KafkaRecord> = recs
            .into_iter()
            .map(|mut k| {
                let seq = if k.event_id().as_deref() == Some("e1") {
                    "9"
                } else {
                    "10"
                };
                k.headers
                    .push(("seq".into(), Some(seq.as_bytes().to_vec())));
                k
            })
            .collect();
        let r = compare(
            &outbox(vec![]),
            &snap(with_seq),
            &OrderBy::Header("seq".into()),
            5,
        );
        assert_eq!(r.order_violations.count, 1, "{r}");
        assert_eq!(r.order_violations.examples[0].detail, "seq 9 after seq 10");
    }

    #[test]
    fn templates_expand_and_match() {
        let t = TopicTemplate::parse("events.{event_type}.v1").unwrap();
        let v: HashMap<String, Option<String>> =
            [("event_type".to_string(), Some("OrderPaid".to_string()))].into();
        assert_eq!(expand_topic(&t, &v).unwrap(), "events.OrderPaid.v1");
        let null: HashMap<String, Option<String>> = [("event_type".to_string(), None)].into();
        assert!(expand_topic(&t, &null).unwrap_err().contains("NULL"));
        let bad: HashMap<String, Option<String>> =
            [("event_type".to_string(), Some("a b".to_string()))].into();
        assert!(expand_topic(&t, &bad).is_err());
        assert!(t.matches("events.X.v1"));
        assert!(t.matches("events.a.b.v1"));
        assert!(!t.matches("events..v1"));
        assert!(!t.matches("other.X.v1"));
        let f = TopicTemplate::parse("fixed").unwrap();
        assert!(f.matches("fixed") && !f.matches("fixed2"));
    }
}
