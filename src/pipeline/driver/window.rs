//! The session's in-flight part: each event handed to the producer until
//! its delivery report, with the bytes they hold (the byte budget), and the
//! records the broker refused as too large until the reports that came with
//! them are in. It keeps the books; the state decides what a report means.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::route::router::OutboxRecord;
use crate::pipeline::sink::inflight::InFlight;

/// An event handed to the producer, until its delivery report arrives.
pub(super) struct Pending {
    pub(super) txn: TxnSeq,
    pub(super) enqueued: Instant,
    pub(super) commit_time: i64,
    pub(super) event_type: Option<bytes::Bytes>,
    /// Position of the change, for dead-letter headers.
    pub(super) lsn: Lsn,
    /// Its place among the records enqueued at that position (`refused`).
    pub(super) nth: u32,
    /// Kept only while a delivery failure could be dead-lettered.
    pub(super) record: Option<OutboxRecord>,
    pub(super) dead_letter: bool,
    /// Key and payload bytes, for the in-flight byte budget.
    pub(super) size: u64,
}

/// Events in flight by delivery tag, and their key and payload bytes.
#[derive(Default)]
pub(super) struct Window {
    events: InFlight<Pending>,
    bytes: u64,
}

impl Window {
    /// Tracks an event about to be handed to the producer; its tag.
    pub(super) fn push(&mut self, p: Pending) -> u64 {
        self.bytes += p.size;
        self.events.push(p)
    }

    /// Forgets the newest event: the producer did not take it.
    pub(super) fn undo_push(&mut self) -> Option<Pending> {
        let p = self.events.undo_push()?;
        self.bytes -= p.size;
        Some(p)
    }

    /// The event a delivery report is about, no longer in flight.
    pub(super) fn take(&mut self, tag: u64) -> Option<Pending> {
        let p = self.events.take(tag)?;
        self.bytes -= p.size;
        Some(p)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Tags from the oldest event in flight to the newest.
    pub(super) fn span(&self) -> usize {
        self.events.span()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

pub(super) fn record_size(r: &OutboxRecord) -> u64 {
    (r.key.len() + r.payload.as_ref().map_or(0, |p| p.len())) as u64
}

/// A record the broker refused as too large, with its topic and the error.
pub(super) type Refusal = (Pending, String, KafkaError);

/// The broker judges max.message.bytes per record batch: a refused batch
/// fails every record in it, small ones too. Reports of too-large records
/// are held until those that came together are in: one alone was too large
/// by itself, several were a batch.
pub(super) struct TooLarge {
    held: Vec<Refusal>,
    since: Instant,
}

/// What the held reports say.
pub(super) enum TooLargeVerdict {
    /// Nothing held, or one report still waiting for the rest of its batch.
    Wait,
    /// One record, too large by itself.
    Alone(Refusal),
    /// Several records refused together (the first, and how many).
    Batch(Refusal, usize),
}

impl TooLarge {
    pub(super) fn new() -> TooLarge {
        TooLarge {
            held: Vec::new(),
            since: Instant::now(),
        }
    }

    pub(super) fn hold(&mut self, refusal: Refusal) {
        if self.held.is_empty() {
            self.since = Instant::now();
        }
        self.held.push(refusal);
    }

    /// Every report held, for a failed transaction's cause.
    pub(super) fn take_all(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.held)
    }

    /// A lone report waits `settle` for the rest of its batch's (librdkafka
    /// reports a failed batch's records at once).
    pub(super) fn verdict(&mut self, settle: Duration) -> TooLargeVerdict {
        match self.held.len() {
            0 => TooLargeVerdict::Wait,
            1 if self.since.elapsed() < settle => TooLargeVerdict::Wait,
            1 => match self.held.pop() {
                Some(one) => TooLargeVerdict::Alone(one),
                None => TooLargeVerdict::Wait,
            },
            n => {
                let first = self.held.swap_remove(0);
                self.held.clear();
                TooLargeVerdict::Batch(first, n)
            }
        }
    }
}
