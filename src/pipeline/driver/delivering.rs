//! The session's side of the delivery mode: each hook called with the parts
//! of the state it may touch, and what the checkpoint is told the mode
//! holds back. The modes themselves are in `delivery/`.

use std::time::Duration;

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::Holds;
use crate::pipeline::history::Begins;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::transactions::TxnError;

use super::delivery::{Env, Turn};
use super::errors::PipelineError;
use super::state::State;

/// The parts a delivery hook may touch, borrowed from the state beside its
/// `delivery` field.
macro_rules! env {
    ($state:expr) => {
        &mut Env {
            sink: &$state.out.sink,
            metrics: &$state.metrics,
            recorder: $state.recorder.as_mut(),
            resumed_from: $state.pos.resumed_from,
            refused: &mut $state.dead.refused,
        }
    };
}

impl State {
    /// The most that may be confirmed now, as the checkpoint decides it from
    /// what each part holds back.
    pub(super) fn confirmable(&self) -> Lsn {
        let (open_transaction, unproven) = self.delivery.holds();
        self.checkpoint.confirmable(Holds {
            recorded: self.recorder.as_ref().map(|r| r.recorded),
            open_transaction,
            unproven_from: unproven.then_some(self.pos.resumed_from),
        })
    }

    /// A Postgres transaction begins (a non-transactional message: no xid
    /// and no commit time). Whether it is already in Kafka.
    pub(super) fn delivery_begin(&mut self, begins: Begins) -> Result<bool, PipelineError> {
        self.delivery.begin(env!(self), begins)
    }

    /// A keepalive: the server's WAL went past `wal_end`.
    pub(super) fn delivery_passed(&mut self, wal_end: Lsn) -> Result<(), PipelineError> {
        self.delivery.passed(env!(self), wal_end)
    }

    /// The Postgres transaction being decoded is in Kafka already.
    pub(super) fn skipping(&self) -> bool {
        self.delivery.skipping()
    }

    /// Before a record of the current Postgres transaction is enqueued.
    pub(super) fn before_enqueue(&mut self) -> Result<(), PipelineError> {
        let confirmed = self.checkpoint.confirmed();
        self.delivery.before_enqueue(&self.out.sink, confirmed)
    }

    /// The Postgres transaction being decoded committed at `end_lsn`.
    pub(super) fn delivery_commit(&mut self, end_lsn: Lsn) {
        self.delivery.commit(end_lsn);
    }

    /// On the status timer: the mode's records (a Kafka transaction of the
    /// progress record alone, or at-least-once's record of the checkpoint),
    /// at most once per `every`.
    pub(super) async fn delivery_tick(
        &mut self,
        cfg: &RelayConfig,
        every: Duration,
    ) -> Result<(), PipelineError> {
        let in_transaction = self.checkpoint.in_transaction();
        let idle = !in_transaction && self.out.waiting.is_empty();
        let confirmed = self.checkpoint.confirmed();
        self.delivery
            .tick(env!(self), every, idle, in_transaction, confirmed)?;
        if self.delivery.is_exactly_once() {
            return Ok(());
        }
        match self.recorder.as_mut() {
            Some(r) => {
                r.tick_at_least_once(cfg, &self.metrics, &self.out.sink, confirmed)
                    .await
            }
            None => Ok(()),
        }
    }

    /// At the top of each turn of the loop; whether reading must wait for a
    /// commit in flight.
    pub(super) fn delivery_turn(
        &mut self,
        cfg: &RelayConfig,
        stream_idle: bool,
        stopping: bool,
    ) -> Result<bool, PipelineError> {
        let turn = Turn {
            at_boundary: !self.checkpoint.in_transaction() && self.out.waiting.is_empty(),
            now: stream_idle || stopping || !self.has_room(cfg),
        };
        self.delivery.turn(env!(self), turn)
    }

    /// A commit in flight finished.
    pub(super) fn delivery_committed(
        &mut self,
        result: Result<Result<(), TxnError>, tokio::task::JoinError>,
    ) -> Result<(), PipelineError> {
        self.delivery.committed(env!(self), result)
    }

    /// The session ends on an error.
    pub(super) fn delivery_abandoned(&self) {
        self.delivery.abandoned(&self.metrics);
    }

    /// Whether a stop may end the session now: no Kafka transaction open,
    /// and every confirmed position recorded.
    pub(super) fn delivery_settled(&self) -> bool {
        let confirmed = self.checkpoint.confirmed();
        self.delivery.settled()
            && self
                .recorder
                .as_ref()
                .is_none_or(|r| r.holds_all(confirmed))
    }

    /// The report of a progress record.
    pub(super) fn progress_delivered(
        &mut self,
        result: Result<crate::pipeline::sink::Delivered, rdkafka::error::KafkaError>,
    ) -> Result<(), PipelineError> {
        let exactly_once = self.delivery.is_exactly_once();
        match self.recorder.as_mut() {
            Some(r) => r.delivered(result, exactly_once),
            None => Ok(()),
        }
    }
}
