//! The latency run's writers: one-event transactions paced to the run's rate from a
//! common start, each taking its commit time as COMMIT returns, and producing
//! directly when the run asks for it. Paced by the clock alone, never by the relay
//! or a poller, so a slow publisher shows as latency rather than as a lower rate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use rdkafka::producer::{BaseRecord, ThreadedProducer};

use super::publishing::{AckTimes, Publishing};
use super::{Topics, LATENCY_WINDOW_S};
use crate::scenarios::{relay_headers, AGGREGATES, PAD};
use crate::stack::pg::connect;
use crate::{log, now_us};

/// One writer connection of a latency run.
struct Writer {
    url: String,
    /// This writer's number, of `writers`: it writes every `writers`-th seq.
    w: i32,
    writers: i32,
    total: u64,
    rate: u64,
    per_writer: f64,
    start: tokio::time::Instant,
    direct: Option<Arc<ThreadedProducer<AckTimes>>>,
    direct_base: String,
    /// Produce directly every this many events (1: every event).
    every: u64,
    pad: String,
}

/// A writer's task: (seq, commit time in epoch µs) of every event it wrote.
pub(super) type WriterTask = tokio::task::JoinHandle<Result<Vec<(i64, i64)>>>;

/// The writers, paced from a common start 100 ms from now; returns how many there
/// are, the start, and their tasks.
pub(super) fn spawn_writers(
    name: &str,
    url: &str,
    rate: u64,
    secs: u64,
    publishing: &Publishing,
    topics: &Topics,
) -> (i32, tokio::time::Instant, Vec<WriterTask>) {
    let writers = if rate >= 1000 { 4 } else { 1 };
    let per_writer = rate as f64 / writers as f64;
    let total = rate * secs;
    log(format!("latency/{name}: {rate} events/s of one-event transactions for {secs} s ({writers} writers)"));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut hs = Vec::new();
    for w in 0..writers {
        hs.push(tokio::spawn(write_events(Writer {
            url: url.to_string(),
            w,
            writers,
            total,
            rate,
            per_writer,
            start,
            direct: publishing.direct.clone(),
            direct_base: topics.direct_base.clone(),
            every: publishing.shadow_every.unwrap_or(1),
            pad: "x".repeat(PAD),
        })));
    }
    (writers, start, hs)
}

async fn write_events(wr: Writer) -> Result<Vec<(i64, i64)>> {
    let c = connect(&wr.url).await?;
    let stmt = c
        .prepare(&format!(
            "INSERT INTO outbox (event_type, aggregate_id, payload) VALUES ($3, $1, jsonb_build_object('seq', $2::bigint, 'pad', repeat('x', {PAD})))"
        ))
        .await?;
    let mut commits: Vec<(i64, i64)> = Vec::new();
    let mut i = 0u64;
    loop {
        let seq = (i * wr.writers as u64 + wr.w as u64) as i64;
        if seq as u64 >= wr.total {
            break;
        }
        tokio::time::sleep_until(wr.start + Duration::from_secs_f64(i as f64 / wr.per_writer))
            .await;
        let key = format!("agg-{}", seq % AGGREGATES);
        let etype = format!("w{}", seq as u64 / (wr.rate * LATENCY_WINDOW_S));
        // Autocommit: the statement is the one-event transaction; when execute()
        // returns, COMMIT has returned.
        c.execute(&stmt, &[&key, &seq, &etype]).await?;
        commits.push((seq, now_us()));
        if let Some(p) = wr
            .direct
            .as_ref()
            .filter(|_| (seq as u64).is_multiple_of(wr.every))
        {
            produce_direct(p, &wr, &etype, &key, seq).await?;
        }
        i += 1;
    }
    Ok(commits)
}

/// Event `seq` straight from its writer, right after its COMMIT returned.
async fn produce_direct(
    p: &ThreadedProducer<AckTimes>,
    wr: &Writer,
    etype: &str,
    key: &str,
    seq: i64,
) -> Result<()> {
    let topic = format!("{}.{etype}", wr.direct_base);
    let payload = format!("{{\"pad\": \"{}\", \"seq\": {seq}}}", wr.pad);
    // The relay's headers for this table (event id, event type):
    // the same records, so the broker has the same work to do.
    let id = format!("00000000-0000-4000-8000-{seq:012}");
    let headers = relay_headers(&id, etype);
    let mut rec = BaseRecord::with_opaque_to(&topic, seq as usize)
        .key(key)
        .payload(&payload)
        .headers(headers);
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((e, r))
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
            {
                rec = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => bail!("direct produce: {e}"),
        }
    }
}
