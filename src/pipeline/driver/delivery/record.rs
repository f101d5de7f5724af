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
use crate::pipeline::sink::transactions::{TxnError, TxnFailure, PROGRESS_TAG};
use crate::pipeline::sink::{Delivered, Enqueued, KafkaSink};
use rdkafka::error::KafkaError;

use super::super::errors::PipelineError;

/// At-least-once: how often the record is written again while the
/// position stands still: well within the progress topic's hourly segment.
const RESTATE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

pub(crate) struct Recorder {
    pub(crate) topic: String,
    key: Vec<u8>,
    system_id: String,
    slot: String,
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
            topic: topic.to_string(),
            key: progress::key(system_id, &cfg.slot),
            system_id: system_id.to_string(),
            slot: cfg.slot.clone(),
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
                slot: self.slot.clone(),
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
        let at_start = read(cfg, topic, &r.key).await?;
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
        let at_start = tokio::time::timeout(limit, read_retrying(cfg, topic, &r.key))
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
        let (cfg, t, key) = (cfg.clone(), topic.to_string(), r.key.clone());
        let task = tokio::spawn(async move { read_retrying(&cfg, &t, &key).await });
        r.reading = Some(Reading {
            task,
            resume,
            found,
        });
        r
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.key
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
        report_fork(metrics, &self.slot, fork, doing);
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
            &self.system_id,
            &self.slot,
        )
    }
}

/// A slot found past the position this process confirmed is fine when the
/// progress topic records at least that far (a relay of ours
/// confirmed it, as a standby that took over); beyond that, someone else
/// moved it over events that may never have been published.
pub(crate) fn moved_by_us(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    found: Lsn,
    recorded: Option<&Progress>,
    timeline: u32,
) -> Result<(), PipelineError> {
    let Some(ours) = resume.filter(|ours| found > *ours) else {
        // Review N10: at a fresh start, a slot past the furthest record
        // of its own history was moved while no relay of ours ran. (On
        // another timeline it is the history's doing: `history` judges
        // that.)
        return match recorded {
            Some(p) if p.timeline == Some(timeline) && found > p.confirmed && resume.is_none() => {
                Err(PipelineError::SlotMovedWhileDown {
                    slot: cfg.slot.clone(),
                    found,
                    recorded: p.confirmed,
                })
            }
            _ => Ok(()),
        };
    };
    match recorded.map(|p| p.confirmed) {
        Some(r) if found <= r => {
            tracing::info!(
                slot = %cfg.slot,
                from = %ours,
                to = %found,
                recorded = %r,
                "the slot moved on under another relay of ours (the progress topic records that position): going on from it"
            );
            Ok(())
        }
        _ => Err(PipelineError::SlotMovedAhead {
            slot: cfg.slot.clone(),
            found,
            ours,
        }),
    }
}

impl Recorder {
    /// At-least-once, on the status timer: finishes the background read of
    /// the topic when it is done, then records `confirmed` when it moved
    /// past the last record and none is in flight (or it is time to write
    /// the record again).
    pub(crate) async fn tick_at_least_once(
        &mut self,
        cfg: &RelayConfig,
        metrics: &Metrics,
        sink: &KafkaSink,
        confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        if let Some(mut reading) = self.reading.take() {
            if !reading.task.is_finished() {
                self.reading = Some(reading);
                return Ok(());
            }
            let at_start = (&mut reading.task).await.unwrap_or_else(|_| {
                Err(ProgressError::ReadTimeout {
                    topic: self.topic.clone(),
                    timeout: std::time::Duration::ZERO,
                })
            })?;
            moved_by_us(
                cfg,
                reading.resume,
                reading.found,
                at_start.as_ref(),
                self.server.timeline,
            )?;
            self.started(at_start)?;
            // At-least-once publishes whatever the stream sends: a fork
            // changes nothing it does, but is said and counted.
            self.judge(
                metrics,
                reading.found,
                None,
                "at-least-once publishes everything the slot sends",
            );
        }
        // Written again now and then even when nothing moved: a stale
        // record of a woken relay may have come after ours, and compaction
        // (hourly segments) would keep only that one.
        let restate = self.restate || self.last_at.elapsed() >= RESTATE_EVERY;
        if self.in_flight.is_some() || (confirmed <= self.recorded && !restate) {
            return Ok(());
        }
        let value = self.value(self.commit_lsn, self.anchor, confirmed);
        if let Enqueued::Yes = sink.enqueue_progress(&self.topic, &self.key, &value)? {
            self.in_flight = Some(confirmed.max(self.recorded));
            self.restate = false;
            self.last_at = Instant::now();
        }
        Ok(())
    }

    /// Whether `confirmed` is recorded: a clean stop waits for it, so that
    /// the slot ends where the deliveries did.
    pub(crate) fn holds_all(&self, confirmed: Lsn) -> bool {
        self.reading.is_some() || self.recorded >= confirmed
    }

    /// The report of a progress record. With exactly-once the commit says
    /// whether it counts; a failure there fails the commit too, and failing
    /// here names the progress topic.
    pub(crate) fn delivered(
        &mut self,
        result: Result<Delivered, KafkaError>,
        exactly_once: bool,
    ) -> Result<(), PipelineError> {
        match result {
            Ok(_) => {
                if let Some(at) = self.in_flight.take() {
                    self.recorded = self.recorded.max(at);
                    self.last_at = Instant::now();
                }
                Ok(())
            }
            // Exactly-once: the transaction fails with it; a new session
            // starts over from the progress topic.
            Err(error) if exactly_once => Err(PipelineError::Transaction(TxnError {
                kind: TxnFailure::Abortable,
                what: "writing the progress record",
                error,
            })),
            Err(error) => Err(PipelineError::Progress(ProgressError::Write {
                topic: self.topic.clone(),
                error,
            })),
        }
    }
}

/// Says and counts a fork between the progress record's history and the
/// server's, and what the relay does about it.
pub(crate) fn report_fork(metrics: &Metrics, slot: &str, fork: Fork, doing: &str) {
    metrics.history_forks.inc();
    tracing::warn!(
        slot,
        fork = %fork,
        "the WAL history forked {fork}: the progress record was written on a history this server does not continue (a restore from a copy, an asynchronous standby promoted, a slot recreated). Positions past the fork are new transactions, never ones already in Kafka: {doing}"
    );
}

/// Whether a report is a progress record's.
pub(crate) fn is_progress(tag: u64) -> bool {
    tag == PROGRESS_TAG
}
