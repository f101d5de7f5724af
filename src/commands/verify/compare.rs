//! Matching records to rows by event id: what is missing, duplicated,
//! out of order, spread over partitions or different from its row.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::*;

/// A value to order by: integers numerically, anything else as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum OrderKey {
    Int(i128),
    Text(String),
}

/// Both sides, indexed by event id.
struct Sides<'a> {
    outbox: &'a Outbox,
    records: &'a [KafkaRecord],
    /// Row index by event id (the last row, when ids repeat).
    by_id: HashMap<&'a str, usize>,
    /// Record indices by event id, in read order (offset order within a
    /// partition).
    copies: HashMap<String, Vec<usize>>,
    max: usize,
}

/// Compares the two sides. Pure: the unit tests drive it directly.
pub fn compare(
    outbox: &Outbox,
    snapshot: &Snapshot,
    order: &OrderBy,
    max_examples: usize,
) -> Report {
    let mut notes = outbox.notes.clone();
    let (sides, repeated_ids, mut unexpected) = Sides::index(outbox, snapshot, max_examples);
    if repeated_ids > 0 {
        notes.push(format!(
            "{repeated_ids} rows repeat another row's event id: they cannot be told apart in Kafka"
        ));
    }
    let rows = sides.match_rows();
    let outbox_empty = outbox.rows.is_empty();
    if outbox_empty {
        notes.push(format!(
            "the outbox table is empty (rows deleted after insert?): {} records cannot be matched \
             to rows, so only Kafka-side checks were made (duplicates, keys over partitions{})",
            sides.records.len(),
            if matches!(order, OrderBy::Header(_)) {
                ", order by header"
            } else {
                "; pass --order-header to check order"
            }
        ));
    } else {
        sides.unknown_ids(&mut unexpected);
    }
    let order_checked_by = match order {
        OrderBy::Header(h) => Some(format!("header {h}")),
        _ => outbox.order_column.clone().filter(|_| !outbox_empty),
    };
    let order_violations = if order_checked_by.is_some() {
        sides.order_violations(order)
    } else {
        Problems::new()
    };
    Report {
        table: outbox.table.clone(),
        rows: outbox.rows.len() as u64,
        topics: snapshot.topics.clone(),
        absent_topics: snapshot.absent_topics.clone(),
        partitions: snapshot.partitions,
        records: sides.records.len() as u64,
        delivered: rows.delivered,
        order_checked_by,
        notes,
        missing: rows.missing,
        unpublishable: rows.unpublishable,
        unexpected,
        duplicates: sides.duplicates(),
        order_violations,
        split_keys: sides.split_keys(),
        mismatches: rows.mismatches,
        mismatch_fields: rows.mismatch_fields,
    }
}

/// What matching each row to its records found.
struct RowFindings {
    delivered: u64,
    missing: Problems<Missing>,
    unpublishable: Problems<Unpublishable>,
    mismatches: Problems<Mismatch>,
    mismatch_fields: BTreeMap<String, u64>,
}

impl<'a> Sides<'a> {
    /// Indexes both sides; also returns how many rows repeat an event id and
    /// the records without one (unexpected whatever the table holds).
    fn index(
        outbox: &'a Outbox,
        snapshot: &'a Snapshot,
        max: usize,
    ) -> (Sides<'a>, u64, Problems<Unexpected>) {
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        let mut repeated_ids = 0;
        for (i, r) in outbox.rows.iter().enumerate() {
            if let Some(id) = &r.event_id {
                if by_id.insert(id.as_str(), i).is_some() {
                    repeated_ids += 1;
                }
            }
        }
        let mut copies: HashMap<String, Vec<usize>> = HashMap::new();
        let mut unexpected = Problems::new();
        for (i, rec) in snapshot.records.iter().enumerate() {
            match rec.event_id() {
                Some(id) => copies.entry(id).or_default().push(i),
                None => unexpected.push(max, || Unexpected {
                    location: rec.location(),
                    event_id: None,
                    key: key_text(rec),
                }),
            }
        }
        let sides = Sides {
            outbox,
            records: &snapshot.records,
            by_id,
            copies,
            max,
        };
        (sides, repeated_ids, unexpected)
    }

    /// Each row: publishable at all, delivered, and each copy as the row
    /// says (topic, key, payload, header columns).
    fn match_rows(&self) -> RowFindings {
        let max = self.max;
        let mut found = RowFindings {
            delivered: 0,
            missing: Problems::new(),
            unpublishable: Problems::new(),
            mismatches: Problems::new(),
            mismatch_fields: BTreeMap::new(),
        };
        for row in &self.outbox.rows {
            if let Some(reason) = why_unpublishable(row) {
                found.unpublishable.push(max, || Unpublishable {
                    event_id: row.event_id.clone(),
                    order_value: row.order_value.clone(),
                    reason,
                });
                continue;
            }
            let (Some(id), Some(key), Ok(topic)) = (&row.event_id, &row.key, &row.topic) else {
                continue;
            };
            let Some(copies) = self.copies.get(id.as_str()) else {
                found.missing.push(max, || Missing {
                    event_id: id.clone(),
                    key: key.clone(),
                    topic: topic.clone(),
                    order_value: row.order_value.clone(),
                });
                continue;
            };
            found.delivered += 1;
            let mut fields_seen: HashSet<String> = HashSet::new();
            for &ri in copies {
                let rec = &self.records[ri];
                let mut check = |field: String, expected: Option<&[u8]>, actual: Option<&[u8]>| {
                    if expected != actual && fields_seen.insert(field.clone()) {
                        *found.mismatch_fields.entry(field.clone()).or_default() += 1;
                        found.mismatches.push(max, || Mismatch {
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
        found
    }

    /// Records whose event id no row holds, in read order.
    fn unknown_ids(&self, unexpected: &mut Problems<Unexpected>) {
        let mut ids: Vec<&String> = self
            .copies
            .keys()
            .filter(|id| !self.by_id.contains_key(id.as_str()))
            .collect();
        ids.sort_by_key(|id| self.copies[*id][0]);
        for id in ids {
            for &ri in &self.copies[id] {
                let rec = &self.records[ri];
                unexpected.push(self.max, || Unexpected {
                    location: rec.location(),
                    event_id: Some(id.clone()),
                    key: key_text(rec),
                });
            }
        }
    }

    /// Events with more than one record, over everything read (Kafka side).
    fn duplicates(&self) -> Duplicates {
        let records = self.records;
        let mut duplicates = Duplicates {
            events: 0,
            extra_records: 0,
            redeliveries: 0,
            differing: 0,
            examples: Vec::new(),
        };
        let mut dup_ids: Vec<&String> = self
            .copies
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .collect();
        dup_ids.sort_by_key(|id| self.copies[*id][0]);
        for id in dup_ids {
            let c = &self.copies[id];
            let first = &records[c[0]];
            let identical = c.iter().all(|&i| records[i].same_content(first));
            duplicates.events += 1;
            duplicates.extra_records += c.len() as u64 - 1;
            if identical {
                duplicates.redeliveries += 1;
            } else {
                duplicates.differing += 1;
            }
            if duplicates.examples.len() < self.max {
                duplicates.examples.push(Duplicate {
                    event_id: id.clone(),
                    copies: c.len() as u64,
                    identical,
                    locations: c.iter().map(|&i| records[i].location()).collect(),
                });
            }
        }
        duplicates
    }

    /// Keys over several partitions of one topic.
    fn split_keys(&self) -> Problems<SplitKey> {
        let mut split_keys = Problems::new();
        let mut key_parts: BTreeMap<(&str, &[u8]), BTreeSet<i32>> = BTreeMap::new();
        for rec in self.records {
            if let Some(k) = &rec.key {
                key_parts
                    .entry((rec.topic.as_str(), k.as_slice()))
                    .or_default()
                    .insert(rec.partition);
            }
        }
        for ((topic, key), parts) in &key_parts {
            if parts.len() > 1 {
                split_keys.push(self.max, || SplitKey {
                    topic: topic.to_string(),
                    key: String::from_utf8_lossy(key).into_owned(),
                    partitions: parts.iter().copied().collect(),
                });
            }
        }
        split_keys
    }

    /// The rank of a record's event, and how to name it: from the header
    /// with `--order-header`, else from the row's ordering column.
    fn rank(&self, order: &OrderBy, rec: &KafkaRecord, id: &str) -> Option<(OrderKey, String)> {
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
                let row = &self.outbox.rows[*self.by_id.get(id)?];
                let col = self.outbox.order_column.as_deref().unwrap_or("order");
                let col = col.strip_prefix("column ").unwrap_or(col);
                Some((
                    OrderKey::Int(row.rank? as i128),
                    format!("{col} {}", row.order_value.as_deref().unwrap_or("?")),
                ))
            }
        }
    }

    /// Order of each key's first copies within a partition.
    fn order_violations(&self, order: &OrderBy) -> Problems<OrderViolation> {
        let mut violations = Problems::new();
        let mut partitions: BTreeMap<(&str, i32), Vec<&KafkaRecord>> = BTreeMap::new();
        for rec in self.records {
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
                let Some((rank, label)) = self.rank(order, rec, &id) else {
                    continue;
                };
                if let Some((prev, prev_label, prev_id, prev_offset)) = last.get(key) {
                    if *prev > rank {
                        violations.push(self.max, || OrderViolation {
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
        violations
    }
}

/// Why the relay could never have published this row, if it could not.
fn why_unpublishable(row: &OutboxRow) -> Option<String> {
    match (&row.event_id, &row.key, &row.topic) {
        (None, _, _) => Some("the event id is NULL".to_string()),
        (_, None, _) => Some("the key is NULL".to_string()),
        (_, Some(k), _) if k.is_empty() => Some("the key is empty".to_string()),
        (_, _, Err(reason)) => Some(reason.clone()),
        _ => None,
    }
}

fn key_text(rec: &KafkaRecord) -> Option<String> {
    rec.key
        .as_deref()
        .map(|k| String::from_utf8_lossy(k).into_owned())
}
