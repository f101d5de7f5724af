//! What runs beside a session while it streams: the broker probe, the
//! slot watch and the heartbeat. They end with the session (dropped).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::observe::metrics::Metrics;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::Prober;

use super::heartbeat::heartbeat;
use super::slot_watch::slot_watch;

pub(super) struct Background {
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    pub(super) fn spawn(cfg: &RelayConfig, prober: Prober, metrics: &Arc<Metrics>) -> Background {
        let mut tasks = vec![
            spawn_probe(prober, metrics.clone()),
            tokio::spawn(slot_watch(cfg.clone(), metrics.clone())),
        ];
        if let Some(every) = cfg.heartbeat_interval {
            tasks.push(tokio::spawn(heartbeat(cfg.clone(), every, metrics.clone())));
        }
        Background { tasks }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Asks the broker for metadata every 5 s, for readiness (the broker answers
/// even when no event flows) and to notice a topic's partition count change.
fn spawn_probe(mut prober: Prober, metrics: Arc<Metrics>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // The metadata request blocks: keep it off the runtime's threads.
            let asked = tokio::task::spawn_blocking(move || {
                let report = prober.probe(Duration::from_secs(3));
                (report, prober)
            })
            .await;
            let Ok((report, back)) = asked else { return };
            prober = back;
            metrics.set_broker_reachable(report.reachable);
            if let Some((topic, count)) = &report.partitions {
                metrics.topic_partitions(topic).set(i64::from(*count));
                // The series exists from the first probe on: an alert's
                // increase() then sees the first move too.
                metrics.partition_count_changes(topic);
                if let Some(before) = report.changed_from {
                    tracing::warn!(
                        topic = %topic,
                        before,
                        now = count,
                        "the topic's partition count changed: each key stays on its partition until none of the topic's records is in flight, then keys map by the new count (an aggregate's events before the move are all written before any after it). Consumers that read partitions at different speeds may still see an aggregate's newer events first: to avoid that, add partitions with the relay stopped and consumers caught up"
                    );
                }
            }
            for moved in &report.remapped {
                metrics.partition_count_changes(&moved.topic).inc();
                tracing::info!(
                    topic = %moved.topic,
                    from = moved.from,
                    to = moved.to,
                    "keys now map by the topic's new partition count: every earlier record of the topic was written"
                );
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}
