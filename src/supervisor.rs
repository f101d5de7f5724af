//! Keeps the pipeline running: after a lost connection, a terminated
//! walsender, a broker outage longer than the producer's timeout or a slot
//! held by another relay, start a new session with bounded exponential
//! backoff. Each session resumes from the slot, so nothing is skipped and
//! repeats stay within the unacknowledged window. Errors that would fail
//! again the same way (a bad row, a missing slot, bad credentials) stop the
//! relay instead of looping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::RelayConfig;
use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::driver::{self, PipelineError, Summary};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How often a standby (another connection holds the slot) asks for it again.
/// It does not back off: an attempt is one replication connection and two
/// queries, stopped before Kafka, and this wait is most of the time a
/// takeover takes after the active relay dies.
const STANDBY_RETRY: Duration = Duration::from_millis(500);

/// A session that streamed this long counts as healthy: the next failure
/// starts the backoff from the beginning again.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// A session that got as far as streaming and lasted this long counts as
/// healthy too.
const STREAMED_OK: Duration = Duration::from_secs(5);

/// Totals over all sessions.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub events: u64,
    pub transactions: u64,
    pub sessions: u64,
    pub confirmed: Lsn,
}

impl Totals {
    /// One more session's figures.
    fn add(&mut self, session: &Summary) {
        self.sessions += 1;
        self.events += session.events;
        self.transactions += session.transactions;
        self.confirmed = session.confirmed;
    }
}

/// Doubles up to `max`.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff {
            next: FIRST_BACKOFF.min(max),
            max,
        }
    }

    /// The next wait: the doubling step, less up to a fifth at random, so
    /// that relays waiting on the same slot (a standby pair) do not retry in
    /// lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(1.0 - 0.2 * unit_random())
    }

    pub fn reset(&mut self) {
        self.next = FIRST_BACKOFF.min(self.max);
    }
}

/// A standby's wait before it asks for the slot again: STANDBY_RETRY less up to
/// a fifth at random, so two standbys do not ask in step.
fn standby_delay() -> Duration {
    STANDBY_RETRY.mul_f64(1.0 - 0.2 * unit_random())
}

/// A number in [0, 1) that differs between calls and processes (the
/// standard library's per-process random hash keys): enough for jitter.
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs sessions until `shutdown` turns true or a non-retriable error.
pub async fn run(
    cfg: &RelayConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Totals, PipelineError> {
    let mut totals = Totals::default();
    let mut backoff = Backoff::new(cfg.reconnect_max_backoff);
    let mut resume: Option<Lsn> = None;
    let mut carry = driver::Carry::default();
    // Whether the last session was refused because another connection holds
    // the slot. The gauge mirrors it; a session that streams clears the gauge.
    let mut standby = false;
    loop {
        let started = Instant::now();
        let mut rx = shutdown.clone();
        let stop = async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // A standby's attempts are not reconnects: it never had the slot.
        if totals.sessions > 0 && !standby {
            metrics.reconnects.inc();
        }
        let (summary, result): (Summary, _) =
            driver::run(cfg, resume, &mut carry, metrics.clone(), stop).await;
        totals.add(&summary);
        // Only a session that held the slot knows where it must be found
        // next time; one that never got it has nothing to compare.
        if summary.streamed {
            resume = Some(summary.confirmed);
        }
        let err = match result {
            Ok(()) => return Ok(totals),
            Err(e) => e,
        };
        let was_standby = standby;
        standby = err.slot_in_use();
        metrics.standby.set(i64::from(standby));
        if standby {
            // Another consumer holds the slot (a standby that took over, say):
            // from now on its progress is legitimate, so trust the slot.
            resume = None;
            // A standby told to stop while it asked for the slot owes
            // nothing: a clean stop, not a failure.
            if *shutdown.borrow() {
                tracing::info!("stopping while another relay holds the slot");
                return Ok(totals);
            }
        }
        if !err.is_retriable() || *shutdown.borrow() {
            return Err(stopped(err, totals.confirmed));
        }
        // A session that streamed and got something done was healthy: the
        // next failure is a new incident, not the same one retried, so the
        // wait starts short again (repeated walsender terminations would
        // otherwise climb to the cap).
        if started.elapsed() >= HEALTHY_SESSION
            || (summary.streamed && (summary.events > 0 || started.elapsed() >= STREAMED_OK))
        {
            backoff.reset();
        }
        let delay = if standby {
            standby_delay()
        } else {
            backoff.next_delay()
        };
        // Said once when it becomes a standby, not at every attempt.
        say_retry(&err, delay, standby && was_standby, totals.confirmed);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stop| *stop) => return Ok(totals),
        }
    }
}

/// The relay stops on `err`: its hint, and the announcement of where the
/// slot stands.
fn stopped(err: PipelineError, confirmed: Lsn) -> PipelineError {
    if let Some(hint) = err.hint() {
        tracing::error!("{hint}");
    }
    crate::observe::announce::stopped(
        err.bad_event_kind().map(|k| k.name()),
        confirmed,
        &err.to_string(),
    );
    err
}

/// Why the session ended and when the next starts; `quiet` for a standby
/// that was one already.
fn say_retry(err: &PipelineError, delay: Duration, quiet: bool, confirmed: Lsn) {
    match err.hint() {
        Some(hint) if quiet => tracing::debug!(error = %err, retry_in = ?delay, "{hint}"),
        Some(hint) => tracing::warn!(error = %err, retry_in = ?delay, "{hint}"),
        None => tracing::warn!(
            error = %err,
            retry_in = ?delay,
            %confirmed,
            "replication session ended; reconnecting and resuming from the slot"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(3));
        let seq: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        for (got, step) in seq.iter().zip([500, 1000, 2000, 3000, 3000]) {
            assert!(*got <= step && *got >= step * 4 / 5, "{seq:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }

    /// L12 of the December 2026 review: two relays do not retry in step.
    #[test]
    fn backoff_is_jittered() {
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(3)).next_delay())
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
