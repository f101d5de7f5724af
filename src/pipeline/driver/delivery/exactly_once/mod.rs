//! `--delivery exactly-once` in a session: Kafka transactions cut at
//! Postgres transaction boundaries, the progress record written in each, and
//! the rule for what may be confirmed.
//!
//! Why a position is safe to confirm here. A delivery report inside an open
//! Kafka transaction only says the broker holds the record; the transaction
//! may still abort. So while a Kafka transaction is open, the position sent
//! to Postgres is held at the checkpoint's position when it began (`gate`):
//! everything before that was in a committed Kafka transaction or published
//! nothing. Once `commit_transaction` returns, the gate opens and the
//! checkpoint's own rule (a contiguous prefix acknowledged) applies again.
//! Acknowledged records of an aborted transaction never count: the session
//! ends, and the next one starts from the slot and the progress topic.
//!
//! Why a slot found ahead can still be told apart (review M11). A relay
//! records a position in the progress topic, in a committed Kafka
//! transaction, before it confirms it: the end of each Kafka transaction's
//! last Postgres transaction, and, when the slot would move without an
//! event (keepalives over an idle outbox), that position in a transaction
//! of the progress record alone. So a slot found beyond the position this
//! process confirmed, but not beyond what the progress topic records, was
//! moved by a relay of ours (a standby that took over); beyond it, by
//! someone else.
//!
//! Why nothing is published twice. Each Kafka transaction carries, on the
//! progress topic, the commit LSN of its last Postgres transaction, with its
//! xid, commit time and the server's timeline. A new session reads the
//! furthest committed one (after `init_transactions`, which settles what an
//! earlier producer left open) and skips the Postgres transactions at or
//! before it: those are in Kafka even when the slot was not confirmed past
//! them (a crash between the Kafka commit and the status update, or a slot
//! put back).
//!
//! Why nothing new is skipped. Only on the history the record was written
//! on: `pipeline::history` judges that (timeline, switch points, the
//! server's WAL end, and the anchor transaction itself when the stream
//! passes it), and while it cannot yet tell, the slot stays where it was
//! found, so a session that learns the held transactions were new starts
//! again from there and publishes them.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::lsn::Lsn;
use crate::pipeline::history::{Anchor, Begins, Decision, Fork, InKafka};
use crate::pipeline::settings::{ExactlyOnceConfig, RelayConfig};
use crate::pipeline::sink::transactions::TxnError;
use crate::pipeline::sink::KafkaSink;

use super::super::errors::PipelineError;
use super::Env;

/// How long init_transactions and a commit may take before the session
/// ends and starts over: under the walsender's default timeout (60 s), since
/// status updates still go out meanwhile but reading stops.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Transactions {
    /// How long the open Kafka transaction has been open, and its limits.
    age: Age,
    /// The commit LSN of the last Postgres transaction known to be in a
    /// committed Kafka transaction: from the progress topic, then ours; with
    /// its anchor when known (a record of an older relay has none).
    committed: Option<Lsn>,
    committed_anchor: Option<Anchor>,
    /// Which transactions the stream sends are in Kafka already.
    in_kafka: InKafka,
    /// The Postgres transaction being decoded, and whether it is already in
    /// Kafka (skipped).
    current: Option<(Anchor, bool)>,
    /// While a Kafka transaction is open: the checkpoint's position when it
    /// began, the most that may be confirmed until it commits.
    gate: Option<Lsn>,
    /// The last whole Postgres transaction in the open Kafka transaction.
    last_in_batch: Option<Anchor>,
    /// The position the open Kafka transaction records as confirmable: the
    /// end of its last Postgres transaction, or, for a transaction of the
    /// progress record alone, the checkpoint's idle position.
    confirm_target: Option<Lsn>,
    committing: Option<(JoinHandle<Result<(), TxnError>>, Instant)>,
    commit_tries: u32,
}

impl Transactions {
    /// After START_REPLICATION: the slot is this session's, so registering
    /// the transactional.id fences only a producer of a relay that lost it.
    /// Call before reading the progress topic: it settles what an earlier
    /// producer with the id left open, which could otherwise commit behind
    /// the read.
    pub(crate) async fn register(sink: &KafkaSink) -> Result<(), PipelineError> {
        Ok(sink.init_transactions(TXN_CALL_TIMEOUT).await?)
    }

    /// Fences the producers of another transactional.id (`theirs`, which
    /// the slot's progress record names) by registering it once: a relay of
    /// this slot given that id and frozen with a Kafka transaction open can
    /// then never commit it (review N7).
    pub(crate) async fn fence(
        cfg: &RelayConfig,
        theirs: &str,
        ours: &str,
    ) -> Result<(), PipelineError> {
        tracing::warn!(
            fenced = theirs,
            ours,
            "the progress record was written by a relay with another transactional.id: fencing it before going on. Give every relay of one slot the same --transactional-id (or none: the default is derived from the slot)"
        );
        let (sink, _acks) =
            KafkaSink::transactional(&cfg.kafka_brokers, &cfg.kafka_properties, theirs)?;
        Ok(sink.init_transactions(TXN_CALL_TIMEOUT).await?)
    }

    /// `committed`: the last transaction the progress topic holds, on this
    /// history; `in_kafka`: what the history check made of it.
    pub(crate) fn new(
        e: &ExactlyOnceConfig,
        committed: Option<Lsn>,
        committed_anchor: Option<Anchor>,
        in_kafka: InKafka,
    ) -> Transactions {
        tracing::info!(
            committed = %committed.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
            in_kafka = ?in_kafka,
            "exactly-once: transactions the progress topic shows in Kafka are not published again"
        );
        Transactions {
            age: Age::new(e.max_duration, e.transaction_timeout),
            committed,
            committed_anchor,
            in_kafka,
            current: None,
            gate: None,
            last_in_batch: None,
            confirm_target: None,
            committing: None,
            commit_tries: 0,
        }
    }

    pub(crate) fn committing(&self) -> bool {
        self.committing.is_some()
    }

    fn is_open(&self) -> bool {
        self.gate.is_some()
    }
}

impl Transactions {
    /// While a Kafka transaction is open, the checkpoint's position when it
    /// began; and whether the history check still holds the slot where it
    /// was found.
    pub(crate) fn holds(&self) -> (Option<Lsn>, bool) {
        (self.gate, self.in_kafka.holds())
    }

    /// A Postgres transaction begins (a non-transactional message: no xid
    /// and no commit time). Whether it is already in Kafka.
    pub(crate) fn begin(
        &mut self,
        env: &mut Env<'_>,
        begins: Begins,
    ) -> Result<bool, PipelineError> {
        let (decision, seen) = self.in_kafka.decide(begins);
        if let Some(seen) = seen {
            self.fork_seen(env, seen.fork);
        }
        let skip = match decision {
            Decision::InKafka => true,
            Decision::Publish => false,
            Decision::StartAgain(forked) => return Err(PipelineError::HistoryForked(forked)),
        };
        self.current = Some((begins.anchor(), skip));
        if skip {
            env.metrics.transactions_skipped.inc();
        }
        Ok(skip)
    }

    /// A keepalive: the server's WAL went past `wal_end`, which may show
    /// that the record's anchor is not on this history.
    pub(crate) fn passed(&mut self, env: &mut Env<'_>, wal_end: Lsn) -> Result<(), PipelineError> {
        let Some((decision, seen)) = self.in_kafka.passed(wal_end) else {
            return Ok(());
        };
        self.fork_seen(env, seen.fork);
        match decision {
            Some(Decision::StartAgain(forked)) => Err(PipelineError::HistoryForked(forked)),
            _ => Ok(()),
        }
    }

    /// The stream showed the record's anchor is not on this history: from
    /// here on nothing is in Kafka that the record says, and the records
    /// say only what this history has.
    fn fork_seen(&mut self, env: &mut Env<'_>, fork: Fork) {
        let doing = "exactly-once publishes every transaction after it";
        match env.recorder.as_deref_mut() {
            Some(r) => r.forked(env.metrics, fork, env.resumed_from, doing),
            None => super::record::report_fork(env.metrics, "", fork, doing),
        }
        self.committed = None;
        self.committed_anchor = None;
        // Its notes name positions of the other history.
        *env.refused = Default::default();
    }

    /// The Postgres transaction being decoded is in Kafka already.
    pub(crate) fn skipping(&self) -> bool {
        self.current.is_some_and(|(_, skip)| skip)
    }

    /// Before a record of the current Postgres transaction is enqueued:
    /// opens a Kafka transaction if none is.
    pub(crate) fn before_enqueue(
        &mut self,
        sink: &KafkaSink,
        confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        if self.gate.is_none() {
            sink.begin_transaction()?;
            self.gate = Some(confirmed);
            self.age.opened();
        }
        Ok(())
    }

    /// The Postgres transaction being decoded committed: if it published
    /// anything, the open Kafka transaction now holds it whole.
    pub(crate) fn commit(&mut self, end_lsn: Lsn) {
        if let Some((anchor, skip)) = self.current.take() {
            if !skip && self.gate.is_some() {
                self.last_in_batch = Some(anchor);
                self.confirm_target = Some(end_lsn);
            }
        }
    }
}

mod age;
mod commit;

use age::Age;
