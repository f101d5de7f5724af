//! Publishing rows read from the table itself (`backfill`, `recover`): each
//! routed record goes to the producer with at most `--max-inflight`
//! unacknowledged, and every delivery report is checked. It keeps its
//! records in flight in the pipeline's [`InFlight`] tracker, but unlike the
//! pipeline it has no slot position to hold back: a failed report aborts the
//! command, which is then run again. Owns the producer and its reports;
//! never touches Postgres.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::observe::progress_line::ProgressLine;
use crate::pipeline::route::router::OutboxRecord;
use crate::pipeline::sink::inflight::InFlight;
use crate::pipeline::sink::transactions::PROGRESS_TAG;
use crate::pipeline::sink::{Ack, Enqueued, KafkaSink};

pub struct Publisher<'a> {
    sink: KafkaSink,
    acks: mpsc::UnboundedReceiver<Ack>,
    /// The order value of each record in flight, for errors and
    /// `--mark-processed`.
    in_flight: InFlight<String>,
    /// Order values of acknowledged records, kept for `--mark-processed` only.
    delivered: Option<Vec<String>>,
    order_column: &'a str,
    ack_timeout: Duration,
    max_inflight: u64,
    acked: u64,
    progress: ProgressLine,
    /// The progress record's report, once it came.
    recorded: bool,
}

/// What was published, once every report is in.
pub struct Published {
    pub acked: u64,
    /// Order values of every acknowledged row (empty unless kept).
    pub delivered: Vec<String>,
}

impl<'a> Publisher<'a> {
    /// `keep_delivered`: remember every acknowledged row's order value.
    pub fn new(
        (sink, acks): (KafkaSink, mpsc::UnboundedReceiver<Ack>),
        order_column: &'a str,
        keep_delivered: bool,
        ack_timeout: Duration,
        max_inflight: u64,
        progress: ProgressLine,
    ) -> Self {
        Publisher {
            sink,
            acks,
            in_flight: InFlight::default(),
            delivered: keep_delivered.then(Vec::new),
            order_column,
            ack_timeout,
            max_inflight: max_inflight.max(1),
            acked: 0,
            progress,
            recorded: false,
        }
    }

    /// Hands `rec` to the producer, first waiting for reports while the
    /// in-flight limit or librdkafka's queue is full; then takes the reports
    /// that already arrived, without waiting.
    pub async fn publish(&mut self, rec: &OutboxRecord, order_value: String) -> Result<(), String> {
        while self.in_flight.len() as u64 >= self.max_inflight {
            self.wait_ack().await?;
        }
        loop {
            let tag = self.in_flight.push(order_value.clone());
            let outcome = self.sink.enqueue(rec, tag);
            if matches!(outcome, Ok(Enqueued::Yes)) {
                break;
            }
            self.in_flight.undo_push();
            match outcome {
                // Nothing of ours in the queue to wait for: someone else's
                // records fill it, or it drains on its own.
                Ok(_) if self.in_flight.is_empty() => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(_) => self.wait_ack().await?,
                Err(e) => return Err(e.to_string()),
            }
        }
        while let Ok(ack) = self.acks.try_recv() {
            self.on_ack(ack)?;
        }
        self.progress.update(self.acked);
        Ok(())
    }

    /// The producer, for a transaction's begin and commit around the
    /// records.
    pub fn sink(&self) -> &KafkaSink {
        &self.sink
    }

    /// Waits for every report still due.
    pub async fn settle(&mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            self.wait_ack().await?;
        }
        Ok(())
    }

    /// Writes a progress record (`sink::progress`) and waits for its report.
    pub async fn record(&mut self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        self.recorded = false;
        while !matches!(
            self.sink.enqueue_progress(topic, key, value),
            Ok(Enqueued::Yes)
        ) {
            self.settle().await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while !self.recorded {
            self.wait_ack().await?;
        }
        Ok(())
    }

    /// Waits for every report still due.
    pub async fn finish(mut self) -> Result<Published, String> {
        self.settle().await?;
        self.progress.finish(self.acked);
        Ok(Published {
            acked: self.acked,
            delivered: self.delivered.unwrap_or_default(),
        })
    }

    /// Takes the next delivery report, waiting at most `--ack-timeout`: the
    /// producer never gives up on a record, so an unreachable broker would
    /// otherwise stall the cutover.
    async fn wait_ack(&mut self) -> Result<(), String> {
        let ack = tokio::time::timeout(self.ack_timeout, self.acks.recv())
            .await
            .map_err(|_| {
                format!(
                    "no delivery report from Kafka within {:.0} s with {} record(s) in flight: check --kafka-brokers and that the brokers are up (--ack-timeout sets the wait)",
                    self.ack_timeout.as_secs_f64(),
                    self.in_flight.len()
                )
            })?
            .ok_or_else(|| "the Kafka producer stopped".to_string())?;
        self.on_ack(ack)?;
        self.progress.update(self.acked);
        Ok(())
    }

    /// One report, whether waited for or already there: a failure aborts.
    fn on_ack(&mut self, ack: Ack) -> Result<(), String> {
        if ack.tag == PROGRESS_TAG {
            ack.result
                .map_err(|e| format!("writing the progress record failed: {e}"))?;
            self.recorded = true;
            return Ok(());
        }
        let value = self.in_flight.take(ack.tag).unwrap_or_default();
        if let Err(e) = ack.result {
            return Err(format!(
                "delivery of the row with {} = {value} to topic {} failed: {e}",
                self.order_column, ack.topic
            ));
        }
        if let Some(delivered) = &mut self.delivered {
            delivered.push(value);
        }
        self.acked += 1;
        Ok(())
    }
}
