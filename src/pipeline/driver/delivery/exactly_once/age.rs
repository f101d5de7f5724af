//! How long the open Kafka transaction has been open, against the two
//! limits that apply to it: `--transaction-max-duration` (commit at the
//! next boundary) and the producer's transaction.timeout.ms (the
//! coordinator aborts it: warned about once, at half).

use std::time::{Duration, Instant};

pub(super) struct Age {
    max_duration: Duration,
    timeout: Duration,
    opened_at: Instant,
    warned: bool,
}

impl Age {
    pub(super) fn new(max_duration: Duration, timeout: Duration) -> Age {
        Age {
            max_duration,
            timeout,
            opened_at: Instant::now(),
            warned: false,
        }
    }

    /// A Kafka transaction began now.
    pub(super) fn opened(&mut self) {
        self.opened_at = Instant::now();
    }

    /// No Kafka transaction is open: the next may be warned about again.
    pub(super) fn closed(&mut self) {
        self.warned = false;
    }

    /// Open for `--transaction-max-duration` or longer.
    pub(super) fn over_max(&self) -> bool {
        self.opened_at.elapsed() >= self.max_duration
    }

    /// Open for half the coordinator's timeout: how long, and the timeout;
    /// once per transaction.
    pub(super) fn half_timeout_passed(&mut self) -> Option<(Duration, Duration)> {
        let open_for = self.opened_at.elapsed();
        if open_for < self.timeout / 2 || self.warned {
            return None;
        }
        self.warned = true;
        Some((open_for, self.timeout))
    }
}
