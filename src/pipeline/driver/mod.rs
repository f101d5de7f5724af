//! The pipeline: replication source → pgoutput decoder → router → Kafka sink
//! → LSN checkpoint, driven by one task.
//!
//! One task owns every stage, so the order in which WAL messages are decoded,
//! routed and enqueued is the commit order, and the checkpoint needs no lock.
//! The task waits on three things at once: the next WAL message (only while
//! fewer than `max_inflight` events are unacknowledged: backpressure), the
//! producer's delivery reports, and a timer that sends standby status updates
//! — even while reading is paused, so a slow broker never gets the walsender
//! killed for replication timeout.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use crate::config::RelayConfig;
use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pg::quote_ident;
use crate::pipeline::checkpoint::{Checkpoint, CheckpointError, TxnSeq};
use crate::pipeline::decode::pgoutput::{self, DecodeError, LogicalMessage};
use crate::pipeline::decode::stream_buffer::{self, StreamBuffer, StreamBufferError};
use crate::pipeline::policy::{self, ErrorKind, ErrorPolicy, Failed, Policy};
use crate::pipeline::route::messages::MessageConfig;
use crate::pipeline::route::router::{OutboxRecord, RouteError, Routed, Router};
use crate::pipeline::sink::inflight::InFlight;
use crate::pipeline::sink::{Ack, Enqueued, KafkaSink, SinkError};
use crate::pipeline::source::{
    quote_literal, ConnectParams, ReplicationConnection, ReplicationError, ReplicationMessage,
    ReplicationReader, ReplicationWriter,
};

/// How often the task checks whether the confirmed position moved; bounds the
/// delay between an acknowledgement and the slot moving.
const FEEDBACK_TICK: Duration = Duration::from_millis(100);

/// Most WAL messages handled per turn of the loop when they are already
/// buffered; delivery reports and status updates get their turn in between.
const READ_BURST: usize = 1024;

/// How long a lone "too large" delivery report waits for others of its
/// batch before it counts as a record too large by itself.
const TOO_LARGE_SETTLE: Duration = Duration::from_millis(300);

/// Changes of a committed streamed transaction handed over per turn of the
/// loop.
const REPLAY_SLICE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("cannot decode the pgoutput message at {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error("cannot route the change at {lsn}: {source}")]
    Route {
        lsn: Lsn,
        #[source]
        source: RouteError,
    },
    #[error("replication stream out of order: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Delivery(Box<DeliveryFailure>),
    #[error("{0}")]
    Publication(String),
    #[error("streamed transaction: {0}")]
    Stream(#[from] StreamBufferError),
    #[error("replication slot {slot:?} does not exist: run `outbox-relay setup` first")]
    SlotMissing { slot: String },
    #[error("replication slot {slot:?} uses plugin {plugin:?}, not pgoutput: drop it or choose another --slot")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot {slot:?} is at {found}, past {ours}, the position this relay had confirmed: something advanced the slot over events that were never delivered. Check who moved it (pg_replication_slot_advance, another consumer of the slot such as a second relay that took over and released it), publish the events between {ours} and {found} from the table, then restart")]
    SlotMovedAhead { slot: String, found: Lsn, ours: Lsn },
    #[error("replication slot {slot:?} was invalidated (wal_status = 'lost'): the WAL it needed was removed (max_slot_wal_keep_size). Events committed while it was lost cannot be streamed: drop and recreate the slot (outbox-relay setup), then republish pending rows from the table")]
    SlotInvalidated { slot: String },
    #[error("shutdown timed out with {inflight} events unacknowledged; the slot stays at {confirmed} and they will be sent again")]
    ShutdownTimeout { inflight: u64, confirmed: Lsn },
    #[error("the server ended the replication stream")]
    ServerEnded,
    #[error("a delivery report for record {0}, which this session does not track")]
    UnknownDelivery(u64),
    #[error(transparent)]
    BatchTooLarge(Box<BatchTooLarge>),
    #[error("{0}")]
    Config(String),
}

impl PipelineError {
    /// Whether a new session (fresh connection and producer, resuming from the
    /// slot) can be expected to succeed. Everything else needs a person: a
    /// bad row, a missing slot, a configuration the server refuses.
    /// The bad-event kind that stopped the relay (`too-large`,
    /// `authorization`, …, the names `--on-error-override` takes), when a
    /// bad event under `halt` is what stopped it.
    pub fn bad_event_kind(&self) -> Option<ErrorKind> {
        match self {
            PipelineError::Route { source, .. } => ErrorKind::of_route(source),
            PipelineError::Delivery(f) => ErrorKind::of_kafka(&f.error),
            PipelineError::Sink(SinkError::Enqueue { error, .. }) => ErrorKind::of_kafka(error),
            _ => None,
        }
    }

    pub fn is_retriable(&self) -> bool {
        match self {
            PipelineError::Replication(e) => match e {
                ReplicationError::Connect { .. }
                | ReplicationError::Io(_)
                | ReplicationError::Closed => true,
                ReplicationError::Server(s) => {
                    // 55006: slot active for another PID (a standby waits);
                    // 57P0x: administrator/crash shutdown, server starting;
                    // 08xxx: connection failures; 53300: too many connections
                    // or walsenders; 40001/40P01 cannot happen here but are
                    // transient by definition.
                    matches!(
                        s.code.as_str(),
                        "55006" | "57P01" | "57P02" | "57P03" | "53300"
                    ) || s.code.starts_with("08")
                }
                ReplicationError::Auth(_)
                | ReplicationError::Protocol(_)
                | ReplicationError::Config(_) => false,
            },
            PipelineError::Delivery(d) => delivery_is_retriable(&d.error),
            PipelineError::ServerEnded => true,
            _ => false,
        }
    }

    /// "replication slot … is active for PID …": another connection has it.
    pub fn slot_in_use(&self) -> bool {
        matches!(self, PipelineError::Replication(ReplicationError::Server(s)) if s.code == "55006")
    }

    /// An operator's next step for a server error, where one is known.
    pub fn hint(&self) -> Option<String> {
        let PipelineError::Replication(ReplicationError::Server(s)) = self else {
            return None;
        };
        match s.code.as_str() {
            "55006" => Some(format!(
                "another connection holds the slot ({}); this relay waits and retries, so it is a standby. If that connection is a stale walsender, end it with pg_terminate_backend(pid) or start with --terminate-stale-walsender",
                s.message
            )),
            "42501" => Some("the role needs the REPLICATION attribute: ALTER ROLE <role> REPLICATION (see sql/04_relay_role.sql)".into()),
            "53300" => Some("the server has no free walsender or connection: raise max_wal_senders / max_connections or stop an unused replication client".into()),
            "42704" => Some("the replication slot or publication does not exist: run `outbox-relay setup`".into()),
            _ => None,
        }
    }
}

/// Delivery errors a fresh producer can overcome (the idempotent producer
/// lost its state or hit a fatal error; timeouts only if librdkafka reports
/// one although the relay runs with message.timeout.ms=0). Anything else
/// (too large, not authorised, invalid topic) fails again on the same
/// record, so retrying would loop.
fn delivery_is_retriable(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::RequestTimedOut
                | C::NetworkException
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
                | C::InvalidProducerEpoch
                | C::Fatal
                | C::PurgeQueue
                | C::PurgeInflight
        )
    )
}

/// Records the broker refused together as one batch too large for the topic.
#[derive(Debug, thiserror::Error)]
#[error("Kafka refused a batch of {records} records for topic {topic} as too large (transaction committed at {commit_lsn}): {error}. The topic's max.message.bytes is below the producer's batch size, so events that fit one by one failed together; nothing was dead-lettered and the slot stays at {confirmed}. Set --kafka-property batch.size=N below the topic's max.message.bytes (minus about 100 bytes of batch overhead), or raise the topic's max.message.bytes, then restart")]
pub struct BatchTooLarge {
    pub topic: String,
    pub records: usize,
    pub commit_lsn: String,
    pub error: KafkaError,
    pub confirmed: Lsn,
}

/// A record the broker did not accept after the client's own retries.
#[derive(Debug, thiserror::Error)]
#[error("Kafka did not accept an event for topic {topic} (transaction committed at {commit_lsn}): {error}; the slot stays at {confirmed}, so the event will be sent again after a restart")]
pub struct DeliveryFailure {
    pub topic: String,
    pub commit_lsn: String,
    pub error: KafkaError,
    pub confirmed: Lsn,
}

/// Figures of one run, for the exit log line and tests.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The session got as far as streaming (it held the slot).
    pub streamed: bool,
    pub events: u64,
    pub transactions: u64,
    pub confirmed: Lsn,
}

/// Parses a Postgres duration setting (`60s`, `1min`, `500ms`, `0`).
pub fn parse_pg_duration(s: &str) -> Option<Duration> {
    crate::config::parse_duration(s, crate::config::BareNumber::Millis).ok()
}

struct Slot {
    confirmed: Lsn,
    active_pid: Option<i32>,
}

async fn check_slot(conn: &mut ReplicationConnection, slot: &str) -> Result<Slot, PipelineError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT coalesce(plugin, ''), coalesce(confirmed_flush_lsn::text, '0/0'), active_pid::text, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| PipelineError::SlotMissing { slot: slot.into() })?;
    let plugin = row.first().cloned().flatten().unwrap_or_default();
    if plugin != "pgoutput" {
        return Err(PipelineError::WrongPlugin {
            slot: slot.into(),
            plugin,
        });
    }
    let field = |i: usize| row.get(i).cloned().flatten();
    if field(3).as_deref() == Some("lost") {
        return Err(PipelineError::SlotInvalidated { slot: slot.into() });
    }
    let confirmed = field(1).and_then(|s| s.parse().ok()).unwrap_or_default();
    let active_pid = field(2).and_then(|s| s.parse().ok());
    Ok(Slot {
        confirmed,
        active_pid,
    })
}

/// The publication must exist, publish inserts and cover the outbox table:
/// otherwise the stream is silently empty and events would never arrive.
async fn check_publication(
    conn: &mut ReplicationConnection,
    cfg: &RelayConfig,
) -> Result<(), PipelineError> {
    let table = &cfg.router.table;
    let rows = conn
        .simple_query(&format!(
            "SELECT p.pubinsert::text, EXISTS (SELECT 1 FROM pg_publication_tables t
                      WHERE t.pubname = p.pubname AND t.schemaname = {0} AND t.tablename = {1})::text,
                    (p.pubviaroot OR NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = {0} AND c.relname = {1} AND c.relkind = 'p'))::text
               FROM pg_publication p WHERE p.pubname = {2}",
            quote_literal(&table.schema),
            quote_literal(&table.name),
            quote_literal(&cfg.publication)
        ))
        .await?;
    let problem = match rows.first() {
        None => Some(format!(
            "publication {:?} does not exist: run `outbox-relay setup`",
            cfg.publication
        )),
        Some(row) if row.first().cloned().flatten().as_deref() != Some("true") => Some(format!(
            "publication {0:?} does not publish inserts: ALTER PUBLICATION {1} SET (publish = 'insert')",
            cfg.publication,
            quote_ident(&cfg.publication)
        )),
        Some(row) if row.get(2).cloned().flatten().as_deref() != Some("true") => Some(
            crate::commands::setup::partitions_by_name(&cfg.publication, &table.to_string()),
        ),
        Some(row) if row.get(1).cloned().flatten().as_deref() != Some("true") => Some(format!(
            "publication {0:?} does not cover the outbox table {table}: ALTER PUBLICATION {1} ADD TABLE {2} (or run `outbox-relay setup`)",
            cfg.publication,
            quote_ident(&cfg.publication),
            table.quoted()
        )),
        Some(_) => None,
    };
    match problem {
        Some(p) => Err(PipelineError::Publication(p)),
        None => Ok(()),
    }
}

/// With --terminate-stale-walsender: ends the walsender holding the slot only
/// if its client has gone quiet, no status update for twice our status
/// interval (at least 5 s). A live relay reports at least that often, so two
/// relays started with the flag never terminate each other's walsenders (a
/// live holder makes this one a standby); a hung or half-open client that
/// the server has not timed out yet is ended.
async fn terminate_if_stale(
    conn: &mut ReplicationConnection,
    slot: &str,
    pid: i32,
    status_interval: Duration,
) -> Result<(), PipelineError> {
    let quiet = (status_interval * 2).max(Duration::from_secs(5));
    let rows = conn
        .simple_query(&format!(
            "SELECT (coalesce(reply_time, backend_start) < now() - interval '{} milliseconds')::text
               FROM pg_stat_replication WHERE pid = {pid}",
            quiet.as_millis()
        ))
        .await?;
    let stale = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .is_none_or(|v| v == "true");
    if !stale {
        tracing::info!(
            slot = %slot,
            pid,
            "the walsender holding the slot has a live client (it reported within {}s): not terminating it; waiting as a standby",
            quiet.as_secs()
        );
        return Ok(());
    }
    tracing::warn!(
        slot = %slot,
        pid,
        "terminating the walsender holding the slot: its client sent nothing for {}s (--terminate-stale-walsender)",
        quiet.as_secs()
    );
    conn.simple_query(&format!("SELECT pg_terminate_backend({pid})"))
        .await?;
    Ok(())
}

/// An event handed to the producer, until its delivery report arrives.
struct Pending {
    txn: TxnSeq,
    enqueued: Instant,
    commit_time: i64,
    event_type: Option<bytes::Bytes>,
    /// Position of the change, for dead-letter headers.
    lsn: Lsn,
    /// Kept only while a delivery failure could be dead-lettered.
    record: Option<OutboxRecord>,
    dead_letter: bool,
    /// Key and payload bytes, for the in-flight byte budget.
    size: u64,
}

/// A record counted in the checkpoint that librdkafka's full queue could not
/// take yet.
struct Waiting {
    rec: OutboxRecord,
    txn: TxnSeq,
    lsn: Lsn,
    is_dead_letter: bool,
}

/// A committed streamed transaction being handed to the pipeline.
struct Replaying {
    replay: stream_buffer::Replay,
    decoder: pgoutput::Decoder,
    end_lsn: Lsn,
}

struct State {
    /// Buffers streamed in-progress transactions (with --streaming).
    stream: Option<StreamBuffer>,
    replaying: Option<Replaying>,
    /// The slot's confirmed position when this session started.
    resumed_from: Lsn,
    first_begin_seen: bool,
    router: Router,
    checkpoint: Checkpoint,
    sink: KafkaSink,
    acks: mpsc::UnboundedReceiver<Ack>,
    summary: Summary,
    metrics: Arc<Metrics>,
    /// Events in flight by delivery tag. Bounded by `max_inflight`.
    pending: InFlight<Pending>,
    /// Commit timestamp of the open transaction (from Begin).
    commit_time: i64,
    /// The newest server WAL position the walsender reported.
    server_wal: Lsn,
    published: HashMap<Option<bytes::Bytes>, Counter>,
    /// The counter of the last event type acknowledged: consecutive events
    /// mostly share a type, and comparing a few bytes beats hashing them.
    last_published: Option<(Option<bytes::Bytes>, Counter)>,
    /// Clock readings shared by a batch of delivery reports.
    ack_clock: (Instant, i64),
    decoder: pgoutput::Decoder,
    /// Logical decoding messages as events, when configured.
    messages: Option<MessageConfig>,
    /// Key and payload bytes handed to the producer and not yet acknowledged.
    inflight_bytes: u64,
    policy: ErrorPolicy,
    /// Keep records in flight, because a delivery failure may be dead-lettered.
    keep_records: bool,
    /// Event types seen, owned: an in-flight event holds a shared handle to
    /// its type instead of a copy of its own (which would cost an allocation
    /// per event; a slice of the WAL buffer would pin the buffer).
    event_types: std::collections::HashSet<bytes::Bytes>,
    /// Dead-letter records waiting to be enqueued (from delivery reports).
    redo: Vec<(OutboxRecord, TxnSeq, Lsn)>,
    /// Skipped-row counters by table (a handful of tables at most: those
    /// the publication covers).
    skipped: HashMap<Arc<str>, Counter>,
    /// Records the producer's full queue could not take yet, in order;
    /// nothing more is read until they are enqueued.
    waiting: VecDeque<Waiting>,
    /// Records the broker refused as too large, until the reports that came
    /// with them are in (see `settle_too_large`).
    too_large: Vec<(Pending, String, KafkaError)>,
    too_large_since: Instant,
    /// Topics already handed to the probe, and the last one of them.
    noted_topics: std::collections::HashSet<Arc<str>>,
    last_noted_topic: Option<Arc<str>>,
    /// Of this session's spilled bytes, those already added to the counter.
    spilled_counted: u64,
}

impl State {
    fn on_ack(&mut self, ack: Ack) -> Result<(), PipelineError> {
        let pending = self
            .pending
            .take(ack.tag)
            .ok_or(PipelineError::UnknownDelivery(ack.tag))?;
        self.inflight_bytes -= pending.size;
        match ack.result {
            Ok(d) => {
                tracing::trace!(partition = d.partition, offset = d.offset, "delivered");
                self.checkpoint.ack(pending.txn)?;
                self.metrics.set_broker_reachable(true);
                if pending.dead_letter {
                    // Counted once, as dead-lettered, not also as published.
                    self.metrics.dead_lettered.inc();
                } else {
                    let counter = match &self.last_published {
                        Some((t, c)) if *t == pending.event_type => c.clone(),
                        _ => {
                            let c = match self.published.get(&pending.event_type) {
                                Some(c) => c.clone(),
                                None => {
                                    let c = self.metrics.published(&label(&pending.event_type));
                                    // Bounded as the interned types are.
                                    if self.published.len() < MAX_EVENT_TYPES {
                                        self.published
                                            .insert(pending.event_type.clone(), c.clone());
                                    }
                                    c
                                }
                            };
                            self.last_published = Some((pending.event_type.clone(), c.clone()));
                            c
                        }
                    };
                    counter.inc();
                }
                // Timed at the delivery report, not when the loop got to it:
                // the figures are the broker's, without the pipeline's queue.
                let (now, pg_now) = self.ack_clock;
                let acked_pg = pg_now - now.saturating_duration_since(ack.at).as_micros() as i64;
                self.metrics.publish_duration.observe(
                    ack.at
                        .saturating_duration_since(pending.enqueued)
                        .as_secs_f64(),
                );
                let since_commit = (acked_pg - pending.commit_time) as f64 / 1e6;
                self.metrics.commit_to_ack.observe(since_commit.max(0.0));
                Ok(())
            }
            Err(error) => {
                self.metrics
                    .publish_error(&label(&pending.event_type), &kafka_code(&error));
                let kind = ErrorKind::of_kafka(&error)
                    .filter(|k| self.policy.for_kind(*k) == Policy::DeadLetter);
                // The broker judges max.message.bytes per record batch: a
                // refused batch fails every record in it, small ones too.
                // Decide once the reports that came together are in
                // (`settle_too_large`): one record alone was too large by
                // itself; several were a batch.
                if kind == Some(ErrorKind::TooLarge)
                    && pending.record.is_some()
                    && !pending.dead_letter
                    && matches!(
                        error.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
                    )
                {
                    if self.too_large.is_empty() {
                        self.too_large_since = Instant::now();
                    }
                    self.too_large.push((pending, ack.topic, error));
                    return Ok(());
                }
                if let (Some(kind), false) = (kind, pending.dead_letter) {
                    if self.dead_letter_delivery(&pending, kind, &ack.topic, &error)? {
                        return Ok(());
                    }
                }
                Err(PipelineError::Delivery(Box::new(DeliveryFailure {
                    topic: ack.topic,
                    commit_lsn: self.commit_lsn_text(pending.txn),
                    error,
                    confirmed: self.checkpoint.confirmed(),
                })))
            }
        }
    }

    /// Replaces a record whose delivery failed with its dead-letter record,
    /// queued for `flush_redo`. The dead-letter record is counted before the
    /// failed one is released, so the transaction cannot be confirmed in
    /// between. False when the record was not kept (nothing to dead-letter).
    fn dead_letter_delivery(
        &mut self,
        pending: &Pending,
        kind: ErrorKind,
        topic: &str,
        error: &KafkaError,
    ) -> Result<bool, PipelineError> {
        let Some(rec) = &pending.record else {
            return Ok(false);
        };
        self.checkpoint.add_event(pending.txn)?;
        self.checkpoint.ack(pending.txn)?;
        let reason = format!("Kafka refused the record for {topic}: {error}");
        tracing::warn!(lsn = %pending.lsn, kind = %kind, "dead-lettering an event: {reason}");
        let dlq = policy::dead_letter(
            Failed::from(rec),
            kind,
            &reason,
            pending.lsn,
            &self.policy.dead_letter_topic,
        );
        self.redo.push((dlq, pending.txn, pending.lsn));
        Ok(true)
    }

    /// A tracked transaction's commit LSN for an error message.
    fn commit_lsn_text(&self, txn: TxnSeq) -> String {
        self.checkpoint
            .commit_lsn_of(txn)
            .map(|l| l.to_string())
            .unwrap_or_else(|| "?".into())
    }

    /// Hands a record to the producer, tracked for its delivery report. The
    /// checkpoint must already count it as an event of `txn`. A record the
    /// producer refuses outright (too large, say) goes to the error policy.
    ///
    /// When librdkafka's local queue is full the record waits, in order, in
    /// `waiting`, and reading pauses until delivery reports make room: the
    /// loop goes on sending status updates and watching for a stop meanwhile
    /// (backpressure, never a wait inside this call).
    async fn enqueue_tracked(
        &mut self,
        rec: OutboxRecord,
        txn: TxnSeq,
        lsn: Lsn,
        is_dead_letter: bool,
    ) -> Result<(), PipelineError> {
        let w = Waiting {
            rec,
            txn,
            lsn,
            is_dead_letter,
        };
        if !self.waiting.is_empty() {
            self.waiting.push_back(w);
            return Ok(());
        }
        if let Some(w) = self.try_enqueue(w)? {
            self.waiting.push_back(w);
        }
        Ok(())
    }

    /// Enqueues records that waited for room, oldest first, until the queue
    /// is full again.
    fn pump_waiting(&mut self) -> Result<(), PipelineError> {
        while let Some(w) = self.waiting.pop_front() {
            if let Some(w) = self.try_enqueue(w)? {
                self.waiting.push_front(w);
                break;
            }
        }
        Ok(())
    }

    /// One attempt to hand a record to the producer; gives it back when the
    /// local queue is full.
    fn try_enqueue(&mut self, w: Waiting) -> Result<Option<Waiting>, PipelineError> {
        let Waiting {
            mut rec,
            txn,
            lsn,
            mut is_dead_letter,
        } = w;
        loop {
            let tag = self.pending.push(Pending {
                txn,
                enqueued: Instant::now(),
                commit_time: self.commit_time,
                event_type: rec
                    .event_type
                    .as_deref()
                    .map(|t| intern(&mut self.event_types, t)),
                lsn,
                record: (self.keep_records && !is_dead_letter).then(|| rec.detached()),
                dead_letter: is_dead_letter,
                size: record_size(&rec),
            });
            self.inflight_bytes += record_size(&rec);
            let outcome = self.sink.enqueue(&rec, tag);
            if matches!(outcome, Ok(Enqueued::Yes)) {
                // The producer has asked about this topic itself by now, so
                // the probe may too (see Prober::probe). The router shares
                // one name among a run of records: mostly a pointer check.
                let same = self
                    .last_noted_topic
                    .as_ref()
                    .is_some_and(|t| Arc::ptr_eq(t, &rec.topic));
                if !same {
                    if !self.noted_topics.contains(&rec.topic) {
                        self.sink.note_topic(&rec.topic);
                        if self.noted_topics.len() < crate::pipeline::sink::MAX_PROBED_TOPICS {
                            self.noted_topics.insert(rec.topic.clone());
                        }
                    }
                    self.last_noted_topic = Some(rec.topic.clone());
                }
                return Ok(None);
            }
            // Not enqueued: forget the tracking entry (it is the newest).
            if let Some(p) = self.pending.undo_push() {
                self.inflight_bytes -= p.size;
            }
            let (topic, error) = match outcome {
                Ok(Enqueued::Yes) => unreachable!("handled above"),
                Ok(Enqueued::QueueFull) => {
                    return Ok(Some(Waiting {
                        rec,
                        txn,
                        lsn,
                        is_dead_letter,
                    }))
                }
                Err(SinkError::Enqueue { topic, error }) => (topic, error),
                Err(e) => return Err(e.into()),
            };
            self.metrics
                .publish_error(&label(&rec.event_type), &kafka_code(&error));
            let kind = ErrorKind::of_kafka(&error)
                .filter(|k| !is_dead_letter && self.policy.for_kind(*k) == Policy::DeadLetter);
            let Some(kind) = kind else {
                return Err(SinkError::Enqueue { topic, error }.into());
            };
            let reason = format!("the producer refused the record for {topic}: {error}");
            tracing::warn!(lsn = %lsn, kind = %kind, "dead-lettering an event: {reason}");
            let failed = Failed::from(&rec);
            rec = policy::dead_letter(failed, kind, &reason, lsn, &self.policy.dead_letter_topic);
            is_dead_letter = true;
        }
    }

    /// A change that cannot become a record: dead-letter it when the policy
    /// says so (counted in the open transaction), otherwise stop.
    async fn unroutable(
        &mut self,
        source: RouteError,
        failed: Failed,
        lsn: Lsn,
    ) -> Result<(), PipelineError> {
        let kind =
            ErrorKind::of_route(&source).filter(|k| self.policy.for_kind(*k) == Policy::DeadLetter);
        let Some(kind) = kind else {
            return Err(PipelineError::Route { lsn, source });
        };
        let reason = source.to_string();
        tracing::warn!(
            lsn = %lsn,
            kind = %kind,
            event_id = %failed.event_id.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
            "dead-lettering an event: {reason}"
        );
        let dlq = policy::dead_letter(failed, kind, &reason, lsn, &self.policy.dead_letter_topic);
        let txn = self.checkpoint.event()?;
        self.enqueue_tracked(dlq, txn, lsn, true).await
    }

    /// Dead-letters records whose delivery failed, queued by `on_ack`.
    async fn flush_redo(&mut self) -> Result<(), PipelineError> {
        // In the order the failures were reported.
        for (rec, txn, lsn) in std::mem::take(&mut self.redo) {
            self.enqueue_tracked(rec, txn, lsn, true).await?;
        }
        Ok(())
    }

    /// Whether another change may be read (or replayed): the in-flight
    /// window has room in events and bytes, and no record waits for room in
    /// the producer's queue. The window also bounds the bookkeeping behind
    /// the oldest unacknowledged event, which grows while that one event is
    /// stuck even though few are in flight: the delivery slots since it
    /// (`pending`, holes included) and the transactions since the confirmed
    /// position (the checkpoint's, empty ones included: PostgreSQL before
    /// 15 sends Begin and Commit for every transaction).
    fn has_room(&self, cfg: &RelayConfig) -> bool {
        let span = 2 * cfg.max_inflight;
        self.checkpoint.inflight() < cfg.max_inflight
            && self.inflight_bytes < cfg.max_inflight_bytes
            && self.waiting.is_empty()
            && (self.pending.span() as u64) < span
            && self.checkpoint.tracked() < span
    }

    /// Refreshes the gauges that describe the stream's state.
    fn update_gauges(&mut self) {
        let confirmed = self.checkpoint.confirmed();
        self.metrics.confirmed_lsn.set(confirmed.0 as i64);
        self.metrics
            .inflight_events
            .set(self.checkpoint.inflight() as i64);
        self.metrics
            .replication_lag_bytes
            .set(self.server_wal.0.saturating_sub(confirmed.0) as i64);
        if let Some(b) = &self.stream {
            self.metrics
                .stream_buffer_bytes
                .set(b.memory_bytes() as i64);
            let total = b.spilled_bytes_total();
            self.metrics
                .stream_spilled_bytes
                .inc_by(total.saturating_sub(self.spilled_counted));
            self.spilled_counted = total;
        }
    }

    /// Reads the clocks once for the delivery reports about to be handled.
    fn refresh_ack_clock(&mut self) {
        self.ack_clock = (Instant::now(), crate::pipeline::source::pg_now());
    }

    fn drain_acks(&mut self) -> Result<(), PipelineError> {
        self.refresh_ack_clock();
        while let Ok(ack) = self.acks.try_recv() {
            self.on_ack(ack)?;
        }
        self.settle_too_large()
    }

    /// Records the broker refused as too large, reported together: one alone
    /// was too large by itself and goes to the dead-letter topic; several
    /// were refused as a batch (the topic's max.message.bytes is below the
    /// producer's batch.size), which dead-lettering would turn into the loss
    /// of good events' payloads: stop, the slot before them, and say what to
    /// change. A lone report waits `TOO_LARGE_SETTLE` for the rest of its
    /// batch's (librdkafka reports a failed batch's records at once).
    fn settle_too_large(&mut self) -> Result<(), PipelineError> {
        if self.too_large.len() == 1 && self.too_large_since.elapsed() < TOO_LARGE_SETTLE {
            return Ok(());
        }
        if self.too_large.len() > 1 {
            let n = self.too_large.len();
            let (pending, topic, error) = self.too_large.swap_remove(0);
            self.too_large.clear();
            return Err(PipelineError::BatchTooLarge(Box::new(BatchTooLarge {
                topic,
                records: n,
                commit_lsn: self.commit_lsn_text(pending.txn),
                error,
                confirmed: self.checkpoint.confirmed(),
            })));
        }
        if let Some((pending, topic, error)) = self.too_large.pop() {
            // Only records kept for dead-lettering are set aside here.
            self.dead_letter_delivery(&pending, ErrorKind::TooLarge, &topic, &error)?;
        }
        Ok(())
    }

    async fn on_xlog(&mut self, wal_start: Lsn, data: bytes::Bytes) -> Result<(), PipelineError> {
        let raw = data.clone();
        let msg = self
            .decoder
            .decode(data)
            .map_err(|source| PipelineError::Decode {
                lsn: wal_start,
                source,
            })?;
        if let Some(buffer) = self.stream.as_mut() {
            match &msg {
                LogicalMessage::StreamStart(s) => {
                    buffer.start(s.xid, s.first_segment)?;
                    return Ok(());
                }
                LogicalMessage::StreamStop => return Ok(()),
                LogicalMessage::StreamAbort(a) => {
                    if let Err(e) = buffer.abort(a.xid, a.subxid) {
                        tracing::debug!(error = %e, "stream abort of a transaction with nothing buffered");
                    }
                    return Ok(());
                }
                LogicalMessage::StreamCommit(c) => {
                    let replay = buffer.commit(c.xid)?;
                    self.commit_time = c.commit_time;
                    self.checkpoint.begin(c.commit_lsn)?;
                    self.replaying = Some(Replaying {
                        replay,
                        decoder: stream_buffer::replay_decoder(
                            self.decoder.protocol_version(),
                            c.xid,
                        ),
                        end_lsn: c.end_lsn,
                    });
                    return Ok(());
                }
                // Inside a streamed block, keep what makes events until the
                // transaction commits; the rest (updates, deletes, types)
                // never does.
                LogicalMessage::Relation(_)
                | LogicalMessage::Insert(_)
                | LogicalMessage::Message(_)
                    if self.decoder.in_stream() =>
                {
                    let top = self.decoder.stream_xid().ok_or_else(|| {
                        PipelineError::Replication(ReplicationError::Protocol(format!(
                            "a change at {wal_start} inside a streamed block without the block's transaction id"
                        )))
                    })?;
                    let subxid = self.decoder.last_xid().unwrap_or(top);
                    buffer.push(top, subxid, wal_start, &raw)?;
                    return Ok(());
                }
                _ if self.decoder.in_stream() => return Ok(()),
                _ => {}
            }
        }
        self.apply(msg, wal_start).await
    }

    /// Replays up to `budget` changes of a committed streamed transaction,
    /// as if they had arrived between Begin and Commit. Returns when the
    /// budget or the in-flight limit is reached, so backpressure holds.
    async fn replay_some(
        &mut self,
        mut budget: usize,
        cfg: &RelayConfig,
    ) -> Result<(), PipelineError> {
        while budget > 0 && self.has_room(cfg) {
            let Some(r) = self.replaying.as_mut() else {
                return Ok(());
            };
            match r.replay.next() {
                Some(change) => {
                    let change = change?;
                    let msg =
                        r.decoder
                            .decode(change.data)
                            .map_err(|source| PipelineError::Decode {
                                lsn: change.lsn,
                                source,
                            })?;
                    self.apply(msg, change.lsn).await?;
                    budget -= 1;
                }
                None => {
                    let end = r.end_lsn;
                    self.replaying = None;
                    self.checkpoint.commit(end)?;
                    self.summary.transactions += 1;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Acts on one decoded message of a committed transaction (or outside).
    async fn apply(&mut self, msg: LogicalMessage, wal_start: Lsn) -> Result<(), PipelineError> {
        match msg {
            LogicalMessage::Begin(b) => {
                self.commit_time = b.commit_time;
                if !self.first_begin_seen {
                    self.first_begin_seen = true;
                    // The server resumes after the slot's confirmed position;
                    // a transaction at or before it means the server is
                    // resending confirmed work (duplicates, not loss): say so.
                    if b.final_lsn <= self.resumed_from {
                        tracing::warn!(
                            first_commit = %b.final_lsn,
                            resumed_from = %self.resumed_from,
                            "the server sent a transaction at or before the resume position; it will be published again"
                        );
                    }
                }
                self.checkpoint.begin(b.final_lsn)?;
            }
            LogicalMessage::Commit(c) => {
                self.checkpoint.commit(c.end_lsn)?;
                self.summary.transactions += 1;
            }
            LogicalMessage::Relation(rel) => {
                self.router
                    .on_relation(&rel)
                    .map_err(|source| PipelineError::Route {
                        lsn: wal_start,
                        source,
                    })?;
            }
            LogicalMessage::Insert(ins) => {
                let rec = match self.router.route(&ins) {
                    Ok(Routed::Record(rec)) => rec,
                    Ok(Routed::OtherTable(table)) => {
                        // Not an event (a FOR ALL TABLES or shared
                        // publication); counted so that it is visible.
                        let metrics = &self.metrics;
                        self.skipped
                            .entry(table)
                            .or_insert_with_key(|t| metrics.skipped_rows_of(t))
                            .inc();
                        return Ok(());
                    }
                    Err(source) => {
                        let failed = self.router.salvage(&ins);
                        return self.unroutable(source, failed, wal_start).await;
                    }
                };
                let txn: TxnSeq = self.checkpoint.event()?;
                tracing::debug!(
                    event_id = %String::from_utf8_lossy(&rec.event_id),
                    event_type = %label(&rec.event_type),
                    aggregate_id = %String::from_utf8_lossy(&rec.key),
                    topic = %rec.topic,
                    lsn = %wal_start,
                    since_commit_ms = (crate::pipeline::source::pg_now() - self.commit_time) / 1000,
                    "event enqueued"
                );
                self.enqueue_tracked(rec, txn, wal_start, false).await?;
                self.summary.events += 1;
            }
            LogicalMessage::Message(m) if m.prefix == HEARTBEAT_PREFIX => {
                tracing::trace!(lsn = %m.lsn, "heartbeat");
            }
            LogicalMessage::Message(m) => {
                let Some(route) = self.messages.as_ref().and_then(|c| c.route(&m)) else {
                    tracing::trace!(prefix = %m.prefix, lsn = %m.lsn, "ignored logical decoding message");
                    return Ok(());
                };
                // A non-transactional message is published at once; it is
                // its own unit for the checkpoint, confirmed at its own LSN
                // (the end of its record): that already keeps a restart from
                // decoding it again, and one byte more would skip a
                // transaction whose commit record starts right there.
                let standalone = !m.transactional();
                if standalone {
                    self.checkpoint.begin_standalone(m.lsn)?;
                    // No commit time in the WAL for it: it counts from now.
                    self.commit_time = crate::pipeline::source::pg_now();
                }
                let result = match route {
                    Ok(rec) => {
                        let txn = self.checkpoint.event()?;
                        self.summary.events += 1;
                        self.enqueue_tracked(rec, txn, m.lsn, false).await
                    }
                    Err(source) => {
                        let failed = Failed {
                            payload: Some(m.content.clone()),
                            event_id: Some(bytes::Bytes::from(format!("lsn:{}", m.lsn))),
                            intended_topic: m.prefix.clone(),
                            ..Failed::default()
                        };
                        self.unroutable(source, failed, m.lsn).await
                    }
                };
                if standalone {
                    self.checkpoint.commit_standalone()?;
                }
                result?;
            }
            other @ (LogicalMessage::Origin(_)
            | LogicalMessage::Type(_)
            | LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_)
            | LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_)
            | LogicalMessage::StreamPrepare(_)) => {
                // Updates, deletes (the insert-then-delete outbox pattern),
                // truncates and the rest are not events.
                tracing::trace!(kind = other.kind(), lsn = %wal_start, "ignored change");
            }
        }
        Ok(())
    }
}

/// Prefix of the relay's own heartbeat messages; never an event.
pub const HEARTBEAT_PREFIX: &str = "outbox-relay-heartbeat";

/// Writes a small non-transactional message into the relay's database every
/// `every`. On a server where other databases write all the WAL, the
/// walsender then has something of ours to decode and report, so the slot's
/// position keeps up even if keepalives alone would not move it.
async fn heartbeat(cfg: RelayConfig, every: Duration) {
    let mut client = None;
    loop {
        tokio::time::sleep(every).await;
        if client.is_none() {
            match crate::commands::setup::connect(&cfg).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat: cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let sql = format!("SELECT pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')");
        if let Err(e) = c.batch_execute(&sql).await {
            tracing::warn!(error = %e, "heartbeat failed; will reconnect");
            client = None;
        }
    }
}

/// The newest pgoutput protocol a server version speaks. Without
/// `--streaming` every version delivers whole committed transactions; with
/// it, protocol 2 or later carries the streamed blocks.
pub fn protocol_for(server_version_num: u32) -> u32 {
    match server_version_num {
        160000.. => 4,
        150000.. => 3,
        140000.. => 2,
        _ => 1,
    }
}

/// An error's code as a metrics label.
fn kafka_code(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "Other".to_string(),
    }
}

fn record_size(r: &OutboxRecord) -> u64 {
    (r.key.len() + r.payload.as_ref().map_or(0, |p| p.len())) as u64
}

/// How many distinct event types are kept for sharing and counter lookup:
/// the metrics' own limit, past which (a column that is not really a type)
/// each event gets its own copy and its counter is looked up in the metrics.
const MAX_EVENT_TYPES: usize = crate::observe::metrics::MAX_EVENT_TYPE_LABELS;

/// The shared owned copy of an event type, made on first sight.
fn intern(seen: &mut std::collections::HashSet<bytes::Bytes>, t: &[u8]) -> bytes::Bytes {
    if let Some(known) = seen.get(t) {
        return known.clone();
    }
    let owned = bytes::Bytes::copy_from_slice(t);
    if seen.len() < MAX_EVENT_TYPES {
        seen.insert(owned.clone());
    }
    owned
}

/// The metrics label of an event type (`unknown` without a column).
fn label(event_type: &Option<bytes::Bytes>) -> String {
    match event_type {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => "unknown".to_string(),
    }
}

/// One replication session: connect, check the slot, stream until
/// `shutdown` resolves or an error stops it.
///
/// `resume` is the position this process confirmed in an earlier session, if
/// any: the slot must not be found past it, or someone moved the slot over
/// events this relay never delivered. Returns the figures of the session
/// alongside its outcome, so a supervisor can resume from them.
pub async fn run(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    column_types: &mut Option<HashMap<String, u32>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> (Summary, Result<(), PipelineError>) {
    let mut summary = Summary {
        confirmed: resume.unwrap_or_default(),
        ..Summary::default()
    };
    let result = session(
        cfg,
        resume,
        column_types,
        metrics.clone(),
        shutdown,
        &mut summary,
    )
    .await;
    metrics.set_streaming(false);
    (summary, result)
}

/// A session's connection after set-up: streaming has started.
struct Opened {
    stream: crate::pipeline::source::ReplicationStream,
    slot: Slot,
    status_interval: Duration,
    protocol: u32,
    sink: KafkaSink,
    acks: mpsc::UnboundedReceiver<Ack>,
}

/// An error for a step that took longer than `limit`: the connection is
/// treated as lost, so the supervisor reconnects.
fn timed_out(what: &str, limit: Duration) -> PipelineError {
    PipelineError::Replication(ReplicationError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "{what}: no answer from the server within {:.1}s (--replication-timeout)",
            limit.as_secs_f64()
        ),
    )))
}

/// Connects, checks the slot and the publication and starts streaming.
/// Connecting and authenticating are bounded by the connect timeout, the
/// queries after it by the replication timeout: a server that stops
/// answering (a failover that black-holes its address) must not hold the
/// relay for the kernel's TCP retry time.
async fn open(cfg: &RelayConfig, resume: Option<Lsn>) -> Result<Opened, PipelineError> {
    let mut params = ConnectParams::from_config(&cfg.database)?;
    params.tcp_user_timeout = cfg.replication_timeout;
    let mut conn = ReplicationConnection::connect(&params).await?;
    let set_up = async move {
        let system = conn.identify_system().await?;
        let slot = check_slot(&mut conn, &cfg.slot).await?;
        check_publication(&mut conn, cfg).await?;
        if let Some(ours) = resume {
            if slot.confirmed > ours {
                return Err(PipelineError::SlotMovedAhead {
                    slot: cfg.slot.clone(),
                    found: slot.confirmed,
                    ours,
                });
            }
        }
        let status_interval = match conn
            .show("wal_sender_timeout")
            .await
            .ok()
            .as_deref()
            .and_then(parse_pg_duration)
        {
            Some(t) if !t.is_zero() => cfg.status_interval.min(t / 2),
            _ => cfg.status_interval,
        };
        if cfg.terminate_stale_walsender {
            if let Some(pid) = slot.active_pid {
                terminate_if_stale(&mut conn, &cfg.slot, pid, status_interval).await?;
            }
        }
        let server_version: u32 = conn
            .show("server_version_num")
            .await?
            .trim()
            .parse()
            .unwrap_or(0);
        let protocol = cfg
            .protocol_version
            .unwrap_or_else(|| protocol_for(server_version));
        if let Some(streaming) = &cfg.streaming {
            stream_buffer::prepare_spill_dir(&streaming.spill_dir.join(&cfg.slot))?;
        }
        // Before START_REPLICATION: a producer setting the relay refuses
        // stops it before the slot is touched.
        let (sink, acks) = KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties)?;
        tracing::info!(
            server_version,
            protocol,
            slot = %cfg.slot,
            publication = %cfg.publication,
            resume_from = %slot.confirmed,
            server_wal = %system.xlogpos,
            table = %cfg.router.table,
            topic = %cfg.router.topic,
            "starting replication"
        );
        let mut options = vec![
            ("proto_version", protocol.to_string()),
            ("publication_names", quote_ident(&cfg.publication)),
        ];
        if cfg.messages.is_some() {
            options.push(("messages", "true".to_string()));
        }
        if cfg.streaming.is_some() {
            if protocol < 2 {
                return Err(PipelineError::Config(format!(
                    "--streaming needs pgoutput protocol 2 or later (PostgreSQL 14+); this session uses {protocol}"
                )));
            }
            options.push(("streaming", "on".to_string()));
        }
        // Ask for the position we expect explicitly rather than 0/0, so the
        // server log shows it; the server never starts before the slot's
        // confirmed_flush_lsn anyway.
        let stream = conn
            .start_logical(&cfg.slot, slot.confirmed, &options)
            .await?;
        Ok(Opened {
            stream,
            slot,
            status_interval,
            protocol,
            sink,
            acks,
        })
    };
    match cfg.replication_timeout {
        Some(limit) => tokio::time::timeout(limit, set_up)
            .await
            .map_err(|_| timed_out("setting up the replication session", limit))?,
        None => set_up.await,
    }
}

async fn session(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    column_types: &mut Option<HashMap<String, u32>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    summary: &mut Summary,
) -> Result<(), PipelineError> {
    tokio::pin!(shutdown);
    // A stop during set-up (a server that does not answer, say) is honoured
    // at once: nothing was streamed, so nothing is owed.
    let opened = tokio::select! {
        biased;
        () = &mut shutdown => {
            metrics.set_stopping();
            tracing::info!("shutting down before the replication session was set up");
            return Ok(());
        }
        opened = open(cfg, resume) => opened?,
    };
    let Opened {
        stream,
        slot,
        status_interval,
        protocol,
        sink,
        acks,
    } = opened;
    let (mut reader, mut writer) = (stream.reader, stream.writer);
    summary.streamed = true;
    crate::observe::announce::streaming(&cfg.slot, slot.confirmed);
    summary.confirmed = slot.confirmed;
    metrics.set_streaming(true);
    // Readiness needs to know the broker answers even when no event flows.
    let mut prober = sink.prober();
    let probe_metrics = metrics.clone();
    let probe = tokio::spawn(async move {
        loop {
            // The metadata request blocks: keep it off the runtime's threads.
            let asked = tokio::task::spawn_blocking(move || {
                let report = prober.probe(Duration::from_secs(3));
                (report, prober)
            })
            .await;
            let Ok((report, back)) = asked else { return };
            prober = back;
            probe_metrics.set_broker_reachable(report.reachable);
            if let Some((topic, count)) = &report.partitions {
                probe_metrics.topic_partitions(topic).set(i64::from(*count));
                if let Some(before) = report.changed_from {
                    probe_metrics.partition_count_changes(topic).inc();
                    tracing::warn!(
                        topic = %topic,
                        before,
                        now = count,
                        "the topic's partition count changed: keys now map to other partitions, so consumers may see an aggregate's new events before its older ones in the partition it used before. Per-aggregate order holds again once consumers have read past the change; to avoid it, add partitions only with the relay stopped and its topics drained"
                    );
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });

    let heartbeat = cfg
        .heartbeat_interval
        .map(|every| tokio::spawn(heartbeat(cfg.clone(), every)));

    let mut state = State {
        router: Router::with_column_types(cfg.router.clone(), column_types.clone()),
        checkpoint: Checkpoint::new(slot.confirmed),
        sink,
        acks,
        summary: Summary::default(),
        resumed_from: slot.confirmed,
        first_begin_seen: false,
        metrics,
        pending: InFlight::default(),
        commit_time: 0,
        server_wal: slot.confirmed,
        published: HashMap::new(),
        last_published: None,
        ack_clock: (Instant::now(), crate::pipeline::source::pg_now()),
        decoder: pgoutput::Decoder::new(protocol),
        stream: cfg
            .streaming
            .as_ref()
            .map(|s| StreamBuffer::new(s.memory_budget, s.spill_dir.join(&cfg.slot))),
        replaying: None,
        messages: cfg.messages.clone(),
        inflight_bytes: 0,
        policy: cfg.error_policy.clone(),
        keep_records: cfg.error_policy.may_dead_letter_deliveries(),
        redo: Vec::new(),
        skipped: HashMap::new(),
        waiting: VecDeque::new(),
        too_large: Vec::new(),
        too_large_since: Instant::now(),
        noted_topics: std::collections::HashSet::new(),
        last_noted_topic: None,
        spilled_counted: 0,
        event_types: std::collections::HashSet::new(),
    };
    let result = stream_loop(
        cfg,
        status_interval,
        &mut state,
        &mut reader,
        &mut writer,
        shutdown.as_mut(),
    )
    .await;
    match &result {
        // A delivery failed: records enqueued after it must not reach the
        // broker before it is sent again, or a partition would hold them out
        // of commit order. Abandon the producer now; the next session
        // resumes from the slot.
        Err(PipelineError::Delivery(_)) => state.sink.abandon(),
        Err(PipelineError::Replication(_) | PipelineError::ServerEnded) | Ok(()) => {}
        // The stop already waited its time for the deliveries.
        Err(PipelineError::ShutdownTimeout { .. }) => {}
        // Stopping on a bad event: let what was already handed to the
        // producer arrive, so the slot stops right before the bad event
        // rather than at an older position (fewer repeats on restart).
        Err(_) => settle_in_flight(&mut state, cfg.shutdown_timeout).await,
    }
    probe.abort();
    if let Some(h) = heartbeat {
        h.abort();
    }
    if let Some(types) = state.router.column_types() {
        *column_types = Some(types.clone());
    }
    state.summary.confirmed = state.checkpoint.confirmed();
    state.summary.streamed = true;
    state.update_gauges();
    *summary = state.summary.clone();
    // Whatever happened, report the last safe position; a failure here only
    // means the connection is already gone.
    let _ = writer
        .send_status(state.checkpoint.confirmed(), false)
        .await;
    if result.is_ok() {
        close(&mut reader, &mut writer).await;
    }
    tracing::info!(
        events = state.summary.events,
        transactions = state.summary.transactions,
        confirmed = %state.summary.confirmed,
        "replication stopped"
    );
    result
}

async fn stream_loop(
    cfg: &RelayConfig,
    status_interval: Duration,
    state: &mut State,
    reader: &mut ReplicationReader,
    writer: &mut ReplicationWriter,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(FEEDBACK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = state.checkpoint.confirmed();
    let mut last_sent_at = Instant::now();
    let mut shutdown_deadline: Option<Instant> = None;
    // Liveness: when the server last sent anything, and whether the relay
    // already asked it for a keepalive since.
    let mut last_heard = Instant::now();
    let mut pinged = false;
    writer.send_status(last_sent, false).await?;

    loop {
        state.metrics.loop_turned();
        let stopping = shutdown_deadline.is_some();
        // On shutdown, finish the open transaction so that a restart resends
        // nothing that was published: the server sends whole transactions.
        if stopping && !state.checkpoint.in_transaction() && state.checkpoint.inflight() == 0 {
            return Ok(());
        }
        let replaying = state.replaying.is_some();
        let room = state.has_room(cfg);
        let can_replay = replaying && room;
        let can_read = !replaying && room && (!stopping || state.checkpoint.in_transaction());
        if !can_read {
            // Not reading (backpressure, a replay): silence from the server
            // says nothing now. A dead connection still shows when a status
            // update cannot be written (TCP_USER_TIMEOUT bounds that).
            last_heard = Instant::now();
            pinged = false;
        }
        if can_replay {
            // A committed streamed transaction is handed over in slices;
            // between slices, delivery reports, status updates and a stop
            // go on (a stop finishes the transaction within the deadline).
            if !stopping && poll_once(shutdown.as_mut()) {
                tracing::info!(inflight = state.checkpoint.inflight(), "shutting down: finishing the streamed transaction being published and in-flight deliveries");
                shutdown_deadline = Some(Instant::now() + cfg.shutdown_timeout);
                state.metrics.set_stopping();
            }
            if let Some(deadline) = shutdown_deadline {
                if Instant::now() >= deadline {
                    return Err(PipelineError::ShutdownTimeout {
                        inflight: state.checkpoint.inflight(),
                        confirmed: state.checkpoint.confirmed(),
                    });
                }
            }
            state.replay_some(REPLAY_SLICE, cfg).await?;
            state.drain_acks()?;
            state.flush_redo().await?;
            state.pump_waiting()?;
            if last_sent_at.elapsed() >= FEEDBACK_TICK {
                state.update_gauges();
                let confirmed = state.checkpoint.confirmed();
                writer.send_status(confirmed, false).await?;
                last_sent = confirmed;
                last_sent_at = Instant::now();
            }
            continue;
        }
        tokio::select! {
            biased;
            () = &mut shutdown, if !stopping => {
                tracing::info!(inflight = state.checkpoint.inflight(), "shutting down: finishing the open transaction and in-flight deliveries");
                shutdown_deadline = Some(Instant::now() + cfg.shutdown_timeout);
                state.metrics.set_stopping();
            }
            Some(ack) = state.acks.recv() => {
                state.refresh_ack_clock();
                state.on_ack(ack)?;
                // Reports that came with it, then a decision on records
                // refused as too large.
                state.drain_acks()?;
                state.flush_redo().await?;
                state.pump_waiting()?;
            }
            // Before the WAL: under a continuous stream the read branch is
            // always ready, and status updates must not wait behind it.
            _ = tick.tick() => {
                // Room in the producer's queue may come without a report of
                // ours (another caller's, a purge): try again now and then.
                state.pump_waiting()?;
                state.settle_too_large()?;
                state.flush_redo().await?;
                state.update_gauges();
                let confirmed = state.checkpoint.confirmed();
                if confirmed != last_sent || last_sent_at.elapsed() >= status_interval {
                    writer.send_status(confirmed, false).await?;
                    if confirmed != last_sent {
                        tracing::debug!(%confirmed, "confirmed position moved");
                    }
                    last_sent = confirmed;
                    last_sent_at = Instant::now();
                }
                if let Some(limit) = cfg.replication_timeout {
                    let quiet = last_heard.elapsed();
                    if quiet >= limit {
                        return Err(timed_out("streaming", limit));
                    }
                    // Like Postgres's walreceiver: half-way, ask for a
                    // keepalive, so an idle but healthy server answers.
                    if quiet >= limit / 2 && !pinged {
                        writer.send_status(confirmed, true).await?;
                        last_sent = confirmed;
                        last_sent_at = Instant::now();
                        pinged = true;
                    }
                }
                if let Some(deadline) = shutdown_deadline {
                    if Instant::now() >= deadline {
                        return Err(PipelineError::ShutdownTimeout {
                            inflight: state.checkpoint.inflight(),
                            confirmed,
                        });
                    }
                }
            }
            msg = reader.next(), if can_read => {
                // Handle what the socket already delivered in one go, within
                // the same limits as reading: one turn of the loop per burst
                // instead of per message.
                let mut next = Some(msg?);
                last_heard = Instant::now();
                pinged = false;
                let mut burst = 0;
                while let Some(m) = next.take() {
                    match m {
                        ReplicationMessage::XLogData { wal_start, wal_end, data, .. } => {
                            state.server_wal = state.server_wal.max(wal_end);
                            state.on_xlog(wal_start, data).await?;
                        }
                        ReplicationMessage::Keepalive { wal_end, reply_requested, .. } => {
                            state.server_wal = state.server_wal.max(wal_end);
                            // An open streamed transaction commits later and is sent
                            // again whole after a crash, but confirming past its
                            // start would let a restart begin decoding after it.
                            if state.stream.as_ref().is_none_or(|b| b.open_transactions() == 0) {
                                state.checkpoint.idle(wal_end);
                            }
                            if reply_requested {
                                last_sent = state.checkpoint.confirmed();
                                writer.send_status(last_sent, false).await?;
                                last_sent_at = Instant::now();
                            }
                        }
                        ReplicationMessage::CopyDone => return Err(PipelineError::ServerEnded),
                    }
                    burst += 1;
                    let keep_reading = burst < READ_BURST
                        && state.replaying.is_none()
                        && state.has_room(cfg)
                        && (!stopping || state.checkpoint.in_transaction());
                    if keep_reading {
                        next = reader.try_next()?;
                    }
                }
            }
        }
    }
}

/// Whether `f` is ready now, without waiting: lets a loop that is busy
/// (a replay) notice a stop between slices of work.
fn poll_once<F: Future<Output = ()>>(f: std::pin::Pin<&mut F>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx).is_ready()
}

/// Waits (up to `limit`) for the delivery reports of events in flight, so
/// the checkpoint covers everything delivered before a stop. Failures here
/// only leave the position where it is.
async fn settle_in_flight(state: &mut State, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    // Wait for reports still owed; a failed event already reported is not
    // owed one, though the checkpoint still counts it as unconfirmed.
    while !state.pending.is_empty() {
        match tokio::time::timeout_at(deadline, state.acks.recv()).await {
            Ok(Some(ack)) => {
                state.refresh_ack_clock();
                if let Err(e) = state.on_ack(ack) {
                    tracing::debug!(error = %e, "delivery failed while stopping");
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Ends the copy cleanly: CopyDone, wait briefly for the server's end of the
/// stream, Terminate. Anything the server still sends is not processed; it
/// is after the confirmed position and will be sent again.
async fn close(reader: &mut ReplicationReader, writer: &mut ReplicationWriter) {
    if writer.send_copy_done().await.is_err() {
        return;
    }
    let drain = async {
        loop {
            match reader.next().await {
                Ok(ReplicationMessage::CopyDone) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    let _ = writer.send_terminate().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_follows_the_server_version() {
        assert_eq!(protocol_for(130012), 1);
        assert_eq!(protocol_for(140023), 2);
        assert_eq!(protocol_for(150019), 3);
        assert_eq!(protocol_for(160015), 4);
        assert_eq!(protocol_for(180006), 4);
    }

    #[test]
    fn parses_postgres_durations() {
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("abc"), None);
    }
}
