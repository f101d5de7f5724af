//! The session's counting part: per-event-type and per-table counters looked
//! up once and kept, event types shared among the events in flight, the
//! topics handed to the probe, and the stream buffer's spilled bytes. The
//! loop asks it for a counter or a shared name; nothing here decides what
//! happens to an event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use crate::observe::metrics::Metrics;
use crate::pipeline::sink::MAX_PROBED_TOPICS;

/// How many distinct event types are kept for sharing and counter lookup:
/// the metrics' own limit, past which (a column that is not really a type)
/// each event gets its own copy and its counter is looked up in the metrics.
const MAX_EVENT_TYPES: usize = crate::observe::metrics::MAX_EVENT_TYPE_LABELS;

pub(super) struct Tally {
    metrics: Arc<Metrics>,
    /// Event types seen, owned: an in-flight event holds a shared handle to
    /// its type instead of a copy of its own (which would cost an allocation
    /// per event; a slice of the WAL buffer would pin the buffer).
    event_types: HashSet<Bytes>,
    published: HashMap<Option<Bytes>, Counter>,
    /// The counter of the last event type acknowledged: consecutive events
    /// mostly share a type, and comparing a few bytes beats hashing them.
    last_published: Option<(Option<Bytes>, Counter)>,
    /// Skipped-row counters by table (a handful of tables at most: those
    /// the publication covers).
    skipped: HashMap<Arc<str>, Counter>,
    /// Topics already handed to the probe, and the last one of them.
    noted_topics: HashSet<Arc<str>>,
    last_noted_topic: Option<Arc<str>>,
    /// Of this session's spilled bytes, those already added to the counter.
    spilled_counted: u64,
}

impl Tally {
    pub(super) fn new(metrics: Arc<Metrics>) -> Tally {
        Tally {
            metrics,
            event_types: HashSet::new(),
            published: HashMap::new(),
            last_published: None,
            skipped: HashMap::new(),
            noted_topics: HashSet::new(),
            last_noted_topic: None,
            spilled_counted: 0,
        }
    }

    /// The shared owned copy of an event type, made on first sight.
    pub(super) fn event_type(&mut self, t: &[u8]) -> Bytes {
        if let Some(known) = self.event_types.get(t) {
            return known.clone();
        }
        let owned = Bytes::copy_from_slice(t);
        if self.event_types.len() < MAX_EVENT_TYPES {
            self.event_types.insert(owned.clone());
        }
        owned
    }

    /// The published-events counter of an event type: the last one used
    /// (events of one type come in runs), else from the map.
    pub(super) fn published(&mut self, event_type: &Option<Bytes>) -> Counter {
        if let Some((t, c)) = &self.last_published {
            if t == event_type {
                return c.clone();
            }
        }
        let c = match self.published.get(event_type) {
            Some(c) => c.clone(),
            None => {
                let c = self.metrics.published(&label(event_type));
                // Bounded as the interned types are.
                if self.published.len() < MAX_EVENT_TYPES {
                    self.published.insert(event_type.clone(), c.clone());
                }
                c
            }
        };
        self.last_published = Some((event_type.clone(), c.clone()));
        c
    }

    /// A row of a table that is not an outbox table (a FOR ALL TABLES or
    /// shared publication): counted so that it is visible.
    pub(super) fn skipped_row(&mut self, table: Arc<str>) {
        let metrics = &self.metrics;
        self.skipped
            .entry(table)
            .or_insert_with_key(|t| metrics.skipped_rows_of(t))
            .inc();
    }

    /// True the first time a record went to `topic` (then the probe may ask
    /// about it). The router shares one name among a run of records: mostly
    /// a pointer check.
    pub(super) fn first_record_to(&mut self, topic: &Arc<str>) -> bool {
        if self
            .last_noted_topic
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, topic))
        {
            return false;
        }
        self.last_noted_topic = Some(topic.clone());
        if self.noted_topics.contains(topic) {
            return false;
        }
        if self.noted_topics.len() < MAX_PROBED_TOPICS {
            self.noted_topics.insert(topic.clone());
        }
        true
    }

    /// The stream buffer's spilled bytes so far this session.
    pub(super) fn spilled(&mut self, total: u64) {
        self.metrics
            .stream_spilled_bytes
            .inc_by(total.saturating_sub(self.spilled_counted));
        self.spilled_counted = total;
    }
}

/// The metrics label of an event type (`unknown` without a column).
pub(super) fn label(event_type: &Option<Bytes>) -> String {
    match event_type {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_handed_to_the_probe_once() {
        let mut t = Tally::new(Arc::new(Metrics::new()));
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        assert!(t.first_record_to(&a));
        assert!(!t.first_record_to(&a));
        assert!(t.first_record_to(&b));
        assert!(
            !t.first_record_to(&Arc::from("a")),
            "same name, another handle"
        );
    }

    #[test]
    fn event_types_are_shared() {
        let mut t = Tally::new(Arc::new(Metrics::new()));
        let one = t.event_type(b"OrderCreated");
        let two = t.event_type(b"OrderCreated");
        assert_eq!(one.as_ptr(), two.as_ptr());
    }
}
