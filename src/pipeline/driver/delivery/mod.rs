//! The delivery mode, one type: at-least-once, or exactly-once with its
//! Kafka transactions. The loop calls the same hooks whatever the mode
//! (a transaction begins, a record is about to be enqueued, a transaction
//! commits, the timer ticks, the loop turns, the session ends); each mode
//! does what it needs there, and tells the checkpoint what it holds back.
//! The progress record (`record`), which both modes write, lives here too.
//!
//! At-least-once has no state of its own: the slot decides what is a
//! repeat, and its records go out from the timer (`Recorder`).

use std::time::Duration;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::history::Begins;
use crate::pipeline::sink::transactions::TxnError;
use crate::pipeline::sink::KafkaSink;

use super::errors::PipelineError;
use super::refused::Refused;

pub(super) mod exactly_once;
pub(super) mod record;

pub(super) use exactly_once::Transactions;
use record::Recorder;

/// Where the loop stands at the top of a turn, for the commit decision:
/// at a Postgres transaction boundary with every record handed to the
/// producer (`at_boundary`), and whether waiting longer gains nothing
/// (`now`: the stream has nothing more ready, reading is blocked, or the
/// relay is stopping).
#[derive(Debug, Clone, Copy)]
pub(super) struct Turn {
    pub(super) at_boundary: bool,
    pub(super) now: bool,
}

/// What a hook may touch besides the mode's own state.
pub(super) struct Env<'a> {
    pub(super) sink: &'a KafkaSink,
    pub(super) metrics: &'a Metrics,
    pub(super) recorder: Option<&'a mut Recorder>,
    /// The slot's position when the session started.
    pub(super) resumed_from: Lsn,
    /// Records Kafka refused in an earlier session's transaction: forgotten
    /// when the history forks (they name positions of the other history).
    pub(super) refused: &'a mut Refused,
}

pub(super) enum Delivery {
    AtLeastOnce,
    /// Set once the progress topic is read (`session::start_recording`),
    /// before the session applies any message.
    ExactlyOnce(Box<Transactions>),
}

impl Delivery {
    pub(super) fn is_exactly_once(&self) -> bool {
        matches!(self, Delivery::ExactlyOnce(_))
    }

    /// What the mode holds back from confirming: the position an open
    /// Kafka transaction began at, and whether the history check holds the
    /// slot where it was found.
    pub(super) fn holds(&self) -> (Option<Lsn>, bool) {
        match self {
            Delivery::AtLeastOnce => (None, false),
            Delivery::ExactlyOnce(t) => t.holds(),
        }
    }

    /// A Postgres transaction begins; whether it is in Kafka already.
    pub(super) fn begin(
        &mut self,
        env: &mut Env<'_>,
        begins: Begins,
    ) -> Result<bool, PipelineError> {
        match self {
            Delivery::AtLeastOnce => Ok(false),
            Delivery::ExactlyOnce(t) => t.begin(env, begins),
        }
    }

    /// A keepalive reported the server's WAL end.
    pub(super) fn passed(&mut self, env: &mut Env<'_>, wal_end: Lsn) -> Result<(), PipelineError> {
        match self {
            Delivery::AtLeastOnce => Ok(()),
            Delivery::ExactlyOnce(t) => t.passed(env, wal_end),
        }
    }

    /// The Postgres transaction being decoded is in Kafka already.
    pub(super) fn skipping(&self) -> bool {
        match self {
            Delivery::AtLeastOnce => false,
            Delivery::ExactlyOnce(t) => t.skipping(),
        }
    }

    /// A record of the current transaction is about to be enqueued.
    pub(super) fn before_enqueue(
        &mut self,
        sink: &KafkaSink,
        confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        match self {
            Delivery::AtLeastOnce => Ok(()),
            Delivery::ExactlyOnce(t) => t.before_enqueue(sink, confirmed),
        }
    }

    /// The Postgres transaction being decoded committed at `end_lsn`.
    pub(super) fn commit(&mut self, end_lsn: Lsn) {
        if let Delivery::ExactlyOnce(t) = self {
            t.commit(end_lsn);
        }
    }

    /// On the status timer: exactly-once records a position the checkpoint
    /// reached without an event, and watches how long its transaction is
    /// open. (At-least-once writes its records from the timer too, through
    /// the recorder: `Recorder::tick_at_least_once`.)
    pub(super) fn tick(
        &mut self,
        env: &mut Env<'_>,
        every: Duration,
        idle: bool,
        in_transaction: bool,
        confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        match self {
            Delivery::AtLeastOnce => Ok(()),
            Delivery::ExactlyOnce(t) => {
                t.watch(in_transaction);
                t.record_idle(env, every, idle, confirmed)
            }
        }
    }

    /// At the top of each turn of the loop; whether reading must wait (a
    /// commit is in flight).
    pub(super) fn turn(&mut self, env: &mut Env<'_>, turn: Turn) -> Result<bool, PipelineError> {
        match self {
            Delivery::AtLeastOnce => Ok(false),
            Delivery::ExactlyOnce(t) => t.turn(env, turn),
        }
    }

    /// A commit in flight finished.
    pub(super) fn committed(
        &mut self,
        env: &mut Env<'_>,
        result: Result<Result<(), TxnError>, tokio::task::JoinError>,
    ) -> Result<(), PipelineError> {
        match self {
            Delivery::AtLeastOnce => Ok(()),
            Delivery::ExactlyOnce(t) => t.committed(env, result),
        }
    }

    /// Waits for the commit in flight; pending forever when there is none.
    pub(super) async fn commit_finished(
        &mut self,
    ) -> Result<Result<(), TxnError>, tokio::task::JoinError> {
        match self {
            Delivery::AtLeastOnce => std::future::pending().await,
            Delivery::ExactlyOnce(t) => t.commit_finished().await,
        }
    }

    /// The session ends on an error, dropping its producer.
    pub(super) fn abandoned(&self, metrics: &Metrics) {
        if let Delivery::ExactlyOnce(t) = self {
            t.abandoned(metrics);
        }
    }

    /// Whether the session may end now.
    pub(super) fn settled(&self) -> bool {
        match self {
            Delivery::AtLeastOnce => true,
            Delivery::ExactlyOnce(t) => t.settled(),
        }
    }
}
