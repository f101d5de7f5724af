//! The outbox router: turns a decoded outbox row into a Kafka record.
//!
//! Which column is the event id, the key, the value, which columns become
//! headers and how the topic is named are configuration. The router resolves
//! column names to positions once per Relation message and keeps that plan, so
//! routing a row is index lookups and slicing, not name matching.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Identity hashing for relation OIDs (u32 keys only).
#[derive(Default)]
pub struct OidHasher(u64);

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Spread the bits over the whole word: the table uses the top bits.
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

use bytes::Bytes;

use crate::pipeline::decode::pgoutput::{Insert, Relation, TupleValue};
use crate::pipeline::route::template::TemplatePart;
pub use crate::pipeline::route::template::{validate_topic, TopicTemplate};
// Where they were before the split: commands and tests name them here.
pub use crate::pipeline::route::config::{HeaderColumn, RouterConfig, TableName};

/// Postgres type OID of `bytea`: its text form is hex and is decoded so the
/// record value is the stored bytes (Avro or Protobuf payloads).
const BYTEA_OID: u32 = 17;
const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;

/// A record ready for the producer. Values are slices of the WAL buffer;
/// the topic and header names are shared with the router (no allocation per
/// event for them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub topic: Arc<str>,
    pub key: Bytes,
    pub payload: Option<Bytes>,
    pub event_id: Bytes,
    pub headers: Vec<(Arc<str>, Option<Bytes>)>,
    /// The event-type column's value, for metrics and logs.
    pub event_type: Option<Bytes>,
}

/// What is known of an event that could not be published normally.
#[derive(Debug, Clone, Default)]
pub struct Failed {
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub event_id: Option<Bytes>,
    pub headers: Vec<(std::sync::Arc<str>, Option<Bytes>)>,
    pub event_type: Option<Bytes>,
    pub intended_topic: String,
}

impl From<&OutboxRecord> for Failed {
    fn from(r: &OutboxRecord) -> Self {
        Failed {
            key: Some(r.key.clone()),
            payload: r.payload.clone(),
            event_id: Some(r.event_id.clone()),
            headers: r.headers.clone(),
            event_type: r.event_type.clone(),
            intended_topic: r.topic.to_string(),
        }
    }
}

impl OutboxRecord {
    /// A copy that owns its bytes. The record's values are slices of the
    /// buffer the WAL message was read into; keeping one alive keeps that
    /// whole buffer (tens of kilobytes) alive, so a record held while in
    /// flight is detached first.
    pub fn detached(&self) -> OutboxRecord {
        let own = |b: &Bytes| Bytes::copy_from_slice(b);
        OutboxRecord {
            topic: self.topic.clone(),
            key: own(&self.key),
            payload: self.payload.as_ref().map(own),
            event_id: own(&self.event_id),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.as_ref().map(own)))
                .collect(),
            event_type: self.event_type.as_ref().map(own),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("outbox table {table} has no column {missing} (set by {option}); its columns are: {existing}")]
    MissingColumn {
        table: String,
        missing: String,
        option: &'static str,
        existing: String,
    },
    #[error("the type of column {column} of {table} (set by {option}) changed under the running relay (type OID {before} -> {after}): check the consumers of its events, then restart the relay to accept the new type")]
    ColumnTypeChanged {
        table: String,
        column: String,
        option: &'static str,
        before: u32,
        after: u32,
    },
    #[error("table {table} matches {pattern} but its rows cannot be mapped: {why}. One tenant's table stops no other: fix its shape, or take it out of the publication (ALTER PUBLICATION … DROP TABLE {table}) and publish its rows again once fixed; with --on-error-override table-shape=dead-letter its rows go to the dead-letter topic")]
    Unfit {
        table: String,
        pattern: String,
        why: String,
    },
    #[error("an INSERT arrived for relation OID {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("row of {table} has {got} columns but its Relation message announced {expected}")]
    ColumnCount {
        table: String,
        got: usize,
        expected: usize,
    },
    #[error("column {column} (the {role}) is NULL")]
    Null { column: String, role: &'static str },
    #[error("column {column} (the key) is empty: every event needs an aggregate id so its aggregate's events stay in one partition")]
    EmptyKey { column: String },
    #[error("column {column} arrived as an unchanged TOAST value, which an INSERT never sends")]
    UnchangedToast { column: String },
    #[error("topic template {template} gave {topic:?} for this event: {reason}")]
    InvalidTopic {
        template: String,
        topic: String,
        reason: String,
    },
    #[error("column {column} is bytea but its value is not hex text: {reason}")]
    BadBytea { column: String, reason: String },
    #[error("the payload in column {column} is not valid JSON ({reason}) and --payload-format json requires it")]
    InvalidJson { column: String, reason: String },
}

#[derive(Debug, Clone)]
enum TopicPlan {
    Literal(String),
    Column(usize),
}

#[derive(Debug, Clone)]
struct Plan {
    /// Which of the configured tables this relation is.
    table: usize,
    ncols: usize,
    id: usize,
    key: usize,
    payload: usize,
    payload_bytea: bool,
    /// The payload column's type does not guarantee JSON and JSON is required.
    check_json: bool,
    topic: Vec<TopicPlan>,
    headers: Vec<(Arc<str>, usize)>,
    event_type: Option<usize>,
}

/// What an insert turned into.
#[derive(Debug)]
pub enum Routed {
    Record(OutboxRecord),
    /// A row of another table the publication also covers (FOR ALL TABLES,
    /// a shared publication): not an event, never published. Carries the
    /// table's `schema.name`, for the metric that counts them.
    OtherTable(Arc<str>),
}

#[derive(Debug)]
enum RelationPlan {
    Outbox(Plan),
    Other(Arc<str>),
    /// A table a pattern matches that its section cannot map (review N3):
    /// its rows are a routing error of that table, which the error policy
    /// decides, not a halt of every table at its Relation message.
    Unfit {
        table: String,
        pattern: String,
        why: String,
        columns: Vec<String>,
    },
}

/// Type OIDs of the mapped columns as first seen, by (`schema.table`,
/// column).
pub type ColumnTypes = HashMap<(String, String), u32>;

pub struct Router {
    /// The outbox tables, each with its mapping; a relation that is none of
    /// them is another table's.
    tables: Vec<RouterConfig>,
    /// Type OIDs of the mapped columns as first seen in this process: a
    /// change under a running relay changes what the bytes mean.
    mapped_types: ColumnTypes,
    /// By relation OID. OIDs are spread well enough to be their own hash,
    /// and this lookup runs once per row.
    relations: HashMap<u32, RelationPlan, BuildHasherDefault<OidHasher>>,
    /// The `id` header's name.
    id_header: Arc<str>,
    /// The topic rendered last, shared by every record that goes there (a
    /// run of events for one topic validates and allocates its name once).
    last_topic: Option<Arc<str>>,
    /// Where a topic is rendered, reused.
    topic_buf: String,
}

impl Router {
    pub fn new(tables: Vec<RouterConfig>) -> Self {
        Router {
            tables,
            mapped_types: ColumnTypes::new(),
            relations: HashMap::default(),
            id_header: Arc::from("id"),
            last_topic: None,
            topic_buf: String::new(),
        }
    }

    pub fn tables(&self) -> &[RouterConfig] {
        &self.tables
    }

    /// A router that remembers the mapped columns' types of an earlier
    /// session of this process, so that a type changed across a reconnect
    /// is caught as well as one changed under a running session.
    pub fn with_column_types(tables: Vec<RouterConfig>, types: ColumnTypes) -> Self {
        Router {
            mapped_types: types,
            ..Router::new(tables)
        }
    }

    /// The mapped columns' types as first seen, for the next session.
    pub fn column_types(&self) -> &ColumnTypes {
        &self.mapped_types
    }

    /// Takes a Relation message: resolves the configured columns against the
    /// table's current shape. Sent before the first change of a table and
    /// again after its schema changed, so a dropped or renamed column is
    /// caught here.
    pub fn on_relation(&mut self, rel: &Relation) -> Result<(), RouteError> {
        let which = self
            .tables
            .iter()
            .position(|t| t.table.matches(&rel.namespace, &rel.name));
        let full_name = format!("{}.{}", rel.namespace, rel.name);
        let Some(which) = which else {
            // Also the partitions of a partitioned outbox: pgoutput describes
            // them beside their root, whose name their rows carry.
            tracing::debug!(
                table = %full_name,
                "a table besides the outbox tables: its rows are skipped (outbox_skipped_rows_total)"
            );
            self.relations
                .insert(rel.oid, RelationPlan::Other(Arc::from(full_name)));
            return Ok(());
        };
        if self.tables[which].table.is_pattern() {
            if let Err(e) = self.plan(which, rel, &full_name) {
                let pattern = self.tables[which].table.to_string();
                tracing::warn!(table = %full_name, %pattern, error = %e, "a table of a schema pattern does not fit its section: its rows are routing errors of that table (the error policy's table-shape); the other tables go on");
                self.relations.insert(
                    rel.oid,
                    RelationPlan::Unfit {
                        table: full_name,
                        pattern,
                        why: e.to_string(),
                        columns: rel.columns.iter().map(|c| c.name.clone()).collect(),
                    },
                );
            }
            return Ok(());
        }
        self.plan(which, rel, &full_name)
    }

    /// The plan of an outbox table's rows, recorded for its relation.
    fn plan(&mut self, which: usize, rel: &Relation, full_name: &str) -> Result<(), RouteError> {
        let full_name = full_name.to_string();
        let cfg = &self.tables[which];
        // Each configured column is looked up once: its position for the
        // plan, its type for the check against what earlier sessions saw (a
        // type change under a running relay must stop it, not be decoded
        // the new way).
        let mut position: HashMap<String, usize> = HashMap::new();
        let mut types = Vec::new();
        for (column, option) in cfg.referenced_columns() {
            if position.contains_key(&column) {
                continue;
            }
            let Some(idx) = rel.columns.iter().position(|c| c.name == column) else {
                return Err(RouteError::MissingColumn {
                    table: full_name,
                    missing: column,
                    option,
                    existing: rel
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let type_oid = rel.columns[idx].type_oid;
            let seen = (full_name.clone(), column.clone());
            if let Some(before) = self.mapped_types.get(&seen) {
                if *before != type_oid {
                    return Err(RouteError::ColumnTypeChanged {
                        table: full_name,
                        column,
                        option,
                        before: *before,
                        after: type_oid,
                    });
                }
            }
            types.push((seen, type_oid));
            position.insert(column, idx);
        }
        self.mapped_types.extend(types);
        // Every column below is one of referenced_columns(): found above.
        let at = |col: &str| position[col];
        let payload = at(&cfg.payload_column);
        let plan = Plan {
            table: which,
            ncols: rel.columns.len(),
            id: at(&cfg.id_column),
            key: at(&cfg.key_column),
            payload,
            payload_bytea: rel.columns[payload].type_oid == BYTEA_OID,
            check_json: cfg.require_json
                && !matches!(rel.columns[payload].type_oid, JSON_OID | JSONB_OID),
            topic: cfg
                .topic
                .parts()
                .map(|p| match p {
                    TemplatePart::Literal(l) => TopicPlan::Literal(l.to_string()),
                    TemplatePart::Column(c) => TopicPlan::Column(at(c)),
                    TemplatePart::Schema => TopicPlan::Literal(rel.namespace.clone()),
                })
                .collect(),
            headers: cfg
                .headers
                .iter()
                .map(|h| (Arc::from(h.header.as_str()), at(&h.column)))
                .collect(),
            event_type: cfg.event_type_column.as_deref().map(at),
        };
        self.relations.insert(rel.oid, RelationPlan::Outbox(plan));
        Ok(())
    }

    /// Maps one inserted row to a record.
    pub fn route(&mut self, insert: &Insert) -> Result<Routed, RouteError> {
        let plan = match self.relations.get(&insert.relation_oid) {
            Some(RelationPlan::Outbox(p)) => p,
            Some(RelationPlan::Other(name)) => return Ok(Routed::OtherTable(name.clone())),
            Some(RelationPlan::Unfit {
                table,
                pattern,
                why,
                ..
            }) => {
                return Err(RouteError::Unfit {
                    table: table.clone(),
                    pattern: pattern.clone(),
                    why: why.clone(),
                })
            }
            None => return Err(RouteError::UnknownRelation(insert.relation_oid)),
        };
        let cfg = &self.tables[plan.table];
        if insert.tuple.len() != plan.ncols {
            return Err(RouteError::ColumnCount {
                table: cfg.table.to_string(),
                got: insert.tuple.len(),
                expected: plan.ncols,
            });
        }
        let tuple = &insert.tuple;
        let text = |idx: usize, column: &str, role: &'static str| -> Result<Bytes, RouteError> {
            match &tuple[idx] {
                TupleValue::Text(b) | TupleValue::Binary(b) => Ok(b.clone()),
                TupleValue::Null => Err(RouteError::Null {
                    column: column.to_string(),
                    role,
                }),
                TupleValue::UnchangedToast => Err(RouteError::UnchangedToast {
                    column: column.to_string(),
                }),
            }
        };
        let event_id = text(plan.id, &cfg.id_column, "event id")?;
        let key = text(plan.key, &cfg.key_column, "key")?;
        if key.is_empty() {
            return Err(RouteError::EmptyKey {
                column: cfg.key_column.clone(),
            });
        }
        let key = cfg.key_format.encode(key);
        let payload = payload_of(cfg, plan, tuple)?;
        let topic = topic_of(cfg, plan, tuple, &mut self.topic_buf, &mut self.last_topic)?;
        let mut headers = Vec::with_capacity(plan.headers.len() + 1);
        headers.push((self.id_header.clone(), Some(event_id.clone())));
        for (name, idx) in &plan.headers {
            let value = match &tuple[*idx] {
                TupleValue::Text(b) | TupleValue::Binary(b) => Some(b.clone()),
                _ => None,
            };
            headers.push((name.clone(), value));
        }
        let event_type = plan.event_type.and_then(|i| match &tuple[i] {
            TupleValue::Text(b) | TupleValue::Binary(b) => Some(b.clone()),
            _ => None,
        });
        Ok(Routed::Record(OutboxRecord {
            topic,
            key,
            payload,
            event_id,
            headers,
            event_type,
        }))
    }
}

/// The record's value: the payload column's bytes (bytea decoded), checked
/// as JSON when the configuration asks for it.
fn payload_of(
    cfg: &RouterConfig,
    plan: &Plan,
    tuple: &[TupleValue],
) -> Result<Option<Bytes>, RouteError> {
    let payload = match &tuple[plan.payload] {
        TupleValue::Null => None,
        TupleValue::UnchangedToast => {
            return Err(RouteError::UnchangedToast {
                column: cfg.payload_column.clone(),
            })
        }
        TupleValue::Text(b) if plan.payload_bytea => {
            Some(decode_bytea_hex(b).map_err(|reason| RouteError::BadBytea {
                column: cfg.payload_column.clone(),
                reason,
            })?)
        }
        TupleValue::Text(b) | TupleValue::Binary(b) => Some(b.clone()),
    };
    if plan.check_json {
        if let Some(p) = &payload {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(p) {
                return Err(RouteError::InvalidJson {
                    column: cfg.payload_column.clone(),
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(payload)
}

/// The template filled from the row, in `buf`; validated only when it
/// differs from the last topic (`last`), which consecutive events of one
/// topic then share.
fn topic_of(
    cfg: &RouterConfig,
    plan: &Plan,
    tuple: &[TupleValue],
    buf: &mut String,
    last: &mut Option<Arc<str>>,
) -> Result<Arc<str>, RouteError> {
    buf.clear();
    for part in &plan.topic {
        match part {
            TopicPlan::Literal(l) => buf.push_str(l),
            TopicPlan::Column(i) => match &tuple[*i] {
                TupleValue::Text(b) | TupleValue::Binary(b) if !b.is_empty() => {
                    buf.push_str(&String::from_utf8_lossy(b))
                }
                value => {
                    return Err(RouteError::InvalidTopic {
                        template: cfg.topic.to_string(),
                        topic: buf.clone(),
                        reason: format!(
                            "a placeholder's column is {}",
                            if matches!(value, TupleValue::Null) {
                                "NULL"
                            } else {
                                "empty"
                            }
                        ),
                    })
                }
            },
        }
    }
    match last {
        Some(l) if **l == **buf => Ok(l.clone()),
        _ => {
            if let Err(reason) = validate_topic(buf) {
                return Err(RouteError::InvalidTopic {
                    template: cfg.topic.to_string(),
                    topic: buf.clone(),
                    reason,
                });
            }
            let topic: Arc<str> = Arc::from(buf.as_str());
            *last = Some(topic.clone());
            Ok(topic)
        }
    }
}

impl Router {
    /// Whatever can be read from a row that failed to route, for its
    /// dead-letter record: raw values, no validation.
    pub fn salvage(&self, insert: &Insert) -> Failed {
        let plan = match self.relations.get(&insert.relation_oid) {
            Some(RelationPlan::Outbox(plan)) => plan,
            // The whole row, column by column, so that nothing of it is lost.
            Some(RelationPlan::Unfit { table, columns, .. }) => {
                let row: serde_json::Map<String, serde_json::Value> = columns
                    .iter()
                    .zip(insert.tuple.iter())
                    .map(|(name, v)| {
                        let v = match v {
                            TupleValue::Text(b) | TupleValue::Binary(b) => {
                                serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                            }
                            _ => serde_json::Value::Null,
                        };
                        (name.clone(), v)
                    })
                    .collect();
                return Failed {
                    payload: Some(Bytes::from(serde_json::Value::Object(row).to_string())),
                    intended_topic: format!("table {table}"),
                    ..Failed::default()
                };
            }
            _ => return Failed::default(),
        };
        let value = |i: usize| match insert.tuple.get(i) {
            Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => Some(b.clone()),
            _ => None,
        };
        let event_id = value(plan.id);
        let mut headers = vec![(self.id_header.clone(), event_id.clone())];
        headers.extend(
            plan.headers
                .iter()
                .map(|(name, i)| (name.clone(), value(*i))),
        );
        let mut topic = String::new();
        for part in &plan.topic {
            match part {
                TopicPlan::Literal(l) => topic.push_str(l),
                TopicPlan::Column(i) => {
                    if let Some(v) = value(*i) {
                        topic.push_str(&String::from_utf8_lossy(&v));
                    }
                }
            }
        }
        Failed {
            key: value(plan.key),
            payload: value(plan.payload),
            event_id,
            headers,
            event_type: plan.event_type.and_then(value),
            intended_topic: topic,
        }
    }
}

fn decode_bytea_hex(b: &Bytes) -> Result<Bytes, String> {
    let hex = b
        .strip_prefix(b"\\x")
        .ok_or_else(|| "expected the hex format (bytea_output = 'hex')".to_string())?;
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("{:?} is not a hex digit", char::from(c))),
    };
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push(nibble(pair[0])? << 4 | nibble(pair[1])?);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests;
