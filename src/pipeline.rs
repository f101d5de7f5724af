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

use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoint, CheckpointError, TxnSeq};
use crate::config::RelayConfig;
use crate::lsn::Lsn;
use crate::pgoutput::{self, DecodeError, LogicalMessage};
use crate::replication::{
    quote_ident, quote_literal, ConnectParams, ReplicationConnection, ReplicationError,
    ReplicationMessage, ReplicationReader, ReplicationWriter,
};
use crate::router::{RouteError, Routed, Router};
use crate::sink::{Ack, Enqueued, KafkaSink, SinkError};

/// How often the task checks whether the confirmed position moved; bounds the
/// delay between an acknowledgement and the slot moving.
const FEEDBACK_TICK: Duration = Duration::from_millis(100);

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
    #[error("replication slot {slot:?} does not exist: run `outbox-relay setup` first")]
    SlotMissing { slot: String },
    #[error("replication slot {slot:?} uses plugin {plugin:?}, not pgoutput: drop it or choose another --slot")]
    WrongPlugin { slot: String, plugin: String },
    #[error("shutdown timed out with {inflight} events unacknowledged; the slot stays at {confirmed} and they will be sent again")]
    ShutdownTimeout { inflight: u64, confirmed: Lsn },
    #[error("the server ended the replication stream")]
    ServerEnded,
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
    pub events: u64,
    pub transactions: u64,
    pub confirmed: Lsn,
}

/// Parses a Postgres duration setting (`60s`, `1min`, `500ms`, `0`).
pub fn parse_pg_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let ms = match s[split..].trim() {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

struct Slot {
    confirmed: Lsn,
}

async fn check_slot(conn: &mut ReplicationConnection, slot: &str) -> Result<Slot, PipelineError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT coalesce(plugin, ''), coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = {}",
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
    let confirmed = row
        .get(1)
        .cloned()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    Ok(Slot { confirmed })
}

struct State {
    router: Router,
    checkpoint: Checkpoint,
    sink: KafkaSink,
    acks: mpsc::UnboundedReceiver<Ack>,
    summary: Summary,
}

impl State {
    fn on_ack(&mut self, ack: Ack) -> Result<(), PipelineError> {
        match ack.result {
            Ok(d) => {
                tracing::trace!(topic = %ack.topic, partition = d.partition, offset = d.offset, "delivered");
                self.checkpoint.ack(ack.txn)?;
                Ok(())
            }
            Err(error) => Err(PipelineError::Delivery(Box::new(DeliveryFailure {
                topic: ack.topic,
                commit_lsn: self
                    .checkpoint
                    .commit_lsn_of(ack.txn)
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "?".into()),
                error,
                confirmed: self.checkpoint.confirmed(),
            }))),
        }
    }

    fn drain_acks(&mut self) -> Result<(), PipelineError> {
        while let Ok(ack) = self.acks.try_recv() {
            self.on_ack(ack)?;
        }
        Ok(())
    }

    async fn on_xlog(&mut self, wal_start: Lsn, data: bytes::Bytes) -> Result<(), PipelineError> {
        let msg = pgoutput::decode(data).map_err(|source| PipelineError::Decode {
            lsn: wal_start,
            source,
        })?;
        match msg {
            LogicalMessage::Begin(b) => {
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
                let Routed::Record(rec) =
                    self.router
                        .route(ins)
                        .map_err(|source| PipelineError::Route {
                            lsn: wal_start,
                            source,
                        })?;
                let seq: TxnSeq = self.checkpoint.event()?;
                loop {
                    match self.sink.enqueue(&rec, seq)? {
                        Enqueued::Yes => break,
                        // The local queue is full: wait for a delivery report
                        // to make room, then try again.
                        Enqueued::QueueFull => match self.acks.recv().await {
                            Some(ack) => self.on_ack(ack)?,
                            None => return Err(PipelineError::ServerEnded),
                        },
                    }
                }
                self.summary.events += 1;
                tracing::debug!(
                    event_id = %String::from_utf8_lossy(&rec.event_id),
                    topic = %rec.topic,
                    key = %String::from_utf8_lossy(&rec.key),
                    lsn = %wal_start,
                    "event enqueued"
                );
            }
            other @ (LogicalMessage::Origin(_)
            | LogicalMessage::Type(_)
            | LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::Message(_)
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

/// Streams the outbox until `shutdown` resolves or an error stops it.
pub async fn run(
    cfg: &RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, PipelineError> {
    let params = ConnectParams::from_config(&cfg.database)?;
    let mut conn = ReplicationConnection::connect(&params).await?;
    let system = conn.identify_system().await?;
    let slot = check_slot(&mut conn, &cfg.slot).await?;
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
    let (sink, acks) = KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties)?;
    tracing::info!(
        slot = %cfg.slot,
        publication = %cfg.publication,
        resume_from = %slot.confirmed,
        server_wal = %system.xlogpos,
        table = %cfg.router.table,
        topic = %cfg.router.topic,
        "starting replication"
    );
    let options = [
        ("proto_version", "1".to_string()),
        ("publication_names", quote_ident(&cfg.publication)),
    ];
    let stream = conn.start_logical(&cfg.slot, Lsn::ZERO, &options).await?;
    let (mut reader, mut writer) = (stream.reader, stream.writer);

    let mut state = State {
        router: Router::new(cfg.router.clone()),
        checkpoint: Checkpoint::new(slot.confirmed),
        sink,
        acks,
        summary: Summary::default(),
    };
    let result = stream_loop(
        cfg,
        status_interval,
        &mut state,
        &mut reader,
        &mut writer,
        shutdown,
    )
    .await;
    state.summary.confirmed = state.checkpoint.confirmed();
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
    result.map(|()| state.summary)
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
    writer.send_status(last_sent, false).await?;

    loop {
        let stopping = shutdown_deadline.is_some();
        // On shutdown, finish the open transaction so that a restart resends
        // nothing that was published: the server sends whole transactions.
        if stopping && !state.checkpoint.in_transaction() && state.checkpoint.inflight() == 0 {
            return Ok(());
        }
        let can_read = state.checkpoint.inflight() < cfg.max_inflight
            && (!stopping || state.checkpoint.in_transaction());
        tokio::select! {
            biased;
            () = &mut shutdown, if !stopping => {
                tracing::info!(inflight = state.checkpoint.inflight(), "shutting down: finishing the open transaction and in-flight deliveries");
                shutdown_deadline = Some(Instant::now() + cfg.shutdown_timeout);
            }
            Some(ack) = state.acks.recv() => {
                state.on_ack(ack)?;
                state.drain_acks()?;
            }
            msg = reader.next(), if can_read => match msg? {
                ReplicationMessage::XLogData { wal_start, data, .. } => {
                    state.on_xlog(wal_start, data).await?;
                }
                ReplicationMessage::Keepalive { wal_end, reply_requested, .. } => {
                    state.checkpoint.idle(wal_end);
                    if reply_requested {
                        last_sent = state.checkpoint.confirmed();
                        writer.send_status(last_sent, false).await?;
                        last_sent_at = Instant::now();
                    }
                }
                ReplicationMessage::CopyDone => return Err(PipelineError::ServerEnded),
            },
            _ = tick.tick() => {
                let confirmed = state.checkpoint.confirmed();
                if confirmed != last_sent || last_sent_at.elapsed() >= status_interval {
                    writer.send_status(confirmed, false).await?;
                    if confirmed != last_sent {
                        tracing::debug!(%confirmed, "confirmed position moved");
                    }
                    last_sent = confirmed;
                    last_sent_at = Instant::now();
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
    fn parses_postgres_durations() {
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("abc"), None);
    }
}
