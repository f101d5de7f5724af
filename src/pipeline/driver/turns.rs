//! The session's loop: each turn waits on the next WAL messages (while
//! there is room in flight), delivery reports, a commit in flight and the
//! status timer, and a stop finishes the open transaction first.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::source::{ReplicationMessage, ReplicationReader, ReplicationWriter};

use super::errors::PipelineError;
use super::open::timed_out;
use super::state::State;
use super::{FEEDBACK_TICK, READ_BURST, REPLAY_SLICE};

/// The loop's own bookkeeping: what was last reported to the server, the
/// stop in progress, and liveness (when the server last sent anything, and
/// whether the relay already asked it for a keepalive since).
struct Turns {
    last_sent: Lsn,
    last_sent_at: Instant,
    shutdown_deadline: Option<Instant>,
    last_heard: Instant,
    pinged: bool,
    /// The last burst of reading ended because nothing more was buffered:
    /// an exactly-once transaction at a boundary may commit now.
    stream_idle: bool,
}

impl Turns {
    async fn send_status(
        &mut self,
        writer: &mut ReplicationWriter,
        confirmed: Lsn,
        reply_requested: bool,
    ) -> Result<(), PipelineError> {
        writer.send_status(confirmed, reply_requested).await?;
        self.last_sent = confirmed;
        self.last_sent_at = Instant::now();
        Ok(())
    }

    fn begin_stop(&mut self, cfg: &RelayConfig, state: &State, what: &str) {
        tracing::info!(
            inflight = state.checkpoint.inflight(),
            "shutting down: finishing {what} and in-flight deliveries"
        );
        self.shutdown_deadline = Some(Instant::now() + cfg.shutdown_timeout);
        state.metrics.set_stopping();
    }

    fn check_deadline(&self, state: &State) -> Result<(), PipelineError> {
        match self.shutdown_deadline {
            Some(deadline) if Instant::now() >= deadline => Err(PipelineError::ShutdownTimeout {
                inflight: state.checkpoint.inflight(),
                confirmed: state.confirmable(),
            }),
            _ => Ok(()),
        }
    }

    /// A committed streamed transaction is handed over in slices; between
    /// slices, delivery reports, status updates and a stop go on (a stop
    /// finishes the transaction within the deadline).
    async fn replay_turn(
        &mut self,
        cfg: &RelayConfig,
        state: &mut State,
        writer: &mut ReplicationWriter,
        shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), PipelineError> {
        if self.shutdown_deadline.is_none() && poll_once(shutdown) {
            self.begin_stop(cfg, state, "the streamed transaction being published");
        }
        self.check_deadline(state)?;
        state.replay_some(REPLAY_SLICE, cfg).await?;
        state.drain_acks()?;
        state.flush_redo().await?;
        state.pump_waiting()?;
        if self.last_sent_at.elapsed() >= FEEDBACK_TICK {
            state.update_gauges();
            self.send_status(writer, state.confirmable(), false).await?;
        }
        Ok(())
    }

    /// The status timer: retries for the producer's queue, a decision on
    /// records refused as too large, the status update, liveness and the
    /// stop's deadline.
    async fn on_tick(
        &mut self,
        cfg: &RelayConfig,
        status_interval: Duration,
        state: &mut State,
        writer: &mut ReplicationWriter,
    ) -> Result<(), PipelineError> {
        // Room in the producer's queue may come without a report of ours
        // (another caller's, a purge): try again now and then.
        state.pump_waiting()?;
        state.settle_too_large()?;
        state.flush_redo().await?;
        // On a stop, record at once: the relay exits when the slot has
        // what was delivered.
        let every = if self.shutdown_deadline.is_some() {
            Duration::ZERO
        } else {
            status_interval
        };
        state.delivery_tick(cfg, every).await?;
        state.update_gauges();
        let confirmed = state.confirmable();
        if confirmed != self.last_sent || self.last_sent_at.elapsed() >= status_interval {
            if confirmed != self.last_sent {
                tracing::debug!(%confirmed, "confirmed position moved");
            }
            self.send_status(writer, confirmed, false).await?;
        }
        if let Some(limit) = cfg.replication_timeout {
            let quiet = self.last_heard.elapsed();
            if quiet >= limit {
                return Err(timed_out("streaming", limit));
            }
            // Like Postgres's walreceiver: half-way, ask for a keepalive, so
            // an idle but healthy server answers.
            if quiet >= limit / 2 && !self.pinged {
                self.send_status(writer, confirmed, true).await?;
                self.pinged = true;
            }
        }
        self.check_deadline(state)
    }

    /// What the socket already delivered, handled in one go within the same
    /// limits as reading: one turn of the loop per burst, not per message.
    async fn on_messages(
        &mut self,
        cfg: &RelayConfig,
        first: ReplicationMessage,
        state: &mut State,
        reader: &mut ReplicationReader,
        writer: &mut ReplicationWriter,
    ) -> Result<(), PipelineError> {
        self.last_heard = Instant::now();
        self.pinged = false;
        let stopping = self.shutdown_deadline.is_some();
        let mut next = Some(first);
        let mut burst = 0;
        while let Some(m) = next.take() {
            match m {
                ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    data,
                    ..
                } => {
                    state.pos.heard(wal_end);
                    state.on_xlog(wal_start, data).await?;
                }
                ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    state.pos.heard(wal_end);
                    state.delivery_passed(wal_end)?;
                    // An open streamed transaction commits later and is sent
                    // again whole after a crash, but confirming past its
                    // start would let a restart begin decoding after it.
                    if state
                        .decoding
                        .stream()
                        .is_none_or(|b| b.open_transactions() == 0)
                    {
                        state.checkpoint.idle(wal_end);
                    }
                    if reply_requested {
                        self.send_status(writer, state.confirmable(), false).await?;
                    }
                }
                ReplicationMessage::CopyDone => return Err(PipelineError::ServerEnded),
            }
            burst += 1;
            let keep_reading = burst < READ_BURST
                && !state.decoding.is_replaying()
                && state.has_room(cfg)
                && (!stopping || state.checkpoint.in_transaction());
            if keep_reading {
                next = reader.try_next()?;
                self.stream_idle = next.is_none();
            } else {
                self.stream_idle = false;
            }
        }
        Ok(())
    }
}

pub(super) async fn stream_loop(
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
    let mut turns = Turns {
        last_sent: state.confirmable(),
        last_sent_at: Instant::now(),
        shutdown_deadline: None,
        last_heard: Instant::now(),
        pinged: false,
        stream_idle: false,
    };
    writer.send_status(turns.last_sent, false).await?;

    loop {
        state.metrics.loop_turned();
        let stopping = turns.shutdown_deadline.is_some();
        // On shutdown, finish the open transaction so that a restart resends
        // nothing that was published: the server sends whole transactions.
        if stopping
            && !state.checkpoint.in_transaction()
            && state.checkpoint.inflight() == 0
            && state.delivery_settled()
        {
            return Ok(());
        }
        let committing = state.delivery_turn(cfg, turns.stream_idle, stopping)?;
        let replaying = state.decoding.is_replaying();
        let room = state.has_room(cfg);
        let can_read =
            !replaying && !committing && room && (!stopping || state.checkpoint.in_transaction());
        if !can_read {
            // Not reading (backpressure, a replay): silence from the server
            // says nothing now. A dead connection still shows when a status
            // update cannot be written (TCP_USER_TIMEOUT bounds that).
            turns.last_heard = Instant::now();
            turns.pinged = false;
        }
        if replaying && room {
            turns
                .replay_turn(cfg, state, writer, shutdown.as_mut())
                .await?;
            continue;
        }
        tokio::select! {
            biased;
            () = &mut shutdown, if !stopping => {
                turns.begin_stop(cfg, state, "the open transaction");
            }
            Some(ack) = state.out.acks.recv() => {
                state.out.refresh_ack_clock();
                state.on_ack(ack)?;
                // Reports that came with it, then a decision on records
                // refused as too large.
                state.drain_acks()?;
                state.flush_redo().await?;
                state.pump_waiting()?;
            }
            finished = state.delivery.commit_finished(), if committing => {
                state.delivery_committed(finished)?;
                state.drain_acks()?;
            }
            // Before the WAL: under a continuous stream the read branch is
            // always ready, and status updates must not wait behind it.
            _ = tick.tick() => turns.on_tick(cfg, status_interval, state, writer).await?,
            msg = reader.next(), if can_read => {
                turns.on_messages(cfg, msg?, state, reader, writer).await?;
            }
        }
    }
}

/// Whether `f` is ready now, without waiting: lets a loop that is busy
/// (a replay) notice a stop between slices of work.
pub(super) fn poll_once<F: Future<Output = ()>>(f: std::pin::Pin<&mut F>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx).is_ready()
}
