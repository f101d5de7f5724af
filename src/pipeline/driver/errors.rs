//! What ends a session, and whether the supervisor may start another: the
//! retriable/fatal split, and the failures the driver reports with the
//! position the slot stays at.

use rdkafka::error::KafkaError;

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::CheckpointError;
use crate::pipeline::decode::pgoutput::DecodeError;
use crate::pipeline::decode::stream_buffer::StreamBufferError;
use crate::pipeline::policy::ErrorKind;
use crate::pipeline::route::router::RouteError;
use crate::pipeline::sink::progress::ProgressError;
use crate::pipeline::sink::transactions::TxnError;
use crate::pipeline::sink::SinkError;
use crate::pipeline::source::ReplicationError;

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
    #[error("replication slot {slot:?} does not exist: on a new installation run `outbox-relay setup` first; if the relay ran on it before (dropped, or missing after a restore or a failover), run `outbox-relay recover`, which creates it again and publishes from the outbox table the events Kafka lacks")]
    SlotMissing { slot: String },
    #[error("replication slot {slot:?} uses plugin {plugin:?}, not pgoutput: drop it or choose another --slot")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot {slot:?} is at {found}, past {ours}, the position this relay had confirmed: something advanced the slot over events that were never delivered. Check who moved it (pg_replication_slot_advance, another consumer of the slot such as a second relay that took over and released it), publish the events between {ours} and {found} from the table, then restart")]
    SlotMovedAhead { slot: String, found: Lsn, ours: Lsn },
    #[error("replication slot {slot:?} is at {found}, past {recorded}, the furthest position the progress topic records for it: it was moved while no relay of ours ran (pg_replication_slot_advance, or a relay with another --progress-topic or none), maybe over events that were never delivered. Drop the slot and run `outbox-relay recover`: it publishes from the outbox table what Kafka lacks. If a relay with another progress topic moved it, give this one that topic")]
    SlotMovedWhileDown {
        slot: String,
        found: Lsn,
        recorded: Lsn,
    },
    #[error("replication slot {slot:?} was invalidated (wal_status = 'lost'): the WAL it needed was removed (max_slot_wal_keep_size). Events committed while it was lost cannot be streamed: run `outbox-relay recover`, which drops it, creates it again and publishes from the outbox table the events Kafka lacks")]
    SlotInvalidated { slot: String },
    #[error("an `outbox-relay recover` of replication slot {slot:?} did not finish (the progress topic says so): the events between the last one in Kafka and the slot were not all published. Stop, and run `outbox-relay recover` again; it drops the slot it left and publishes what Kafka lacks")]
    RecoverUnfinished { slot: String },
    #[error("shutdown timed out with {inflight} events unacknowledged; the slot stays at {confirmed} and they will be sent again")]
    ShutdownTimeout { inflight: u64, confirmed: Lsn },
    #[error("the server ended the replication stream")]
    ServerEnded,
    #[error("a delivery report for record {0}, which this session does not track")]
    UnknownDelivery(u64),
    #[error(transparent)]
    BatchTooLarge(Box<BatchTooLarge>),
    #[error(transparent)]
    Refused(Box<RefusedInTransaction>),
    #[error("{0}")]
    Config(String),
    #[error("exactly-once: {0}")]
    Transaction(#[from] TxnError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error("the WAL history forked under transactions held as already in Kafka: the transaction at {} is of the new history; starting again from the slot, publishing from there", .0.before)]
    HistoryForked(crate::pipeline::history::Forked),
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
            // Exactly-once: a topic the principal may not write to fails
            // the transaction (AddPartitionsToTxn), not a record.
            PipelineError::Transaction(t) => {
                ErrorKind::of_kafka(&t.error).filter(|k| *k == ErrorKind::Authorization)
            }
            _ => None,
        }
    }

    /// The slot cannot be streamed from, but its gap can be published from
    /// the outbox table (`pipeline::recover`).
    pub fn asks_for_recover(&self) -> bool {
        matches!(
            self,
            PipelineError::SlotMissing { .. }
                | PipelineError::SlotInvalidated { .. }
                | PipelineError::RecoverUnfinished { .. }
        )
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
            // The next session knows the fork and publishes the new history.
            PipelineError::HistoryForked(_) => true,
            // A new session builds a new producer, whose init_transactions
            // aborts what this one left open; it resumes from the progress
            // topic. Fenced too: if another relay holds the slot now, the
            // next session waits for it as a standby.
            PipelineError::Transaction(t) => {
                ErrorKind::of_kafka(&t.error) != Some(ErrorKind::Authorization)
            }
            // Exactly-once: the producer refuses records once its
            // transaction failed (State), or once a relay that took the slot
            // over fenced it (Fatal: the refusal can come before this
            // session sees its walsender end); an idempotent producer's
            // fatal error refuses them too. A new producer starts over from
            // the slot, or the next session stands by.
            PipelineError::Sink(SinkError::Enqueue { error, .. }) => matches!(
                error.rdkafka_error_code(),
                Some(
                    rdkafka::types::RDKafkaErrorCode::State
                        | rdkafka::types::RDKafkaErrorCode::Fatal
                )
            ),
            // The next session writes the transaction again, the refused
            // record dead-lettered.
            PipelineError::Refused(_) => true,
            // A new session tries again, unless the brokers' ACLs refuse
            // the progress topic: that needs a person.
            PipelineError::Progress(e) => {
                !e.is_authorization()
                    && matches!(
                        e,
                        ProgressError::Kafka { .. }
                            | ProgressError::ReadTimeout { .. }
                            | ProgressError::Write { .. }
                    )
            }
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
pub(super) fn delivery_is_retriable(e: &KafkaError) -> bool {
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
                // A send the broker called a duplicate, unwritten (the sink
                // says why): sent again by a new session.
                | C::DuplicateSequenceNumber
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

/// Exactly-once: a record Kafka refused inside a Kafka transaction, under a
/// dead-letter policy for its kind.
#[derive(Debug, thiserror::Error)]
#[error("Kafka refused the record of the change at {lsn} for topic {topic} ({kind}): {error}. Its Kafka transaction is aborted; the next session writes it again from the slot with this record dead-lettered")]
pub struct RefusedInTransaction {
    pub lsn: Lsn,
    pub kind: ErrorKind,
    pub topic: String,
    pub error: KafkaError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    fn refused(code: RDKafkaErrorCode) -> PipelineError {
        PipelineError::Sink(SinkError::Enqueue {
            topic: "t".into(),
            error: KafkaError::MessageProduction(code),
        })
    }

    /// A producer fenced by the relay that took the slot over refuses
    /// records with a fatal error, sometimes before this session sees its
    /// walsender end: that ends the session, never the relay (a CI run
    /// stopped a relay of tests/exactly_once.rs's handover this way).
    #[test]
    fn a_fenced_or_failed_producer_ends_the_session_not_the_relay() {
        assert!(refused(RDKafkaErrorCode::Fatal).is_retriable());
        assert!(refused(RDKafkaErrorCode::State).is_retriable());
        assert!(!refused(RDKafkaErrorCode::MessageSizeTooLarge).is_retriable());
        assert!(!refused(RDKafkaErrorCode::UnknownTopicOrPartition).is_retriable());
    }
}
