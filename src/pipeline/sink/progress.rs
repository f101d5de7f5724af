//! The progress topic of `--delivery exactly-once`: where the relay keeps,
//! in the same Kafka transaction as the events, the commit LSN of the last
//! Postgres transaction those events came from. A read_committed reader of
//! it sees exactly the transactions whose events are visible, so it, not
//! the slot, says what a restart must not publish again.
//!
//! One record per Kafka transaction, keyed by the database's system
//! identifier and the slot, always to partition 0; the topic is compacted,
//! so it keeps about one record per key. Owns the topic's creation and
//! reading it back; the records themselves go out through the sink's
//! transactional producer.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::client::client_config;
use crate::lsn::Lsn;
use crate::pipeline::history::{Anchor, Recorded};

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("progress topic {topic}: {what}: {error}. The relay records each position there before it confirms it: grant this principal Describe, Read and Write on the topic (and Create on the cluster, or create it: one partition, cleanup.policy=compact), or pass --progress-topic off (at-least-once only)")]
    Kafka {
        topic: String,
        what: &'static str,
        error: KafkaError,
    },
    #[error("progress topic {topic} has cleanup.policy={policy}: {why}. Make it compacted alone (kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact) or name another --progress-topic")]
    NotCompacted {
        topic: String,
        policy: String,
        why: &'static str,
    },
    #[error("progress topic {topic}: writing the position to confirm failed: {error}. The slot does not move until a record is written: check that this principal may write to the topic, or pass --progress-topic off (at-least-once only)")]
    Write { topic: String, error: KafkaError },
    #[error("progress topic {topic}: not read to its end within {timeout:?}; check that the brokers are reachable and that this principal may read it")]
    ReadTimeout { topic: String, timeout: Duration },
    #[error("progress topic {topic}: the record for {key} at offset {offset} is not one this relay writes ({reason}); another program writes to the topic: name a topic of the relay's own with --progress-topic")]
    BadRecord {
        topic: String,
        key: String,
        offset: i64,
        reason: String,
    },
}

impl ProgressError {
    /// Refused by the brokers' ACLs: asking again changes nothing.
    pub fn is_authorization(&self) -> bool {
        let error = match self {
            ProgressError::Kafka { error, .. } | ProgressError::Write { error, .. } => error,
            _ => return false,
        };
        matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
            )
        )
    }
}

/// The key of a slot's records: several relays (several databases, several
/// slots) may share one progress topic.
pub fn key(system_id: &str, slot: &str) -> Vec<u8> {
    format!("{system_id}/{slot}").into_bytes()
}

/// What a progress record says about one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The commit LSN of the last Postgres transaction in Kafka; None when
    /// none was published yet.
    pub commit_lsn: Option<Lsn>,
    /// That transaction's xid and commit time, which tell it from another
    /// history's transaction at the same position (`pipeline::history`);
    /// None in records of relays from before they were written.
    pub anchor: Option<Anchor>,
    /// The server's timeline when the record was written (None: as above).
    pub timeline: Option<u32>,
    /// How many forks of the WAL history the slot's records have been
    /// through: a record of a later history wins over any of an earlier
    /// one, whose positions may be further on.
    pub epoch: u64,
    /// Exactly-once: the transactional.id of the relay that wrote it, which
    /// a relay of the same slot with another id fences before it reads on
    /// (review N7).
    pub transactional_id: Option<String>,
    /// Written by `recover` before it creates the slot again, replaced by
    /// its last record: a record still saying so means a recover was
    /// interrupted, and the slot (if any) lacks the events of the gap.
    pub recovering: bool,
    /// The most a relay of ours may have confirmed to the slot: a relay
    /// records a position here, in a committed Kafka transaction, before it
    /// sends it to Postgres. A slot found beyond it was moved by someone
    /// else.
    pub confirmed: Lsn,
}

impl Progress {
    /// What the record says about the history it was written on.
    pub fn recorded(&self) -> Recorded {
        Recorded {
            timeline: self.timeline,
            commit_lsn: self.commit_lsn,
            anchor: self.anchor,
            confirmed: self.confirmed,
        }
    }
}

/// A progress record's value, in JSON a person reading the topic can follow.
pub fn value(p: &Progress, system_id: &str, slot: &str) -> Vec<u8> {
    serde_json::json!({
        "commit_lsn": p.commit_lsn.map(|l| l.to_string()),
        "xid": p.anchor.map(|a| a.xid),
        "commit_time": p.anchor.map(|a| a.commit_time),
        "timeline": p.timeline,
        "epoch": p.epoch,
        "transactional_id": p.transactional_id,
        "recovering": p.recovering,
        "confirmed": p.confirmed.to_string(),
        "system_id": system_id,
        "slot": slot,
    })
    .to_string()
    .into_bytes()
}

/// A progress record's value read back.
pub fn parse(value: &[u8]) -> Result<Progress, String> {
    let v: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let lsn = |field: &str| -> Result<Option<Lsn>, String> {
        match &v[field] {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(s) => {
                s.parse().map(Some).map_err(|e| format!("{field}: {e}"))
            }
            _ => Err(format!("{field} is not an LSN")),
        }
    };
    let number = |field: &str| -> Result<Option<i64>, String> {
        match &v[field] {
            serde_json::Value::Null => Ok(None),
            n => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("{field} is not a number")),
        }
    };
    let commit_lsn = lsn("commit_lsn")?;
    let xid = number("xid")?
        .map(|x| u32::try_from(x).map_err(|_| format!("xid {x} out of range")))
        .transpose()?;
    let anchor = match (commit_lsn, xid, number("commit_time")?) {
        (Some(commit_lsn), Some(xid), Some(commit_time)) => Some(Anchor {
            commit_lsn,
            xid,
            commit_time,
        }),
        _ => None,
    };
    let timeline = number("timeline")?
        .map(|t| u32::try_from(t).map_err(|_| format!("timeline {t} out of range")))
        .transpose()?;
    let epoch = number("epoch")?
        .map(|e| u64::try_from(e).map_err(|_| format!("epoch {e} out of range")))
        .transpose()?
        .unwrap_or(0);
    let transactional_id = match &v["transactional_id"] {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        _ => return Err("transactional_id is not a string".into()),
    };
    Ok(Progress {
        commit_lsn,
        anchor,
        timeline,
        epoch,
        transactional_id,
        recovering: v["recovering"].as_bool().unwrap_or(false),
        confirmed: lsn("confirmed")?.ok_or("no confirmed position")?,
    })
}

/// Creates the topic if it does not exist (one partition, compacted, as
/// many replicas as the cluster has brokers, up to 3), and refuses one that
/// is not compacted, or also deletes.
pub async fn ensure_topic(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
) -> Result<(), ProgressError> {
    let err = |what: &'static str| {
        move |error: KafkaError| ProgressError::Kafka {
            topic: topic.to_string(),
            what,
            error,
        }
    };
    let cfg = client_config(brokers, "outbox-relay-progress", &[], properties);
    let admin: AdminClient<DefaultClientContext> = cfg.create().map_err(err("admin client"))?;
    let probe_cfg = cfg.clone();
    let probe_topic = topic.to_string();
    let (exists, brokers_seen) = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = probe_cfg.create()?;
        let md = c.fetch_metadata(Some(&probe_topic), Duration::from_secs(10))?;
        let exists = md
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        Ok::<_, KafkaError>((exists, md.brokers().len()))
    })
    .await
    .map_err(|_| err("metadata")(KafkaError::Canceled))?
    .map_err(err("metadata"))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    if !exists {
        let replicas = brokers_seen.clamp(1, 3) as i32;
        let new = NewTopic::new(topic, 1, TopicReplication::Fixed(replicas))
            .set("cleanup.policy", "compact")
            // The active segment is never compacted: roll it hourly.
            .set("segment.ms", "3600000")
            .set("min.cleanable.dirty.ratio", "0.1");
        let created = admin
            .create_topics(&[new], &opts)
            .await
            .map_err(err("creating it"))?;
        for r in created {
            match r {
                Ok(_) => tracing::info!(topic, replicas, "created the progress topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(err("creating it")(KafkaError::AdminOp(code))),
            }
        }
    }
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(err("describing it"))?;
    let policy = described
        .into_iter()
        .filter_map(Result::ok)
        .flat_map(|r| r.entries)
        .find(|e| e.name == "cleanup.policy")
        .and_then(|e| e.value);
    let has = |p: &str, what: &str| p.split(',').any(|x| x.trim() == what);
    match policy {
        Some(p) if !has(&p, "compact") => Err(ProgressError::NotCompacted {
            topic: topic.to_string(),
            policy: p,
            why: "without compaction it grows by one record per Kafka transaction",
        }),
        // Review N9: a quiet slot's only record would expire, and with it
        // what Kafka holds (exactly-once) and what a relay of ours confirmed.
        Some(p) if has(&p, "delete") => Err(ProgressError::NotCompacted {
            topic: topic.to_string(),
            policy: p,
            why: "with delete, a slot's only record expires after retention.ms while the outbox is quiet, and a restart then no longer knows what Kafka holds",
        }),
        _ => Ok(()),
    }
}

/// The furthest committed progress record of the slot, read with
/// read_committed up to the last stable offset. Blocking.
///
/// The furthest, not the last: a relay that wakes from a pause (SIGSTOP, a
/// stalled VM) may write one record of its old session, behind where the
/// relay that took over recorded, before it notices its walsender is gone.
/// Every record was true when written and the slot never moves back, so
/// the furthest says the most. (Compaction keeps only the last: so an
/// at-least-once session writes the furthest again once it has read it.)
///
/// Call it after `init_transactions`: that aborts (or waits out) whatever a
/// previous producer with the same id left open, which would otherwise
/// commit after this read.
pub fn read_furthest(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    key: &[u8],
    timeout: Duration,
) -> Result<Option<Progress>, ProgressError> {
    read_furthest_written(brokers, properties, topic, key, timeout).map(|r| r.map(|(p, _)| p))
}

/// [`read_furthest`], with when that record was written (its Kafka
/// timestamp, ms since the epoch), which says when its position was
/// confirmed at the latest.
pub fn read_furthest_written(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    key: &[u8],
    timeout: Duration,
) -> Result<Option<(Progress, Option<i64>)>, ProgressError> {
    let err = |what: &'static str| {
        move |error: KafkaError| ProgressError::Kafka {
            topic: topic.to_string(),
            what,
            error,
        }
    };
    let consumer: BaseConsumer = client_config(brokers, "outbox-relay-progress", &[], properties)
        // Required by librdkafka for a consumer; nothing is committed.
        .set("group.id", "outbox-relay-progress")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(err("consumer"))?;
    // On a read_committed client the high watermark is the last stable
    // offset: everything before it is decided.
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map_err(err("watermarks"))?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))
        .map_err(err("assigning"))?;
    consumer.assign(&tpl).map_err(err("assigning"))?;
    let deadline = Instant::now() + timeout;
    let mut furthest: Option<(Progress, Option<i64>)> = None;
    loop {
        if Instant::now() > deadline {
            return Err(ProgressError::ReadTimeout {
                topic: topic.to_string(),
                timeout,
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            // The last offsets are commit markers, never handed out: the
            // end shows as EOF, not as the record at high - 1.
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(err("reading")(e)),
            Some(Ok(m)) => {
                if m.key() == Some(key) {
                    let p = parse(m.payload().unwrap_or_default()).map_err(|reason| {
                        ProgressError::BadRecord {
                            topic: topic.to_string(),
                            key: String::from_utf8_lossy(key).into_owned(),
                            offset: m.offset(),
                            reason,
                        }
                    })?;
                    let at = m.timestamp().to_millis();
                    furthest = Some(match furthest.take() {
                        Some((f, f_at)) if further(f.clone(), p.clone()) == f => (f, f_at),
                        _ => (p, at),
                    });
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
        }
    }
    Ok(furthest)
}

/// Of two records of one slot, the one that says more; the later on a tie.
/// A later history says more than any position of an earlier one.
fn further(a: Progress, b: Progress) -> Progress {
    if (a.epoch, a.confirmed, a.commit_lsn) > (b.epoch, b.confirmed, b.commit_lsn) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_reads_back_as_written() {
        let at = "16/B374D848".parse().unwrap();
        let p = Progress {
            commit_lsn: Some(at),
            anchor: Some(Anchor {
                commit_lsn: at,
                xid: 4_000_000_000,
                commit_time: 851_000_000_000_000,
            }),
            timeline: Some(3),
            epoch: 2,
            transactional_id: Some("outbox-relay-7312-outbox_relay".into()),
            recovering: true,
            confirmed: "16/B374D900".parse().unwrap(),
        };
        assert_eq!(parse(&value(&p, "7312", "outbox_relay")), Ok(p.clone()));
        let none_yet = Progress {
            commit_lsn: None,
            anchor: None,
            transactional_id: None,
            ..p.clone()
        };
        assert_eq!(parse(&value(&none_yet, "7312", "s")), Ok(none_yet));
        // A record of a relay from before the history fields.
        let old = br#"{"commit_lsn":"0/10","confirmed":"0/20","system_id":"1","slot":"s"}"#;
        let old = parse(old).unwrap();
        assert_eq!(
            (
                old.commit_lsn,
                old.anchor,
                old.timeline,
                old.epoch,
                old.recovering
            ),
            (Some(Lsn(16)), None, None, 0, false)
        );
        let later = Progress {
            epoch: 3,
            confirmed: Lsn(1),
            ..p.clone()
        };
        assert_eq!(further(p.clone(), later.clone()), later);
        assert_eq!(further(later.clone(), p), later);
        assert!(parse(b"{}").is_err());
        assert!(parse(b"not json").is_err());
        assert_eq!(key("7312", "s"), b"7312/s".to_vec());
    }
}
