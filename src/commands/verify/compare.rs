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
