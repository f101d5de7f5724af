//! When an exactly-once session's Kafka transaction commits (at a Postgres
//! transaction boundary, when the stream pauses, the window fills or a stop
//! begins), the commit in flight, and what its outcome does.

use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::sink::transactions::{TxnError, TxnFailure};
use crate::pipeline::sink::Enqueued;

use super::super::super::errors::PipelineError;
use super::super::{Env, Turn};
use super::{Transactions, TXN_CALL_TIMEOUT};

impl Transactions {
    /// On the status timer: the checkpoint moved past what the progress
    /// topic records without an event (keepalives over an idle outbox,
    /// skipped transactions). Before that position may be confirmed it is
    /// recorded, in a Kafka transaction of the progress record alone, at
    /// most once per `every`: so every position a relay of ours confirms is
    /// in Kafka first, and a slot found beyond the record was moved by
    /// someone else. `idle`: no Postgres transaction open, nothing waiting.
    pub(crate) fn record_idle(
        &mut self,
        env: &mut Env<'_>,
        every: Duration,
        idle: bool,
        confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        let Some(r) = env.recorder.as_deref() else {
            return Ok(());
        };
        if !idle
            || self.in_kafka.holds()
            || self.is_open()
            || self.committing.is_some()
            || confirmed <= r.recorded
            || r.last_at.elapsed() < every
        {
            return Ok(());
        }
        env.sink.begin_transaction()?;
        self.gate = Some(r.recorded);
        self.age.opened();
        self.confirm_target = Some(confirmed);
        Ok(())
    }

    /// Whether to commit the open Kafka transaction now: at a Postgres
    /// transaction boundary with every record handed to the producer, when
    /// it has run `--transaction-max-duration` or when waiting longer gains
    /// nothing ([`Turn`]).
    fn commit_due(&self, turn: Turn) -> bool {
        let record_only = self.last_in_batch.is_none();
        self.is_open()
            && self.committing.is_none()
            && self.confirm_target.is_some()
            && turn.at_boundary
            && (record_only || turn.now || self.age.over_max())
    }

    /// At the top of each turn of the loop: starts the commit when it is
    /// due; returns whether a commit is in flight (reading waits for it).
    pub(crate) fn turn(&mut self, env: &mut Env<'_>, turn: Turn) -> Result<bool, PipelineError> {
        if self.commit_due(turn) {
            self.start_commit(env)?;
        }
        Ok(self.committing())
    }

    /// Writes the progress record and starts the commit on a blocking thread.
    fn start_commit(&mut self, env: &mut Env<'_>) -> Result<(), PipelineError> {
        let Some(r) = env.recorder.as_deref() else {
            return Ok(());
        };
        let Some(target) = self.confirm_target else {
            return Ok(());
        };
        if self.commit_tries == 0 {
            let (commit_lsn, anchor) = match self.last_in_batch {
                Some(a) => (Some(a.commit_lsn), Some(a)),
                None => (self.committed, self.committed_anchor),
            };
            let value = r.value(commit_lsn, anchor, target);
            match env.sink.enqueue_progress(&r.id.topic, r.key(), &value)? {
                Enqueued::Yes => {}
                // The queue is full of this transaction's records: the commit
                // is retried on the next turn, once some are delivered.
                Enqueued::QueueFull => return Ok(()),
            }
        }
        self.committing = Some((
            env.sink.commit_transaction(TXN_CALL_TIMEOUT),
            Instant::now(),
        ));
        Ok(())
    }

    /// The commit finished. A retriable failure commits again; any other ends
    /// the session (the next one aborts what is left and resumes from the
    /// progress topic).
    pub(crate) fn committed(
        &mut self,
        env: &mut Env<'_>,
        result: Result<Result<(), TxnError>, tokio::task::JoinError>,
    ) -> Result<(), PipelineError> {
        let started = self.committing.take().map(|(_, at)| at);
        let outcome = result.unwrap_or_else(|_| {
            Err(TxnError {
                kind: TxnFailure::Fatal,
                what: "commit_transaction",
                error: rdkafka::error::KafkaError::Canceled,
            })
        });
        match outcome {
            Ok(()) => {
                if let Some(at) = started {
                    env.metrics
                        .kafka_commit_duration
                        .observe(at.elapsed().as_secs_f64());
                }
                env.metrics.kafka_transactions_committed.inc();
                if let Some(a) = self.last_in_batch.take() {
                    self.committed = Some(a.commit_lsn);
                    self.committed_anchor = Some(a);
                }
                if let (Some(target), Some(r)) =
                    (self.confirm_target.take(), env.recorder.as_deref_mut())
                {
                    r.recorded = r.recorded.max(target);
                    r.commit_lsn = self.committed;
                    r.anchor = self.committed_anchor;
                    r.last_at = Instant::now();
                }
                self.gate = None;
                self.commit_tries = 0;
                Ok(())
            }
            Err(e) if e.kind == TxnFailure::Retriable && self.commit_tries < 10 => {
                tracing::warn!(error = %e, "committing the Kafka transaction again");
                self.commit_tries += 1;
                self.start_commit(env)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A session that ends on an error drops its producer, and with it the
    /// open Kafka transaction (the next session's init_transactions aborts
    /// it): counted here, whatever the error.
    pub(crate) fn abandoned(&self, metrics: &Metrics) {
        if self.is_open() {
            metrics.kafka_transactions_aborted.inc();
        }
    }

    /// On the status timer: a Kafka transaction open for half its timeout is
    /// about to be aborted by the coordinator. A Postgres transaction is
    /// never split over Kafka transactions (consumers would see part of
    /// it), so one that takes longer than the timeout to publish cannot be
    /// published: say so while there is time to act.
    pub(crate) fn watch(&mut self, in_txn: bool) {
        if !self.is_open() {
            self.age.closed();
            return;
        }
        if let Some((open_for, timeout)) = self.age.half_timeout_passed() {
            tracing::warn!(
                open_for_s = open_for.as_secs_f64(),
                transaction_timeout_s = timeout.as_secs_f64(),
                in_one_postgres_transaction = in_txn && self.last_in_batch.is_none(),
                "a Kafka transaction has been open for half of transaction.timeout.ms; if it is not committed in time the coordinator aborts it and it is published again from the start. A Postgres transaction is never split, so one that takes longer than the timeout to publish needs a larger --kafka-property transaction.timeout.ms (at most the brokers' transaction.max.timeout.ms, 15 min by default)"
            );
        }
    }

    /// Whether the session may end now: no Kafka transaction open.
    pub(crate) fn settled(&self) -> bool {
        !self.is_open()
    }

    /// Waits for the commit in progress; pending forever when there is none
    /// (the loop only polls it while committing).
    pub(crate) async fn commit_finished(
        &mut self,
    ) -> Result<Result<(), TxnError>, tokio::task::JoinError> {
        match self.committing.as_mut() {
            Some((handle, _)) => handle.await,
            None => std::future::pending().await,
        }
    }
}
