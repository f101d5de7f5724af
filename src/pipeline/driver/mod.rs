//! The pipeline: replication source → pgoutput decoder → router → Kafka sink
//! → LSN checkpoint, driven by one task.
//!
//! One task owns every stage, so the order in which WAL messages are decoded,
//! routed and enqueued is the commit order, and the checkpoint needs no lock.
//! The task waits on three things at once: the next WAL message (only while
//! fewer than `max_inflight` events are unacknowledged: backpressure), the
//! producer's delivery reports, and a timer that sends standby status updates
//! — even while reading is paused, so a slow broker never gets the walsender
//! killed for replication timeout.
//!
//! `open` sets a session up (`checks`: the slot and the publication),
//! `starting` reads the progress record and picks the delivery mode,
//! `session` runs it from set-up to teardown and `turns` is its loop. The
//! loop works on `state`, in owned parts, each a type in its own file:
//! `decoding` (the decoder, the stream buffer, a committed streamed
//! transaction being replayed), `outlet` (the sink, its reports, the
//! `window` in flight, records waiting), `position` (where the stream is),
//! `dead_letters` (the policy, queued dead letters, `refused`), `tally`
//! (counters), and `delivery` (the delivery mode, one type, and the
//! progress record). Methods that need several parts live by concern:
//! `apply`, `enqueue`, `reports`, `bad_events`, `delivering` (each delivery
//! hook handed the parts it may touch), `cause` (what failed a Kafka
//! transaction). `errors` says which failures are retriable; `background`
//! runs the probe, `slot_watch` and `heartbeat` beside the session.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::settings::RelayConfig;

mod apply;
mod background;
mod bad_events;
mod cause;
mod checks;
mod dead_letters;
mod decoding;
mod delivering;
mod delivery;
mod enqueue;
mod errors;
mod heartbeat;
mod open;
mod outlet;
mod position;
mod refused;
mod reports;
mod session;
mod slot_watch;
mod starting;
mod state;
mod tally;
mod turns;
mod window;

pub use errors::{BatchTooLarge, DeliveryFailure, PipelineError, RefusedInTransaction};
pub use heartbeat::HEARTBEAT_PREFIX;
pub use open::{parse_pg_duration, protocol_for};
pub use refused::Refused;
use session::session;

/// How often the task checks whether the confirmed position moved; bounds the
/// delay between an acknowledgement and the slot moving.
const FEEDBACK_TICK: Duration = Duration::from_millis(100);

/// Most WAL messages handled per turn of the loop when they are already
/// buffered; delivery reports and status updates get their turn in between.
const READ_BURST: usize = 1024;

/// How long a lone "too large" delivery report waits for others of its
/// batch before it counts as a record too large by itself.
const TOO_LARGE_SETTLE: Duration = Duration::from_millis(300);

/// Changes of a committed streamed transaction handed over per turn of the
/// loop.
const REPLAY_SLICE: usize = 256;

/// Figures of one run, for the exit log line and tests.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The session got as far as streaming (it held the slot).
    pub streamed: bool,
    pub events: u64,
    pub transactions: u64,
    pub confirmed: Lsn,
}

/// What one session leaves to the next, in one process.
#[derive(Debug, Default)]
pub struct Carry {
    /// The mapped columns' types as the first session saw them.
    pub column_types: crate::pipeline::route::router::ColumnTypes,
    /// Exactly-once: records Kafka refused, to dead-letter on the way again.
    pub refused: Refused,
    /// Exactly-once: a fork the last session found under transactions it
    /// held as in Kafka, so that the next one publishes them.
    pub forked: Option<crate::pipeline::history::Forked>,
}

/// One replication session: connect, check the slot, stream until
/// `shutdown` resolves or an error stops it.
///
/// `resume` is the position this process confirmed in an earlier session, if
/// any: the slot must not be found past it, or someone moved the slot over
/// events this relay never delivered. Returns the figures of the session
/// alongside its outcome, so a supervisor can resume from them.
pub async fn run(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    carry: &mut Carry,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> (Summary, Result<(), PipelineError>) {
    let mut summary = Summary {
        confirmed: resume.unwrap_or_default(),
        ..Summary::default()
    };
    let result = session(cfg, resume, carry, metrics.clone(), shutdown, &mut summary).await;
    metrics.set_streaming(false);
    (summary, result)
}
