//! What Kafka says about the lost slot and what the recover writes there:
//! the furthest progress record, the window of the topics to read back, the
//! marker of a recover under way, and the record of the new slot.

use std::time::Duration;

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::pg::sql::sql;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::progress::{self, Progress};
use crate::pipeline::sink::publisher::Publisher;
use crate::pipeline::sink::{KafkaSink, WithReports};

use super::RecoverError;

/// Microseconds since 2000-01-01 (Postgres) to milliseconds since 1970.
pub(super) fn unix_ms(pg_micros: i64) -> i64 {
    (pg_micros + crate::pipeline::decode::pgoutput::PG_EPOCH_OFFSET_SECS * 1_000_000) / 1000
}

/// A Postgres timestamp (µs since 2000) as the server writes it.
pub(super) async fn pg_time_text(client: &Client, micros: i64) -> String {
    client
        .query_one(
            "SELECT (timestamptz '2000-01-01 00:00:00+00' + $1::bigint * interval '1 microsecond')::text",
            &[&micros],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|_| micros.to_string())
}

/// The slot's names in Kafka: the key of its progress records and, with
/// exactly-once, the relay's transactional.id.
pub(super) struct Names {
    pub(super) system_id: String,
    pub(super) slot: String,
    pub(super) key: Vec<u8>,
    pub(super) eos_id: Option<String>,
}

impl Names {
    pub(super) async fn read(client: &Client, cfg: &RelayConfig) -> Result<Names, RecoverError> {
        let system_id: String = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .map_err(sql("reading the system identifier"))?
            .get(0);
        let slot = cfg.slot.clone();
        Ok(Names {
            key: progress::key(&system_id, &slot),
            eos_id: cfg
                .exactly_once
                .as_ref()
                .map(|e| e.transactional_id(&system_id, &slot)),
            system_id,
            slot,
        })
    }

    /// The producer: transactional under exactly-once.
    pub(super) fn producer(&self, cfg: &RelayConfig) -> Result<WithReports, RecoverError> {
        match &self.eos_id {
            Some(id) => KafkaSink::transactional(&cfg.kafka_brokers, &cfg.kafka_properties, id),
            None => KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties),
        }
        .map_err(|e| RecoverError::Config(e.to_string()))
    }

    /// Exactly-once: fences a relay of this id still running somewhere and
    /// aborts what it left open, so nothing of it can become visible behind
    /// the read.
    pub(super) async fn fence(&self, sink: &KafkaSink) -> Result<(), RecoverError> {
        let Some(id) = &self.eos_id else {
            return Ok(());
        };
        sink.init_transactions(Duration::from_secs(60))
            .await
            .map_err(|e| RecoverError::Kafka(format!("registering transactional.id {id}: {e}")))
    }

    pub(super) fn value(&self, p: &Progress) -> Vec<u8> {
        progress::value(p, &self.system_id, &self.slot)
    }
}

/// The furthest progress record of the slot, and when it was written.
pub(super) async fn read_record(
    cfg: &RelayConfig,
    key: &[u8],
    read_timeout: Duration,
) -> Result<(Option<Progress>, Option<i64>), RecoverError> {
    let Some(topic) = &cfg.progress_topic else {
        return Ok((None, None));
    };
    progress::ensure_topic(&cfg.kafka_brokers, &cfg.kafka_properties, topic).await?;
    let (brokers, props, topic, key) = (
        cfg.kafka_brokers.clone(),
        cfg.kafka_properties.clone(),
        topic.clone(),
        key.to_vec(),
    );
    let read = tokio::task::spawn_blocking(move || {
        progress::read_furthest_written(&brokers, &props, &topic, &key, read_timeout)
    })
    .await
    .map_err(|e| RecoverError::Kafka(e.to_string()))??;
    Ok(match read {
        Some((p, at)) => (Some(p), at),
        None => (None, None),
    })
}

/// Where the topics are read back from (ms since the epoch; `None`: whole):
/// `look_back` before the last transaction in Kafka.
pub(super) async fn read_back_from(
    client: &Client,
    recorded: Option<&Progress>,
    written_at: Option<i64>,
    look_back: Duration,
    say: &mut (dyn FnMut(String) + Send),
) -> Option<i64> {
    if let Some(a) = recorded.and_then(|p| p.anchor) {
        say(format!(
            "the last transaction in Kafka committed at {} (commit LSN {}): reading the topics back from {} s before it",
            pg_time_text(client, a.commit_time).await,
            a.commit_lsn,
            look_back.as_secs()
        ));
        return Some(unix_ms(a.commit_time) - look_back.as_millis() as i64);
    }
    // At-least-once records name no transaction, but one was written after
    // everything up to its position was delivered.
    match (recorded, written_at) {
        (Some(p), Some(at)) => {
            say(format!(
                "the progress record confirming {} was written at {} ms since the epoch: reading the topics back from {} s before it",
                p.confirmed,
                at,
                look_back.as_secs()
            ));
            Some(at - look_back.as_millis() as i64)
        }
        _ => {
            say("no progress record: the topics are read back whole".into());
            None
        }
    }
}

/// Writes the marker (`marker`) and waits for it.
pub(super) async fn write_marker(
    publisher: &mut Publisher<'_>,
    cfg: &RelayConfig,
    names: &Names,
    recorded: Option<&Progress>,
) -> Result<Option<Progress>, RecoverError> {
    let Some(topic) = &cfg.progress_topic else {
        return Ok(None);
    };
    let p = marker(recorded, names.eos_id.clone());
    write_record(
        publisher,
        names.eos_id.is_some(),
        topic,
        &names.key,
        &names.value(&p),
    )
    .await
    .map_err(RecoverError::Kafka)?;
    Ok(Some(p))
}

/// The record said before the slot exists: a relay that finds it refuses to
/// stream, and a recover run again knows the slot it finds is the
/// unfinished one's. It keeps the old record's last transaction, so a
/// recover run again reads back the same window.
pub(super) fn marker(recorded: Option<&Progress>, transactional_id: Option<String>) -> Progress {
    let mut p = recorded.cloned().unwrap_or(Progress {
        commit_lsn: None,
        anchor: None,
        timeline: None,
        epoch: 0,
        transactional_id: None,
        recovering: false,
        confirmed: Lsn(0),
    });
    if !p.recovering {
        p.epoch += 1;
    }
    p.recovering = true;
    p.transactional_id = transactional_id;
    p
}

/// The record of a finished recover: a later epoch than any record of the
/// lost slot, so `run` takes the new slot's position as what Kafka holds,
/// wherever the old record points.
pub(super) fn recovered(marker: &Progress, timeline: u32, consistent_point: Lsn) -> Progress {
    Progress {
        commit_lsn: None,
        anchor: None,
        timeline: Some(timeline),
        epoch: marker.epoch + 1,
        transactional_id: marker.transactional_id.clone(),
        recovering: false,
        confirmed: consistent_point,
    }
}

/// Starts the transaction that reads every table in the slot's snapshot.
/// Writes a progress record and waits for it: under exactly-once in a Kafka
/// transaction of its own.
pub(super) async fn write_record(
    publisher: &mut Publisher<'_>,
    transactional: bool,
    topic: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), String> {
    if transactional {
        publisher
            .sink()
            .begin_transaction()
            .map_err(|e| e.to_string())?;
    }
    publisher.record(topic, key, value).await?;
    if transactional {
        commit(publisher).await?;
    }
    Ok(())
}

pub(super) async fn commit(publisher: &Publisher<'_>) -> Result<(), String> {
    publisher
        .sink()
        .commit_transaction(Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
