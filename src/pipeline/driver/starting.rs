//! A session's start, once the slot is its own: the transactional.id
//! registered (exactly-once), the progress topic read, and the slot's
//! position checked against it, while status updates keep going out.

use std::future::Future;
use std::time::Duration;

use crate::lsn::Lsn;
use crate::pipeline::history::{Forked, ServerHistory};
use crate::pipeline::settings::{ExactlyOnceConfig, RelayConfig};
use crate::pipeline::source::ReplicationWriter;

use super::delivery::record::Recorder;
use super::delivery::{Delivery, Transactions};
use super::errors::PipelineError;
use super::state::State;
use super::FEEDBACK_TICK;

/// What the session found when it took the slot.
pub(super) struct Start<'a> {
    pub(super) system_id: &'a str,
    pub(super) history: &'a ServerHistory,
    /// The position this process confirmed in an earlier session.
    pub(super) resume: Option<Lsn>,
    /// The slot's confirmed position now.
    pub(super) found: Lsn,
    /// A fork the last session found (`Carry::forked`).
    pub(super) forked: Option<Forked>,
}

/// Once the slot is this session's: with exactly-once the transactional.id
/// registered first; the progress topic read; the slot's position checked
/// against it.
pub(super) async fn start_recording(
    cfg: &RelayConfig,
    state: &mut State,
    start: Start<'_>,
) -> Result<(), PipelineError> {
    let Some(topic) = &cfg.progress_topic else {
        return Ok(());
    };
    let recorder = match &cfg.exactly_once {
        None => at_least_once(cfg, state, topic, start).await?,
        Some(e) => {
            let (recorder, transactions) = exactly_once(cfg, e, state, topic, start).await?;
            state.delivery = Delivery::ExactlyOnce(Box::new(transactions));
            recorder
        }
    };
    state.recorder = Some(recorder);
    Ok(())
}

async fn at_least_once(
    cfg: &RelayConfig,
    state: &State,
    topic: &str,
    start: Start<'_>,
) -> Result<Recorder, PipelineError> {
    let Start {
        system_id,
        history: server,
        resume,
        found,
        ..
    } = start;
    // Not moved: the record is read in the background, and streaming
    // starts at once (Kafka may be away).
    if resume.is_none_or(|ours| found <= ours) {
        return Ok(Recorder::start_in_background(
            cfg, topic, system_id, server, resume, found,
        ));
    }
    // Found moved: only the record can say by whom. Unreadable, the
    // session ends and the next asks again (review N6): only a record
    // that shows the slot beyond it makes the move someone else's.
    let mut recorder = Recorder::start_within(
        cfg,
        topic,
        system_id,
        server,
        found,
        Duration::from_secs(15),
    )
    .await?;
    // At-least-once publishes whatever the stream sends: a fork
    // changes nothing it does, but is said and counted.
    recorder.settle(
        cfg,
        &state.metrics,
        resume,
        found,
        None,
        "at-least-once publishes everything the slot sends",
    )?;
    Ok(recorder)
}

async fn exactly_once(
    cfg: &RelayConfig,
    e: &ExactlyOnceConfig,
    state: &mut State,
    topic: &str,
    start: Start<'_>,
) -> Result<(Recorder, Transactions), PipelineError> {
    let Start {
        system_id,
        history: server,
        resume,
        found,
        forked,
    } = start;
    Transactions::register(&state.out.sink).await?;
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
    let judged = recorder.settle(
        cfg,
        &state.metrics,
        resume,
        found,
        forked,
        "exactly-once publishes every transaction of the new history",
    )?;
    if judged.fork.is_some() {
        // Its notes name positions of the other history.
        state.dead.refused = Default::default();
    }
    let transactions = Transactions::new(e, recorder.commit_lsn, recorder.anchor, judged.in_kafka);
    Ok((recorder, transactions))
}

/// Runs the session's start (`recording`: the transactional.id registered,
/// the progress topic read, which Kafka may make take up to a minute) while
/// the slot is already this session's: status updates keep going out at
/// the position the slot was found at, so the server and a relay with
/// --terminate-stale-walsender see a live client, and a stop is honoured at
/// once (review N5). Returns false when stopped before it finished.
pub(super) async fn while_starting(
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
