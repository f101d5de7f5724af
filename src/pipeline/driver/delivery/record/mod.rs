//! Record before confirm: every position the relay sends to Postgres is
//! first in the progress topic, with the broker's acknowledgement (with
//! exactly-once, in the committed Kafka transaction that published up to
//! it). So a relay that reconnects and finds the slot past the position it
//! confirmed can tell a relay of ours that took over (the progress topic
//! records at least that far) from someone who moved the slot by hand over
//! events that may never have been published (review M11).
//!
//! At-least-once writes a record when the checkpoint moved past the last
//! one, one at a time, from the status timer: the slot then follows the
//! checkpoint one acknowledgement later. It reads the topic in the
//! background, so that it streams (and holds the slot) while Kafka is
//! unreachable; until the read is done the slot stays where it was found,
//! and the check of a moved slot waits for it. Owns the slot's key and the
//! recorded position; exactly-once decides when its records go out.

use std::time::Instant;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::history::{self, Anchor, Fork, Forked, Judged, ServerHistory};
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::progress::{self, Progress, ProgressError};

use super::super::errors::PipelineError;

/// At-least-once: how often the record is written again while the
/// position stands still: well within the progress topic's hourly segment.
const RESTATE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Where a relay's records go: the topic, and the key that names the
/// database system and the slot (compaction keeps the last per key).
pub(crate) struct RecordKey {
    pub(crate) topic: String,
    pub(crate) key: Vec<u8>,
    system_id: String,
    slot: String,
}

pub(crate) struct Recorder {
    pub(crate) id: RecordKey,
    /// The most that may be sent to Postgres: the last position recorded
    /// (or where the slot was when the session started).
    pub(crate) recorded: Lsn,
    /// What the topic held when the session started.
    pub(crate) at_start: Option<Progress>,
    /// The commit LSN the next record carries, and that transaction's
    /// anchor (exactly-once's; carried over unchanged by at-least-once).
    pub(crate) commit_lsn: Option<Lsn>,
    pub(crate) anchor: Option<Anchor>,
    /// The server's history as this session found it: the records carry
    /// its timeline, and at-least-once judges the record by it once read.
    pub(crate) server: ServerHistory,
    /// The records' history epoch: one more than the record read when this
    /// session found a fork.
    epoch: u64,
    /// Exactly-once: this relay's transactional.id, which its records name.
    pub(crate) transactional_id: Option<String>,
    /// At-least-once: the position of the record awaiting its report.
    in_flight: Option<Lsn>,
    /// At-least-once: the furthest record read is to be written again, so
    /// that it is also the last (a stale record of a woken relay may follow
    /// it, and compaction keeps only the last); again every `RESTATE_EVERY`.
    restate: bool,
    pub(crate) last_at: Instant,
    /// At-least-once: the read of the topic, while it runs; with the
    /// position this process confirmed before and where the slot was found.
    reading: Option<Reading>,
}

struct Reading {
    task: tokio::task::JoinHandle<Result<Option<Progress>, ProgressError>>,
    resume: Option<Lsn>,
    found: Lsn,
}

impl Drop for Reading {
    /// A session that ends stops its read.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates the topic if missing and reads the slot's furthest record, trying
/// again while Kafka does not answer.
async fn read_retrying(
    cfg: &RelayConfig,
    topic: &str,
    key: &[u8],
) -> Result<Option<Progress>, ProgressError> {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        let attempt = async {
            progress::ensure_topic(&cfg.kafka_brokers, &cfg.kafka_properties, topic).await?;
            read(cfg, topic, key).await
        };
        match attempt.await {
            Ok(p) => return Ok(p),
            Err(e @ (ProgressError::Kafka { .. } | ProgressError::ReadTimeout { .. }))
                if !e.is_authorization() =>
            {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot read the progress topic yet; the slot stays where it is until it can be");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the slot's furthest record: blocking, so on a blocking thread.
async fn read(
    cfg: &RelayConfig,
    topic: &str,
    key: &[u8],
) -> Result<Option<Progress>, ProgressError> {
    let (brokers, props, t, k) = (
        cfg.kafka_brokers.clone(),
        cfg.kafka_properties.clone(),
        topic.to_string(),
        key.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        progress::read_furthest(&brokers, &props, &t, &k, std::time::Duration::from_secs(30))
    })
    .await
    .unwrap_or_else(|_| {
        Err(ProgressError::ReadTimeout {
            topic: topic.to_string(),
            timeout: std::time::Duration::ZERO,
        })
    })
}

impl Recorder {
    fn new(
        cfg: &RelayConfig,
        topic: &str,
        system_id: &str,
        server: &ServerHistory,
        found: Lsn,
    ) -> Recorder {
        Recorder {
            anchor: None,
            server: server.clone(),
            epoch: 0,
            transactional_id: None,
            id: RecordKey {
                topic: topic.to_string(),
                key: progress::key(system_id, &cfg.slot),
                system_id: system_id.to_string(),
                slot: cfg.slot.clone(),
            },
            recorded: found,
            commit_lsn: None,
            at_start: None,
            in_flight: None,
            restate: false,
            last_at: Instant::now(),
            reading: None,
        }
    }

    /// Takes the record read at the start, unless it says a `recover` of
    /// the slot did not finish: streaming from that slot would leave the
    /// events of the gap unpublished for good.
    fn started(&mut self, at_start: Option<Progress>) -> Result<(), PipelineError> {
        if at_start.as_ref().is_some_and(|p| p.recovering) {
            return Err(PipelineError::RecoverUnfinished {
                slot: self.id.slot.clone(),
            });
        }
        if let Some(p) = &at_start {
            self.recorded = self.recorded.max(p.confirmed);
            self.commit_lsn = p.commit_lsn;
            self.anchor = p.anchor;
            self.epoch = p.epoch;
            self.restate = true;
        }
        self.at_start = at_start;
        Ok(())
    }

    /// Exactly-once: reads the slot's furthest committed record now (after
    /// init_transactions).
    pub(crate) async fn start(
        cfg: &RelayConfig,
        topic: &str,
        system_id: &str,
        server: &ServerHistory,
        found: Lsn,
    ) -> Result<Recorder, PipelineError> {
        let mut r = Recorder::new(cfg, topic, system_id, server, found);
        let at_start = read(cfg, topic, &r.id.key).await?;
        r.started(at_start)?;
        Ok(r)
    }

    /// At-least-once, with the slot found moved: reads the topic now (trying
    /// again within `limit`), since only the record can say by whom. Not
    /// read within it is a `ReadTimeout` (retriable: the next session asks
    /// again), never a verdict on the move (review N6).
    pub(crate) async fn start_within(
        cfg: &RelayConfig,
        topic: &str,
        system_id: &str,
        server: &ServerHistory,
        found: Lsn,
        limit: std::time::Duration,
    ) -> Result<Recorder, PipelineError> {
        let mut r = Recorder::new(cfg, topic, system_id, server, found);
        let at_start = tokio::time::timeout(limit, read_retrying(cfg, topic, &r.id.key))
            .await
            .map_err(|_| ProgressError::ReadTimeout {
                topic: topic.to_string(),
                timeout: limit,
            })??;
        r.started(at_start)?;
        Ok(r)
    }

    /// At-least-once: creates the topic if missing and reads it in the
    /// background, trying again while Kafka does not answer.
    pub(crate) fn start_in_background(
        cfg: &RelayConfig,
        topic: &str,
        system_id: &str,
        server: &ServerHistory,
        resume: Option<Lsn>,
        found: Lsn,
    ) -> Recorder {
        let mut r = Recorder::new(cfg, topic, system_id, server, found);
        let (cfg, t, key) = (cfg.clone(), topic.to_string(), r.id.key.clone());
        let task = tokio::spawn(async move { read_retrying(&cfg, &t, &key).await });
        r.reading = Some(Reading {
            task,
            resume,
            found,
        });
        r
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.id.key
    }

    /// The record read at the session's start weighed, once it is read: a
    /// slot someone else moved is refused ([`moved_by_us`]), then the record
    /// is judged against the server's history ([`Recorder::judge`]).
    pub(crate) fn settle(
        &mut self,
        cfg: &RelayConfig,
        metrics: &Metrics,
        resume: Option<Lsn>,
        found: Lsn,
        forked: Option<Forked>,
        doing: &str,
    ) -> Result<Judged, PipelineError> {
        moved_by_us(
            cfg,
            resume,
            found,
            self.at_start.as_ref(),
            self.server.timeline,
        )?;
        Ok(self.judge(metrics, found, forked, doing))
    }

    /// Judges the record read at the session's start against the server
    /// (`pipeline::history`): a fork is said and counted, with what the
    /// relay does about it (`doing`), and the records start a new epoch
    /// whenever the record belongs to another history (`forked`: what an
    /// earlier session of this process found, not counted again).
    pub(crate) fn judge(
        &mut self,
        metrics: &Metrics,
        found: Lsn,
        forked: Option<Forked>,
        doing: &str,
    ) -> Judged {
        let recorded = self.at_start.as_ref().map(Progress::recorded);
        let judged = history::judge(recorded.as_ref(), &self.server, found, forked);
        match judged.fork {
            Some(fork) => self.forked(metrics, fork, found, doing),
            None if judged.again => self.new_history(found),
            None => {}
        }
        judged
    }

    /// A fork found (at the start or in the stream): said, counted, and the
    /// records start a new history from `found`.
    pub(crate) fn forked(&mut self, metrics: &Metrics, fork: Fork, found: Lsn, doing: &str) {
        report_fork(metrics, &self.id.slot, fork, doing);
        self.new_history(found);
    }

    /// The record the session started from belongs to another history:
    /// nothing it says holds on this server. From now on the records say
    /// what this history has, from where the slot was found, under a new
    /// epoch (a record of the old history, further on, must not win).
    fn new_history(&mut self, found: Lsn) {
        self.epoch = self.at_start.as_ref().map_or(0, |p| p.epoch) + 1;
        self.recorded = found;
        self.commit_lsn = None;
        self.anchor = None;
        self.restate = true;
    }

    /// A record's value for `confirmed` (never below what is recorded):
    /// the last transaction in Kafka, if any, and the history it is on.
    pub(crate) fn value(
        &self,
        commit_lsn: Option<Lsn>,
        anchor: Option<Anchor>,
        confirmed: Lsn,
    ) -> Vec<u8> {
        progress::value(
            &Progress {
                commit_lsn,
                anchor,
                timeline: Some(self.server.timeline),
                epoch: self.epoch,
                transactional_id: self.transactional_id.clone(),
                recovering: false,
                confirmed: confirmed.max(self.recorded),
            },
            &self.id.system_id,
            &self.id.slot,
        )
    }
}

mod moved;
mod writes;

pub(crate) use moved::{moved_by_us, report_fork};
pub(crate) use writes::is_progress;
