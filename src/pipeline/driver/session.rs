//! One replication session from set-up to teardown: the loop that waits on
//! WAL messages (while there is room in flight), delivery reports and the
//! status timer, and the clean stop that settles what is in flight.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::RelayConfig;
use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::checkpoint::Checkpoint;
use crate::pipeline::decode::pgoutput;
use crate::pipeline::decode::stream_buffer::StreamBuffer;
use crate::pipeline::route::router::Router;
use crate::pipeline::sink::inflight::InFlight;
use crate::pipeline::source::{ReplicationMessage, ReplicationReader, ReplicationWriter};

use super::errors::PipelineError;
use super::heartbeat::heartbeat;
use super::open::{open, timed_out, Opened};
use super::state::State;
use super::{Summary, FEEDBACK_TICK, READ_BURST, REPLAY_SLICE};

pub(super) async fn session(
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
