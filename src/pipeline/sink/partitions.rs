//! Which partition a keyed record goes to, and when a topic's new partition
//! count may take effect (review M10).
//!
//! Keys map to partitions as Kafka's default partitioner maps them (murmur2,
//! as the Java client; librdkafka's own function computes it), but over a
//! count the relay holds per topic rather than the count librdkafka saw last.
//! When a topic gains partitions, most keys map elsewhere. Moving a key while
//! an earlier record of it is still on its way to the old partition would let
//! the later record be written first (the new partition's leader may answer
//! sooner, the old one may be down): a consumer would see an aggregate's
//! events out of order. So the count held for a topic changes only when none
//! of its records is in flight: everything sent before is then written, and
//! everything sent after goes by the new count.
//!
//! Under a steady stream a topic may stay busy for a while; its keys stay on
//! their partitions meanwhile, which is safe, and move at the first record
//! sent while nothing else of the topic is in flight (at the latest after
//! the backlog is drained, or at the next session's first record).

use std::collections::HashMap;
use std::sync::Mutex;

use rdkafka::producer::Partitioner;

/// A topic's count changed for the keys: from now on they map by `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remapped {
    pub topic: String,
    pub from: i32,
    pub to: i32,
}

#[derive(Default)]
struct Topic {
    /// The count keys map by; 0 until the first record is partitioned.
    count: i32,
    /// Records handed to the producer whose delivery report has not come.
    in_flight: u64,
}

#[derive(Default)]
struct Inner {
    topics: HashMap<String, Topic>,
    remapped: Vec<Remapped>,
}

/// The producer's partitioner and the per-topic count it maps keys by.
/// Shared by the caller's thread (sending), librdkafka's threads
/// (partitioning, when a topic's metadata arrives after the send) and the
/// delivery report thread: one short lock, no I/O.
#[derive(Default)]
pub struct KeyPartitions {
    inner: Mutex<Inner>,
}

impl KeyPartitions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record of `topic` is about to be handed to the producer (before the
    /// send: the partitioner may run inside it).
    pub fn sending(&self, topic: &str) {
        let mut inner = self.lock();
        match inner.topics.get_mut(topic) {
            Some(t) => t.in_flight += 1,
            None => {
                inner.topics.insert(
                    topic.to_string(),
                    Topic {
                        count: 0,
                        in_flight: 1,
                    },
                );
            }
        }
    }

    /// A record counted by [`Self::sending`] is done with: delivered, failed,
    /// purged, or refused by the producer at the send. Records sent without
    /// counting (progress records, to an explicit partition) change nothing.
    pub fn settled(&self, topic: &str) {
        if let Some(t) = self.lock().topics.get_mut(topic) {
            t.in_flight = t.in_flight.saturating_sub(1);
        }
    }

    /// The counts that changed since the last call, oldest first.
    pub fn take_remapped(&self) -> Vec<Remapped> {
        std::mem::take(&mut self.lock().remapped)
    }

    /// The partition for `key` of `topic`, which librdkafka's metadata says
    /// has `seen` partitions. The record being partitioned is itself counted
    /// in flight.
    fn choose(&self, topic: &str, key: &[u8], seen: i32) -> i32 {
        if seen <= 0 {
            return rdkafka::producer::PARTITION_UA;
        }
        let mut inner = self.lock();
        let count = {
            let t = match inner.topics.get_mut(topic) {
                Some(t) => t,
                None => inner.topics.entry(topic.to_string()).or_default(),
            };
            let from = t.count;
            // Fewer partitions than held: the topic was deleted and created
            // again; no key can stay where it was.
            let safe = t.in_flight <= 1 || seen < from;
            if from == 0 || (seen != from && safe) {
                t.count = seen;
            }
            (from, t.count)
        };
        let (from, now) = count;
        if from != 0 && from != now {
            inner.remapped.push(Remapped {
                topic: topic.to_string(),
                from,
                to: now,
            });
        }
        murmur2(key, now)
    }
}

impl Partitioner for KeyPartitions {
    fn partition(
        &self,
        topic_name: &str,
        key: Option<&[u8]>,
        partition_cnt: i32,
        _is_partition_available: impl Fn(i32) -> bool,
    ) -> i32 {
        // librdkafka partitions a record without a key itself (sticky); the
        // relay always sets one, empty at worst.
        self.choose(topic_name, key.unwrap_or(&[]), partition_cnt)
    }
}

/// Kafka's default mapping of a key over `count` partitions, computed by
/// librdkafka's own function (the one its `murmur2_random` partitioner
/// applies to keyed records).
fn murmur2(key: &[u8], count: i32) -> i32 {
    // SAFETY: the function reads `keylen` bytes from `key` and nothing else;
    // it does not touch the topic handle or the opaques (librdkafka's
    // rdkafka_msg.c). `count` is positive.
    unsafe {
        rdkafka::bindings::rd_kafka_msg_partitioner_murmur2(
            std::ptr::null(),
            key.as_ptr().cast(),
            key.len(),
            count,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key lands within the count (the integration test in
    /// tests/faults.rs checks the partitions against the Java client's
    /// formula).
    #[test]
    fn keys_map_within_the_count() {
        let kp = KeyPartitions::default();
        let at = |key: &str, n| {
            kp.sending("t");
            let p = kp.choose("t", key.as_bytes(), n);
            kp.settled("t");
            p
        };
        for key in ["", "a", "agg-1", "order-42", "k0"] {
            assert_eq!(at(key, 1), 0);
        }
        let first: Vec<i32> = ["a", "b", "c", "d"].iter().map(|k| at(k, 3)).collect();
        assert!(first.iter().all(|p| (0..3).contains(p)), "{first:?}");
    }

    #[test]
    fn the_count_changes_only_with_nothing_in_flight() {
        let kp = KeyPartitions::default();
        let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
        // Two records in flight on 1 partition.
        kp.sending("t");
        assert_eq!(kp.choose("t", b"k1", 1), 0);
        kp.sending("t");
        // The topic now has 6: with one earlier record in flight, every key
        // stays on partition 0.
        for k in &keys {
            assert_eq!(kp.choose("t", k.as_bytes(), 6), 0, "{k}");
        }
        assert!(kp.take_remapped().is_empty());
        kp.settled("t");
        kp.settled("t");
        // Nothing in flight: the next record maps by 6.
        kp.sending("t");
        let moved: Vec<i32> = keys
            .iter()
            .map(|k| kp.choose("t", k.as_bytes(), 6))
            .collect();
        assert!(moved.iter().any(|p| *p != 0), "{moved:?}");
        assert_eq!(
            kp.take_remapped(),
            vec![Remapped {
                topic: "t".into(),
                from: 1,
                to: 6
            }]
        );
        // And stays there while records are in flight again.
        kp.sending("t");
        assert_eq!(kp.choose("t", b"k7", 6), moved[7]);
    }

    #[test]
    fn topics_are_counted_apart() {
        let kp = KeyPartitions::default();
        kp.sending("busy");
        kp.choose("busy", b"x", 1);
        kp.sending("busy");
        kp.sending("idle");
        kp.choose("idle", b"x", 1);
        kp.settled("idle");
        kp.sending("idle");
        kp.choose("idle", b"x", 4);
        assert_eq!(kp.take_remapped().len(), 1, "only the idle topic moved");
        assert_eq!(kp.choose("busy", b"x", 4), 0);
    }

    #[test]
    fn a_topic_made_again_with_fewer_partitions_maps_by_them() {
        let kp = KeyPartitions::default();
        kp.sending("t");
        kp.sending("t");
        kp.choose("t", b"x", 8);
        let p = kp.choose("t", b"x", 2);
        assert!((0..2).contains(&p));
    }

    #[test]
    fn reports_of_records_not_counted_change_nothing() {
        let kp = KeyPartitions::default();
        kp.settled("progress");
        kp.sending("t");
        kp.choose("t", b"x", 1);
        kp.settled("t");
        kp.settled("t");
        kp.sending("t");
        kp.sending("t");
        kp.choose("t", b"x", 3);
        assert!(kp.take_remapped().is_empty(), "two in flight: no move");
    }
}
