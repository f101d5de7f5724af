//! One replication session from set-up to teardown: open it, start the
//! progress record, run the loop (`turns`), and settle what is in flight
//! by how it ended.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::source::{ReplicationMessage, ReplicationReader, ReplicationWriter};

use super::background::Background;
use super::errors::PipelineError;
use super::open::open;
use super::starting::{start_recording, while_starting, Start};
use super::state::State;
use super::turns::stream_loop;
use super::Summary;

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
    let (slot, status_interval) = (opened.slot, opened.status_interval);
    let (system_id, history) = (opened.system_id, opened.history);
    let mut io = (opened.stream.reader, opened.stream.writer);
    summary.streamed = true;
    crate::observe::announce::streaming(&cfg.slot, slot.confirmed);
    summary.confirmed = slot.confirmed;
    metrics.set_streaming(true);
    let background = Background::spawn(cfg, opened.sink.prober(), &metrics);
    let start = Start {
        system_id: &system_id,
        history: &history,
        resume,
        found: slot.confirmed,
        forked: carry.forked.take(),
    };
    let mut state = State::new(
        cfg,
        slot.confirmed,
        opened.protocol,
        (opened.sink, opened.acks),
        metrics,
        carry,
    );
    let result = run(
        cfg,
        &mut state,
        &mut io,
        start,
        status_interval,
        shutdown.as_mut(),
    )
    .await;
    let result = match result {
        Err(e) => Err(state.eos_cause(e).await),
        ok => ok,
    };
    if let Err(PipelineError::HistoryForked(f)) = &result {
        carry.forked = Some(*f);
    }
    settle(cfg, &mut state, &result).await;
    drop(background);
    teardown(state, carry, summary, &mut io, &result).await;
    result
}

/// The session's start, then its loop.
async fn run(
    cfg: &RelayConfig,
    state: &mut State,
    (reader, writer): &mut (ReplicationReader, ReplicationWriter),
    start: Start<'_>,
    status_interval: Duration,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), PipelineError> {
    let found = start.found;
    let recording = start_recording(cfg, state, start);
    let started =
        while_starting(recording, writer, found, status_interval, shutdown.as_mut()).await?;
    if !started {
        state.metrics.set_stopping();
        tracing::info!("shutting down before the session's first turn: nothing was published");
        return Ok(());
    }
    stream_loop(cfg, status_interval, state, reader, writer, shutdown).await
}

/// What the next session takes over, the figures, the last status update
/// and, after a clean stop, the copy's orderly end.
async fn teardown(
    mut state: State,
    carry: &mut super::Carry,
    summary: &mut Summary,
    (reader, writer): &mut (ReplicationReader, ReplicationWriter),
    result: &Result<(), PipelineError>,
) {
    carry.column_types = state.router.column_types().clone();
    carry.refused = std::mem::take(&mut state.dead.refused);
    carry.refused.forget_before(state.confirmable());
    state.summary.confirmed = state.confirmable();
    state.summary.streamed = true;
    state.update_gauges();
    *summary = state.summary.clone();
    // Whatever happened, report the last safe position; a failure here only
    // means the connection is already gone.
    let _ = writer.send_status(state.confirmable(), false).await;
    if result.is_ok() {
        close(reader, writer).await;
    }
    tracing::info!(
        events = summary.events,
        transactions = summary.transactions,
        confirmed = %summary.confirmed,
        "replication stopped"
    );
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
        Err(PipelineError::Delivery(_)) => state.out.sink.abandon(),
        // Exactly-once: the open Kafka transaction is dropped with the
        // producer; the next session's init_transactions aborts it.
        Err(PipelineError::Transaction(_) | PipelineError::Refused(_)) => state.out.sink.abandon(),
        Err(PipelineError::Replication(_) | PipelineError::ServerEnded) | Ok(()) => {}
        // The stop already waited its time for the deliveries.
        Err(PipelineError::ShutdownTimeout { .. }) => {}
        // Stopping on a bad event: let what was already handed to the
        // producer arrive, so the slot stops right before the bad event
        // rather than at an older position (fewer repeats on restart).
        Err(_) => settle_in_flight(state, cfg.shutdown_timeout).await,
    }
}

/// Waits (up to `limit`) for the delivery reports of events in flight, so
/// the checkpoint covers everything delivered before a stop. Failures here
/// only leave the position where it is.
pub(super) async fn settle_in_flight(state: &mut State, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    // Wait for reports still owed; a failed event already reported is not
    // owed one, though the checkpoint still counts it as unconfirmed.
    while !state.out.window.is_empty() {
        match tokio::time::timeout_at(deadline, state.out.acks.recv()).await {
            Ok(Some(ack)) => {
                state.out.refresh_ack_clock();
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
