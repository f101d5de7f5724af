//! The session's state, in owned parts: the decoding (`decoding`), what
//! goes out and is in flight (`outlet`), what is confirmed (`checkpoint`),
//! the delivery mode and its progress record (`delivery`), how bad events
//! go (`dead_letters`), the place in the stream (`position`) and the
//! counters (`tally`). Each part is a type in its own file; the methods
//! that need several parts are on `State`, by concern: `apply` (a decoded
//! message), `enqueue` (a record to the producer), `reports` (delivery
//! reports), `dead_letters`, `delivering` (the delivery mode's hooks).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::checkpoint::Checkpoint;
use crate::pipeline::decode::stream_buffer::StreamBuffer;
use crate::pipeline::route::messages::MessageConfig;
use crate::pipeline::route::router::Router;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::{Ack, KafkaSink};

use super::dead_letters::DeadLetters;
use super::decoding::Decoding;
use super::delivery::record::Recorder;
use super::delivery::Delivery;
use super::outlet::Outlet;
use super::position::Position;
use super::tally::Tally;
use super::Summary;

pub(super) struct State {
    /// At-least-once, or Kafka transactions with `--delivery exactly-once`.
    pub(super) delivery: Delivery,
    /// Records each position before it is confirmed (unless
    /// `--progress-topic off`).
    pub(super) recorder: Option<Recorder>,
    /// The decoder, the buffer of streamed transactions, and the committed
    /// one being handed over.
    pub(super) decoding: Decoding,
    pub(super) router: Router,
    /// Logical decoding messages as events, when configured.
    pub(super) messages: Option<MessageConfig>,
    pub(super) checkpoint: Checkpoint,
    /// The sink, its reports, the events in flight, records waiting.
    pub(super) out: Outlet,
    pub(super) pos: Position,
    pub(super) dead: DeadLetters,
    /// Counters, shared event types, topics for the probe.
    pub(super) tally: Tally,
    pub(super) metrics: Arc<Metrics>,
    pub(super) summary: Summary,
}

impl State {
    /// A session's state as it starts streaming from `confirmed`.
    pub(super) fn new(
        cfg: &RelayConfig,
        confirmed: Lsn,
        protocol: u32,
        sink: (KafkaSink, mpsc::UnboundedReceiver<Ack>),
        metrics: Arc<Metrics>,
        carry: &mut super::Carry,
    ) -> State {
        State {
            delivery: Delivery::AtLeastOnce,
            recorder: None,
            decoding: Decoding::new(
                protocol,
                cfg.streaming
                    .as_ref()
                    .map(|s| StreamBuffer::new(s.memory_budget, s.spill_dir.join(&cfg.slot))),
            ),
            router: Router::with_column_types(cfg.tables.clone(), carry.column_types.clone()),
            messages: cfg.messages.clone(),
            checkpoint: Checkpoint::new(confirmed),
            out: Outlet::new(sink),
            pos: Position::new(confirmed),
            dead: DeadLetters::new(cfg, std::mem::take(&mut carry.refused)),
            tally: Tally::new(metrics.clone()),
            metrics,
            summary: Summary::default(),
        }
    }

    /// Whether another change may be read (or replayed): the in-flight
    /// window has room in events and bytes, and no record waits for room in
    /// the producer's queue. The window also bounds the bookkeeping behind
    /// the oldest unacknowledged event, which grows while that one event is
    /// stuck even though few are in flight: the delivery slots since it
    /// (`pending`, holes included) and the transactions since the confirmed
    /// position (the checkpoint's, empty ones included: PostgreSQL before
    /// 15 sends Begin and Commit for every transaction).
    pub(super) fn has_room(&self, cfg: &RelayConfig) -> bool {
        let span = 2 * cfg.max_inflight;
        self.checkpoint.inflight() < cfg.max_inflight
            && self.out.window.bytes() < cfg.max_inflight_bytes
            && self.out.waiting.is_empty()
            && (self.out.window.span() as u64) < span
            && self.checkpoint.tracked() < span
    }

    /// Refreshes the gauges that describe the stream's state.
    pub(super) fn update_gauges(&mut self) {
        let confirmed = self.confirmable();
        self.metrics.confirmed_lsn.set(confirmed.0 as i64);
        self.metrics
            .inflight_events
            .set(self.checkpoint.inflight() as i64);
        self.metrics
            .replication_lag_bytes
            .set(self.pos.server_wal.0.saturating_sub(confirmed.0) as i64);
        if let Some(b) = self.decoding.stream() {
            self.metrics
                .stream_buffer_bytes
                .set(b.memory_bytes() as i64);
            self.tally.spilled(b.spilled_bytes_total());
        }
    }
}
