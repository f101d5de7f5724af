//! A long command's progress on stderr (`backfill`, `recover`): a line
//! redrawn in place on a terminal, a plain line every so many rows otherwise
//! (logs, CI). Only output: it never decides anything.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress: a line redrawn in place on a terminal, plain lines otherwise.
pub struct ProgressLine {
    what: &'static str,
    terminal: bool,
    every: u64,
    next_line: u64,
    last_draw: Option<Instant>,
    started: Instant,
    /// None when not known in advance.
    total: Option<u64>,
}

impl ProgressLine {
    /// `what` starts each line (the command's name).
    pub fn new(what: &'static str, total: Option<u64>, every: u64) -> ProgressLine {
        ProgressLine {
            what,
            terminal: std::io::stderr().is_terminal(),
            every: every.max(1),
            next_line: every.max(1),
            last_draw: None,
            started: Instant::now(),
            total,
        }
    }

    fn text(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        match self.total {
            Some(total) => {
                let pct = if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                };
                format!(
                    "{}: {done} of {total} rows published ({pct:.1}%), {rate:.0} rows/s",
                    self.what
                )
            }
            None => format!("{}: {done} rows published, {rate:.0} rows/s", self.what),
        }
    }

    pub fn update(&mut self, done: u64) {
        if self.terminal {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || Some(done) == self.total {
                self.last_draw = Some(Instant::now());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{}\x1b[K", self.text(done));
                let _ = err.flush();
            }
        } else if done >= self.next_line {
            eprintln!("{}", self.text(done));
            while self.next_line <= done {
                self.next_line += self.every;
            }
        }
    }

    pub fn finish(&mut self, done: u64) {
        if self.terminal {
            self.last_draw = None;
            self.update(done);
            eprintln!();
        } else if !done.is_multiple_of(self.every) || done == 0 {
            eprintln!("{}", self.text(done));
        }
    }
}
