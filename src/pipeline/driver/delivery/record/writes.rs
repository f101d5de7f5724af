//! The recorder's writes: at-least-once's record on the status timer, and
//! the delivery reports of progress records in either mode.

use std::time::Instant;

use rdkafka::error::KafkaError;

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::progress::ProgressError;
use crate::pipeline::sink::transactions::{TxnError, TxnFailure, PROGRESS_TAG};
use crate::pipeline::sink::{Delivered, Enqueued, KafkaSink};

use super::super::super::errors::PipelineError;
use super::{moved_by_us, Recorder, RESTATE_EVERY};

impl Recorder {
    /// At-least-once, on the status timer: finishes the background read of
    /// the topic when it is done, then records `confirmed` when it moved
    /// past the last record and none is in flight (or it is time to write
    /// the record again).
    pub(crate) async fn tick_at_least_once(
        &mut self,
        cfg: &RelayConfig,
        metrics: &Metrics,
        sink: &KafkaSink,
        confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        if let Some(mut reading) = self.reading.take() {
            if !reading.task.is_finished() {
                self.reading = Some(reading);
                return Ok(());
            }
            let at_start = (&mut reading.task).await.unwrap_or_else(|_| {
                Err(ProgressError::ReadTimeout {
                    topic: self.id.topic.clone(),
                    timeout: std::time::Duration::ZERO,
                })
            })?;
            moved_by_us(
                cfg,
                reading.resume,
                reading.found,
                at_start.as_ref(),
                self.server.timeline,
            )?;
            self.started(at_start)?;
            // At-least-once publishes whatever the stream sends: a fork
            // changes nothing it does, but is said and counted.
            self.judge(
                metrics,
                reading.found,
                None,
                "at-least-once publishes everything the slot sends",
            );
        }
        // Written again now and then even when nothing moved: a stale
        // record of a woken relay may have come after ours, and compaction
        // (hourly segments) would keep only that one.
        let restate = self.restate || self.last_at.elapsed() >= RESTATE_EVERY;
        if self.in_flight.is_some() || (confirmed <= self.recorded && !restate) {
            return Ok(());
        }
        let value = self.value(self.commit_lsn, self.anchor, confirmed);
        if let Enqueued::Yes = sink.enqueue_progress(&self.id.topic, &self.id.key, &value)? {
            self.in_flight = Some(confirmed.max(self.recorded));
            self.restate = false;
            self.last_at = Instant::now();
        }
        Ok(())
    }

    /// Whether `confirmed` is recorded: a clean stop waits for it, so that
    /// the slot ends where the deliveries did.
    pub(crate) fn holds_all(&self, confirmed: Lsn) -> bool {
        self.reading.is_some() || self.recorded >= confirmed
    }

    /// The report of a progress record. With exactly-once the commit says
    /// whether it counts; a failure there fails the commit too, and failing
    /// here names the progress topic.
    pub(crate) fn delivered(
        &mut self,
        result: Result<Delivered, KafkaError>,
        exactly_once: bool,
    ) -> Result<(), PipelineError> {
        match result {
            Ok(_) => {
                if let Some(at) = self.in_flight.take() {
                    self.recorded = self.recorded.max(at);
                    self.last_at = Instant::now();
                }
                Ok(())
            }
            // Exactly-once: the transaction fails with it; a new session
            // starts over from the progress topic.
            Err(error) if exactly_once => Err(PipelineError::Transaction(TxnError {
                kind: TxnFailure::Abortable,
                what: "writing the progress record",
                error,
            })),
            Err(error) => Err(PipelineError::Progress(ProgressError::Write {
                topic: self.id.topic.clone(),
                error,
            })),
        }
    }
}

/// Whether a report is a progress record's.
pub(crate) fn is_progress(tag: u64) -> bool {
    tag == PROGRESS_TAG
}
