//! The report: each kind of problem with counts and examples, as text
//! for operators and as JSON with stable keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// A count and the first few examples.
#[derive(Debug, Clone, Serialize)]
pub struct Problems<T> {
    pub count: u64,
    pub examples: Vec<T>,
}

impl<T> Problems<T> {
    pub(super) fn new() -> Self {
        Problems {
            count: 0,
            examples: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, max: usize, example: impl FnOnce() -> T) {
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

pub(super) fn show(b: Option<&[u8]>) -> String {
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
        self.fmt_rows(f)?;
        self.fmt_copies(f)?;
        self.fmt_content(f)?;
        self.fmt_verdict(f)
    }
}

/// The text report, one section per method, in the order it prints.
impl Report {
    /// Totals, and the rows that did not arrive or never could.
    fn fmt_rows(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
    }

    /// Duplicates and order: how the copies lie in the partitions.
    fn fmt_copies(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
    }

    /// Keys over partitions, content differing from the row, unknown records.
    fn fmt_content(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        Ok(())
    }

    /// What else was seen, then OK or what failed.
    fn fmt_verdict(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
