//! One replication session from set-up to teardown: the loop that waits on
//! WAL messages (while there is room in flight), delivery reports and the
//! status timer, and the clean stop that settles what is in flight.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::history::{Forked, ServerHistory};
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::Prober;
use crate::pipeline::source::{ReplicationMessage, ReplicationReader, ReplicationWriter};

use super::delivery::record::moved_by_us;
use super::delivery::record::Recorder;
use super::delivery::{Delivery, Transactions};
use super::errors::PipelineError;
use super::heartbeat::heartbeat;
use super::open::{open, timed_out, Opened};
use super::slot_watch::slot_watch;
use super::state::State;
use super::{Summary, FEEDBACK_TICK, READ_BURST, REPLAY_SLICE};

pub(super) async fn session(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    carry: &mut super::Carry,
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
        system_id,
        history,
    } = opened;
    let (mut reader, mut writer) = (stream.reader, stream.writer);
    summary.streamed = true;
    crate::observe::announce::streaming(&cfg.slot, slot.confirmed);
    summary.confirmed = slot.confirmed;
    metrics.set_streaming(true);
    let probe = spawn_probe(sink.prober(), metrics.clone());
    let heartbeat = cfg
        .heartbeat_interval
        .map(|every| tokio::spawn(heartbeat(cfg.clone(), every, metrics.clone())));
    let slot_watch = tokio::spawn(slot_watch(cfg.clone(), metrics.clone()));

    let forked = carry.forked.take();
    let mut state = State::new(cfg, slot.confirmed, protocol, (sink, acks), metrics, carry);
    let result = async {
        let found = slot.confirmed;
        let recording = start_recording(
            cfg,
            &mut state,
            (&system_id, &history),
            resume,
            found,
            forked,
        );
        let started = while_starting(
            recording,
            &mut writer,
            found,
            status_interval,
            shutdown.as_mut(),
        )
        .await?;
        if !started {
            state.metrics.set_stopping();
            tracing::info!("shutting down before the session's first turn: nothing was published");
            return Ok(());
        }
        stream_loop(
            cfg,
            status_interval,
            &mut state,
            &mut reader,
            &mut writer,
            shutdown.as_mut(),
        )
        .await
    }
    .await;
    let result = match result {
        Err(e) => Err(state.eos_cause(e).await),
        ok => ok,
    };
    if let Err(PipelineError::HistoryForked(f)) = &result {
        carry.forked = Some(*f);
    }
    settle(cfg, &mut state, &result).await;
    probe.abort();
    slot_watch.abort();
    if let Some(h) = heartbeat {
        h.abort();
    }
    carry.column_types = state.router.column_types().clone();
    carry.refused = std::mem::take(&mut state.refused);
    carry.refused.forget_before(state.confirmable());
    state.summary.confirmed = state.confirmable();
    state.summary.streamed = true;
    state.update_gauges();
    *summary = state.summary.clone();
    // Whatever happened, report the last safe position; a failure here only
    // means the connection is already gone.
    let _ = writer.send_status(state.confirmable(), false).await;
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

/// What the session's end does with what is in flight, by how it ended.
async fn settle(cfg: &RelayConfig, state: &mut State, result: &Result<(), PipelineError>) {
    if result.is_err() {
        state.delivery_abandoned();
    }
    match result {
        // A delivery failed: records enqueued after it must not reach the
        // broker before it is sent again, or a partition would hold them out
        // of commit order. Abandon the producer now; the next session
        // resumes from the slot.
        Err(PipelineError::Delivery(_)) => state.sink.abandon(),
        // Exactly-once: the open Kafka transaction is dropped with the
        // producer; the next session's init_transactions aborts it.
        Err(PipelineError::Transaction(_) | PipelineError::Refused(_)) => state.sink.abandon(),
        Err(PipelineError::Replication(_) | PipelineError::ServerEnded) | Ok(()) => {}
        // The stop already waited its time for the deliveries.
        Err(PipelineError::ShutdownTimeout { .. }) => {}
        // Stopping on a bad event: let what was already handed to the
        // producer arrive, so the slot stops right before the bad event
        // rather than at an older position (fewer repeats on restart).
        Err(_) => settle_in_flight(state, cfg.shutdown_timeout).await,
    }
}

/// Once the slot is this session's: with exactly-once the transactional.id
/// registered first; the progress topic read; the slot's position checked
/// against it.
async fn start_recording(
    cfg: &RelayConfig,
    state: &mut State,
    (system_id, server): (&str, &ServerHistory),
    resume: Option<Lsn>,
    found: Lsn,
    forked: Option<Forked>,
) -> Result<(), PipelineError> {
    let Some(topic) = &cfg.progress_topic else {
        return Ok(());
    };
    let Some(e) = &cfg.exactly_once else {
        // Found moved: only the record can say by whom. Unreadable, the
        // session ends and the next asks again (review N6): only a record
        // that shows the slot beyond it makes the move someone else's.
        if resume.is_some_and(|ours| found > ours) {
            let mut recorder = Recorder::start_within(
                cfg,
                topic,
                system_id,
                server,
                found,
                std::time::Duration::from_secs(15),
            )
            .await?;
            moved_by_us(
                cfg,
                resume,
                found,
                recorder.at_start.as_ref(),
                server.timeline,
            )?;
            // At-least-once publishes whatever the stream sends: a fork
            // changes nothing it does, but is said and counted.
            recorder.judge(
                &state.metrics,
                found,
                None,
                "at-least-once publishes everything the slot sends",
            );
            state.recorder = Some(recorder);
            return Ok(());
        }
        state.recorder = Some(Recorder::start_in_background(
            cfg, topic, system_id, server, resume, found,
        ));
        return Ok(());
    };
    Transactions::register(&state.sink).await?;
    let ours = e.transactional_id(system_id, &cfg.slot);
    let mut recorder = Recorder::start(cfg, topic, system_id, server, found).await?;
    // Review N7: fencing works between producers of one transactional.id,
    // and relays of a slot may have been given different ones. The last
    // writer named in the record is fenced too, and the record read again
    // after it (what it left open is aborted, and nothing of it can commit
    // behind the read).
    let theirs = recorder
        .at_start
        .as_ref()
        .and_then(|p| p.transactional_id.clone())
        .filter(|id| *id != ours);
    if let Some(theirs) = theirs {
        Transactions::fence(cfg, &theirs, &ours).await?;
        recorder = Recorder::start(cfg, topic, system_id, server, found).await?;
    }
    recorder.transactional_id = Some(ours);
    moved_by_us(
        cfg,
        resume,
        found,
        recorder.at_start.as_ref(),
        server.timeline,
    )?;
    let judged = recorder.judge(
        &state.metrics,
        found,
        forked,
        "exactly-once publishes every transaction of the new history",
    );
    if judged.fork.is_some() {
        // Its notes name positions of the other history.
        state.refused = Default::default();
    }
    state.delivery = Delivery::ExactlyOnce(Box::new(Transactions::new(
        e,
        recorder.commit_lsn,
        recorder.anchor,
        judged.in_kafka,
    )));
    state.recorder = Some(recorder);
    Ok(())
}

/// Runs the session's start (`recording`: the transactional.id registered,
/// the progress topic read, which Kafka may make take up to a minute) while
/// the slot is already this session's: status updates keep going out at
/// the position the slot was found at, so the server and a relay with
/// --terminate-stale-walsender see a live client, and a stop is honoured at
/// once (review N5). Returns false when stopped before it finished.
async fn while_starting(
    recording: impl Future<Output = Result<(), PipelineError>>,
    writer: &mut ReplicationWriter,
    found: Lsn,
    status_interval: Duration,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<bool, PipelineError> {
    tokio::pin!(recording);
    let mut tick = tokio::time::interval((status_interval / 2).max(FEEDBACK_TICK));
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(false),
            done = &mut recording => return done.map(|()| true),
            _ = tick.tick() => writer.send_status(found, false).await?,
        }
    }
}

/// Asks the broker for metadata every 5 s, for readiness (the broker answers
/// even when no event flows) and to notice a topic's partition count change.
fn spawn_probe(mut prober: Prober, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // The metadata request blocks: keep it off the runtime's threads.
            let asked = tokio::task::spawn_blocking(move || {
                let report = prober.probe(Duration::from_secs(3));
                (report, prober)
            })
            .await;
            let Ok((report, back)) = asked else { return };
            prober = back;
            metrics.set_broker_reachable(report.reachable);
            if let Some((topic, count)) = &report.partitions {
                metrics.topic_partitions(topic).set(i64::from(*count));
                // The series exists from the first probe on: an alert's
                // increase() then sees the first move too.
                metrics.partition_count_changes(topic);
                if let Some(before) = report.changed_from {
                    tracing::warn!(
                        topic = %topic,
                        before,
                        now = count,
                        "the topic's partition count changed: each key stays on its partition until none of the topic's records is in flight, then keys map by the new count (an aggregate's events before the move are all written before any after it). Consumers that read partitions at different speeds may still see an aggregate's newer events first: to avoid that, add partitions with the relay stopped and consumers caught up"
                    );
                }
            }
            for moved in &report.remapped {
                metrics.partition_count_changes(&moved.topic).inc();
                tracing::info!(
                    topic = %moved.topic,
                    from = moved.from,
                    to = moved.to,
                    "keys now map by the topic's new partition count: every earlier record of the topic was written"
                );
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}

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
                    state.server_wal = state.server_wal.max(wal_end);
                    state.on_xlog(wal_start, data).await?;
                }
                ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    state.server_wal = state.server_wal.max(wal_end);
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
                && state.replaying.is_none()
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
        let replaying = state.replaying.is_some();
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
            Some(ack) = state.acks.recv() => {
                state.refresh_ack_clock();
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

/// Waits (up to `limit`) for the delivery reports of events in flight, so
/// the checkpoint covers everything delivered before a stop. Failures here
/// only leave the position where it is.
pub(super) async fn settle_in_flight(state: &mut State, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    // Wait for reports still owed; a failed event already reported is not
    // owed one, though the checkpoint still counts it as unconfirmed.
    while !state.window.is_empty() {
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
pub(super) async fn close(reader: &mut ReplicationReader, writer: &mut ReplicationWriter) {
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
