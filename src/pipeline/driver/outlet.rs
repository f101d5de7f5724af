//! The session's outgoing part: the Kafka sink and its delivery reports,
//! the events in flight, and the records that wait for room in the
//! producer's queue. It keeps the books; what a report means is decided in
//! `reports`, how a record goes out in `enqueue`.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::route::router::OutboxRecord;
use crate::pipeline::sink::{Ack, KafkaSink};

use super::window::Window;

/// A record counted in the checkpoint that librdkafka's full queue could not
/// take yet.
pub(super) struct Waiting {
    pub(super) rec: OutboxRecord,
    pub(super) txn: TxnSeq,
    pub(super) lsn: Lsn,
    pub(super) nth: u32,
    pub(super) is_dead_letter: bool,
}

pub(super) struct Outlet {
    pub(super) sink: KafkaSink,
    pub(super) acks: mpsc::UnboundedReceiver<Ack>,
    /// Clock readings shared by a batch of delivery reports.
    pub(super) ack_clock: (Instant, i64),
    /// Events in flight by delivery tag, and their bytes. Bounded by
    /// `max_inflight` and `max_inflight_bytes`.
    pub(super) window: Window,
    /// Records the producer's full queue could not take yet, in order;
    /// nothing more is read until they are enqueued.
    pub(super) waiting: VecDeque<Waiting>,
}

impl Outlet {
    pub(super) fn new((sink, acks): (KafkaSink, mpsc::UnboundedReceiver<Ack>)) -> Outlet {
        Outlet {
            sink,
            acks,
            ack_clock: (Instant::now(), crate::pipeline::source::pg_now()),
            window: Window::default(),
            waiting: VecDeque::new(),
        }
    }

    /// Reads the clocks once for the delivery reports about to be handled.
    pub(super) fn refresh_ack_clock(&mut self) {
        self.ack_clock = (Instant::now(), crate::pipeline::source::pg_now());
    }
}
