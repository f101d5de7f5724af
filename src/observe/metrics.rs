//! Prometheus metrics and the readiness state, shared by the pipeline (which
//! records) and the HTTP endpoint (which reads). Uses the official
//! `prometheus-client` crate for the exposition format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventTypeLabels {
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub event_type: String,
    pub error_type: String,
}

pub struct Metrics {
    registry: Registry,
    pub events_published: Family<EventTypeLabels, Counter>,
    pub publish_errors: Family<ErrorLabels, Counter>,
    /// Enqueue to broker acknowledgement.
    pub publish_duration: Histogram,
    /// Commit timestamp in the WAL to broker acknowledgement.
    pub commit_to_ack: Histogram,
    pub replication_lag_bytes: Gauge,
    pub confirmed_lsn: Gauge,
    pub inflight_events: Gauge,
    pub dead_lettered: Counter,
    /// Rows of published tables other than the outbox, by table.
    pub skipped_rows: Family<TableLabels, Counter>,
    /// Partition counts of the topics records went to, as the probe saw them.
    pub topic_partitions: Family<TopicLabels, Gauge>,
    pub partition_count_changes: Family<TopicLabels, Counter>,
    pub up: Gauge,
    /// 1 while another connection holds the slot and this relay waits for it.
    pub standby: Gauge,
    pub reconnects: Counter,
    /// Exactly-once: Kafka transactions committed and aborted, commit time,
    /// and Postgres transactions the progress topic showed already published.
    pub kafka_transactions_committed: Counter,
    pub kafka_transactions_aborted: Counter,
    pub kafka_commit_duration: Histogram,
    pub transactions_skipped: Counter,
    /// Forks between the progress record's WAL history and the server's.
    pub history_forks: Counter,
    /// Lost slots recovered by `run --recover-slot`, and the events that
    /// republished from the outbox table.
    pub slot_recoveries: Counter,
    pub events_recovered: Counter,
    /// The slot's `safe_wal_size` (-1: no `max_slot_wal_keep_size`), and
    /// the seconds until the server invalidates it at the current WAL rate
    /// (-1: no limit applies, or not known yet).
    pub slot_safe_wal_bytes: Gauge,
    pub slot_invalidation_seconds: Gauge,
    /// Heartbeats that failed or timed out.
    pub heartbeat_failures: Counter,
    /// Tables the schema patterns stand for that the publication lacks.
    pub unpublished_tables: Gauge,
    /// Streamed, uncommitted changes held in memory / spilled to disk.
    pub stream_buffer_bytes: Gauge,
    /// A counter over the process's life (each session has its own buffer).
    pub stream_spilled_bytes: Counter,
    streaming: AtomicBool,
    broker_reachable: AtomicBool,
    /// A stop was asked for: the relay is draining, not to be sent traffic.
    stopping: AtomicBool,
    /// When the pipeline's loop last went round (milliseconds since
    /// `started`), for /healthz; 0 while no session streams.
    loop_turn_ms: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// The event types admitted as label values, with their published
    /// counter once there is one (so the hot path does not build label sets).
    published_by_type: Mutex<HashMap<String, Option<Counter>>>,
    /// Whether the event-type label limit was reached (and said).
    event_types_capped: AtomicBool,
}

/// Distinct `event_type` label values the metrics keep.
pub const MAX_EVENT_TYPE_LABELS: usize = 1000;
/// The `event_type` label of every type past [`MAX_EVENT_TYPE_LABELS`].
pub const OTHER_EVENT_TYPES: &str = "_other";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events_published = Family::<EventTypeLabels, Counter>::default();
        let publish_errors = Family::<ErrorLabels, Counter>::default();
        // 100 µs .. 52 s in steps of √2: a latency SLO of a few
        // milliseconds needs finer buckets than powers of two give
        // histogram_quantile() to interpolate between.
        let latency_buckets = || exponential_buckets(0.0001, std::f64::consts::SQRT_2, 39);
        let publish_duration = Histogram::new(latency_buckets());
        let commit_to_ack = Histogram::new(latency_buckets());
        let replication_lag_bytes = Gauge::default();
        let confirmed_lsn = Gauge::default();
        let inflight_events = Gauge::default();
        let dead_lettered = Counter::default();
        let skipped_rows = Family::<TableLabels, Counter>::default();
        let topic_partitions = Family::<TopicLabels, Gauge>::default();
        let partition_count_changes = Family::<TopicLabels, Counter>::default();
        let up = Gauge::default();
        let standby = Gauge::default();
        let reconnects = Counter::default();
        let stream_buffer_bytes = Gauge::default();
        let stream_spilled_bytes = Counter::default();
        registry.register(
            "outbox_stream_buffer_bytes",
            "Bytes of streamed, not yet committed changes held in memory (--streaming)",
            stream_buffer_bytes.clone(),
        );
        registry.register(
            "outbox_stream_spilled_bytes",
            "Bytes of streamed changes spilled to disk since start (--streaming)",
            stream_spilled_bytes.clone(),
        );
        registry.register(
            "outbox_events_published",
            "Events acknowledged by Kafka",
            events_published.clone(),
        );
        registry.register(
            "outbox_publish_errors",
            "Events Kafka did not accept, by error",
            publish_errors.clone(),
        );
        registry.register(
            "outbox_publish_duration_seconds",
            "Time from handing an event to the producer to its acknowledgement",
            publish_duration.clone(),
        );
        registry.register(
            "outbox_commit_to_ack_seconds",
            "Time from the transaction's commit (WAL timestamp) to the event's acknowledgement",
            commit_to_ack.clone(),
        );
        registry.register(
            "outbox_replication_lag_bytes",
            "Server WAL position (as last reported by the walsender) minus the confirmed position",
            replication_lag_bytes.clone(),
        );
        registry.register(
            "outbox_confirmed_lsn",
            "Position confirmed to the server (the slot's confirmed_flush_lsn), as a number",
            confirmed_lsn.clone(),
        );
        registry.register(
            "outbox_inflight_events",
            "Events handed to the producer and not yet acknowledged",
            inflight_events.clone(),
        );
        registry.register(
            "outbox_dead_lettered",
            "Events sent to the dead-letter topic",
            dead_lettered.clone(),
        );
        registry.register(
            "outbox_skipped_rows",
            "Inserted rows of tables the publication covers besides the outbox table: not events, never published",
            skipped_rows.clone(),
        );
        registry.register(
            "outbox_topic_partitions",
            "Partitions of each topic records went to, as last seen (checked in turn, one topic every 5 s)",
            topic_partitions.clone(),
        );
        registry.register(
            "outbox_partition_count_changes",
            "Times a topic's partition count was seen to change: keys moved to other partitions",
            partition_count_changes.clone(),
        );
        registry.register(
            "outbox_up",
            "1 while the relay is streaming from the slot",
            up.clone(),
        );
        registry.register(
            "outbox_standby",
            "1 while another connection holds the slot and this relay waits to take it over",
            standby.clone(),
        );
        registry.register(
            "outbox_reconnects",
            "Replication sessions started again after an error",
            reconnects.clone(),
        );
        let kafka_transactions_committed = Counter::default();
        let kafka_transactions_aborted = Counter::default();
        let kafka_commit_duration = Histogram::new(latency_buckets());
        let transactions_skipped = Counter::default();
        let history_forks = Counter::default();
        let slot_recoveries = Counter::default();
        let events_recovered = Counter::default();
        let slot_safe_wal_bytes = Gauge::default();
        slot_safe_wal_bytes.set(-1);
        let slot_invalidation_seconds = Gauge::default();
        slot_invalidation_seconds.set(-1);
        let heartbeat_failures = Counter::default();
        let unpublished_tables = Gauge::default();
        registry.register(
            "outbox_unpublished_tables",
            "Tables a schema pattern stands for that the publication does not cover (setup's event trigger did not fire for them): their rows are never decoded. Checked every 30 s while the relay streams",
            unpublished_tables.clone(),
        );
        registry.register(
            "outbox_slot_safe_wal_bytes",
            "Bytes of WAL the server may still write before max_slot_wal_keep_size invalidates the slot (its safe_wal_size); -1 without a limit. Read over SQL every 5 s while the relay streams",
            slot_safe_wal_bytes.clone(),
        );
        registry.register(
            "outbox_slot_invalidation_seconds",
            "Seconds until the server invalidates the slot at the current WAL rate (max_slot_wal_keep_size); -1 when no limit applies or the rate is not known yet. An invalidated slot loses the events written meanwhile to the stream",
            slot_invalidation_seconds.clone(),
        );
        registry.register(
            "outbox_heartbeat_failures",
            "Heartbeat messages (--heartbeat-interval) that failed or did not complete within 10 s; the heartbeat reconnects",
            heartbeat_failures.clone(),
        );
        registry.register(
            "outbox_kafka_transactions_committed",
            "Kafka transactions committed (--delivery exactly-once)",
            kafka_transactions_committed.clone(),
        );
        registry.register(
            "outbox_kafka_transactions_aborted",
            "Kafka transactions aborted or abandoned after an error (--delivery exactly-once); their events are published again in a later transaction",
            kafka_transactions_aborted.clone(),
        );
        registry.register(
            "outbox_kafka_commit_duration_seconds",
            "Time commit_transaction took, including the flush of the transaction's records (--delivery exactly-once)",
            kafka_commit_duration.clone(),
        );
        registry.register(
            "outbox_transactions_skipped",
            "Postgres transactions the slot sent again that the progress topic shows already committed to Kafka (--delivery exactly-once): not published again",
            transactions_skipped.clone(),
        );
        registry.register(
            "outbox_history_forks",
            "Times a session found that the progress record was written on a WAL history the server does not continue (a restore, an asynchronous standby promoted, a slot recreated): transactions past the fork are published, never taken for ones already in Kafka",
            history_forks.clone(),
        );
        registry.register(
            "outbox_slot_recoveries",
            "Times run --recover-slot found the slot missing, invalidated or left by an unfinished recover, created it again and published the gap from the outbox table",
            slot_recoveries.clone(),
        );
        registry.register(
            "outbox_events_recovered",
            "Events run --recover-slot published from the outbox table because Kafka lacked them",
            events_recovered.clone(),
        );
        Metrics {
            registry,
            kafka_transactions_committed,
            kafka_transactions_aborted,
            kafka_commit_duration,
            transactions_skipped,
            history_forks,
            slot_recoveries,
            events_recovered,
            slot_safe_wal_bytes,
            slot_invalidation_seconds,
            heartbeat_failures,
            unpublished_tables,
            events_published,
            publish_errors,
            publish_duration,
            commit_to_ack,
            replication_lag_bytes,
            confirmed_lsn,
            inflight_events,
            dead_lettered,
            skipped_rows,
            topic_partitions,
            partition_count_changes,
            up,
            standby,
            reconnects,
            stream_buffer_bytes,
            stream_spilled_bytes,
            streaming: AtomicBool::new(false),
            broker_reachable: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            loop_turn_ms: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            published_by_type: Mutex::new(HashMap::new()),
            event_types_capped: AtomicBool::new(false),
        }
    }

    /// The counter of one event type, created on first use. Past
    /// [`MAX_EVENT_TYPE_LABELS`] types, new ones count under
    /// [`OTHER_EVENT_TYPES`]: an event-type column that is not really a type
    /// (an id, say) must not grow the exposition without bound.
    pub fn published(&self, event_type: &str) -> Counter {
        let mut map = self
            .published_by_type
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let label = self.event_type_label(&mut map, event_type);
        if let Some(Some(c)) = map.get(label) {
            return c.clone();
        }
        let c = self
            .events_published
            .get_or_create(&EventTypeLabels {
                event_type: label.to_string(),
            })
            .clone();
        map.insert(label.to_string(), Some(c.clone()));
        c
    }

    pub fn publish_error(&self, event_type: &str, error_type: &str) {
        let label = {
            let mut map = self
                .published_by_type
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.event_type_label(&mut map, event_type)
        };
        self.publish_errors
            .get_or_create(&ErrorLabels {
                event_type: label.to_string(),
                error_type: error_type.to_string(),
            })
            .inc();
    }

    /// `event_type` itself while there is room for it, else
    /// [`OTHER_EVENT_TYPES`] (said once in the log). Both metric families
    /// draw their label values from `known`, so errors of types that never
    /// published count against the same limit.
    fn event_type_label<'a>(
        &self,
        known: &mut HashMap<String, Option<Counter>>,
        event_type: &'a str,
    ) -> &'a str {
        if known.contains_key(event_type) {
            return event_type;
        }
        if known.len() < MAX_EVENT_TYPE_LABELS {
            known.insert(event_type.to_string(), None);
            return event_type;
        }
        if !self.event_types_capped.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = MAX_EVENT_TYPE_LABELS,
                "more than {MAX_EVENT_TYPE_LABELS} distinct event types: further ones are counted under event_type=\"{OTHER_EVENT_TYPES}\" in the metrics; check that --event-type-column names a type, not an id"
            );
        }
        OTHER_EVENT_TYPES
    }

    pub fn topic_partitions(&self, topic: &str) -> Gauge {
        self.topic_partitions
            .get_or_create(&TopicLabels {
                topic: topic.to_string(),
            })
            .clone()
    }

    pub fn partition_count_changes(&self, topic: &str) -> Counter {
        self.partition_count_changes
            .get_or_create(&TopicLabels {
                topic: topic.to_string(),
            })
            .clone()
    }

    /// The counter of skipped rows of `table` (`schema.name`).
    pub fn skipped_rows_of(&self, table: &str) -> Counter {
        self.skipped_rows
            .get_or_create(&TableLabels {
                table: table.to_string(),
            })
            .clone()
    }

    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Relaxed);
        self.up.set(i64::from(on));
        if on {
            self.standby.set(0);
        }
    }

    /// The pipeline's loop went round: it is not stuck.
    pub fn loop_turned(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.loop_turn_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// How long since the streaming loop last went round; None while no
    /// session streams (connecting, backing off, a standby).
    pub fn loop_stalled_for(&self) -> Option<std::time::Duration> {
        if !self.streaming() {
            return None;
        }
        let last = self.loop_turn_ms.load(Ordering::Relaxed);
        (last > 0).then(|| {
            std::time::Duration::from_millis(
                (self.started.elapsed().as_millis() as u64).saturating_sub(last),
            )
        })
    }

    /// From the first stop signal on, readiness is off (the relay drains).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn set_broker_reachable(&self, ok: bool) {
        self.broker_reachable.store(ok, Ordering::Relaxed);
    }

    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    pub fn broker_reachable(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L5 of the December 2026 review: liveness follows the streaming loop.
    #[test]
    fn a_stuck_loop_shows_only_while_streaming() {
        let m = Metrics::new();
        assert_eq!(
            m.loop_stalled_for(),
            None,
            "not streaming: nothing to judge"
        );
        m.set_streaming(true);
        m.loop_turned();
        assert!(m.loop_stalled_for().unwrap() < std::time::Duration::from_secs(1));
        // As if the last turn was long ago.
        m.loop_turn_ms.store(1, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(m.loop_stalled_for().unwrap() >= std::time::Duration::from_millis(19));
        m.set_streaming(false);
        assert_eq!(m.loop_stalled_for(), None);
    }

    #[test]
    fn exposes_the_documented_names() {
        let m = Metrics::new();
        m.published("OrderCreated").inc();
        m.publish_error("OrderCreated", "MessageSizeTooLarge");
        m.commit_to_ack.observe(0.003);
        m.set_streaming(true);
        let text = m.encode();
        for name in [
            "outbox_events_published_total{event_type=\"OrderCreated\"} 1",
            "outbox_publish_errors_total{event_type=\"OrderCreated\",error_type=\"MessageSizeTooLarge\"} 1",
            "outbox_publish_duration_seconds_bucket",
            "outbox_commit_to_ack_seconds_count 1",
            "outbox_replication_lag_bytes 0",
            "outbox_confirmed_lsn 0",
            "outbox_inflight_events 0",
            "outbox_dead_lettered_total 0",
            "outbox_up 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn event_type_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_EVENT_TYPE_LABELS + 50 {
            m.published(&format!("type-{i}")).inc();
        }
        m.publish_error("type-9999", "MessageSizeTooLarge");
        m.published("type-0").inc();
        // Errors alone, of types never published, stay within the limit too.
        let e = Metrics::new();
        for i in 0..MAX_EVENT_TYPE_LABELS + 50 {
            e.publish_error(&format!("type-{i}"), "MessageSizeTooLarge");
        }
        let error_series = e
            .encode()
            .lines()
            .filter(|l| l.starts_with("outbox_publish_errors_total{"))
            .count();
        assert_eq!(error_series, MAX_EVENT_TYPE_LABELS + 1);
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("outbox_events_published_total{"))
            .count();
        assert_eq!(series, MAX_EVENT_TYPE_LABELS + 1, "the limit plus _other");
        assert!(text.contains("outbox_events_published_total{event_type=\"_other\"} 50"));
        assert!(text.contains("outbox_events_published_total{event_type=\"type-0\"} 2"));
        assert!(text.contains(
            "outbox_publish_errors_total{event_type=\"_other\",error_type=\"MessageSizeTooLarge\"} 1"
        ));
    }
}
