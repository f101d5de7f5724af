//! `outbox-relay tail`: prints records as they arrive in Kafka, with topic,
//! partition, offset, key, headers and payload. An operator's (and the
//! demo's) way to watch what the relay publishes, without a Kafka CLI.
//!
//! Control characters in keys, headers and payloads are printed escaped
//! (`\u{1b}`), so a record cannot drive the operator's terminal. A closed
//! output (`tail | head`) ends it quietly, also while no records arrive:
//! the output is watched for its reader leaving, as GNU `tail -f` does, so
//! an idle tail does not outlive the pipeline it was started in.

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pipeline::sink::client::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Debug, Clone, clap::Args)]
pub struct TailOptions {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: String,
    /// Follow every topic whose name starts with this prefix (new topics are
    /// picked up as they appear).
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Print what the topics already hold too, not only new records.
    #[arg(long)]
    pub from_beginning: bool,
    /// A librdkafka consumer property KEY=VALUE (repeatable), e.g. for TLS or
    /// SASL: security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-512, …
    #[arg(long = "kafka-property")]
    pub kafka_property: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// `b` as text for a terminal: invalid UTF-8 replaced, control characters
/// escaped.
fn printable(b: Option<&[u8]>) -> String {
    let Some(b) = b else {
        return "∅".to_string();
    };
    let mut out = String::with_capacity(b.len());
    for c in String::from_utf8_lossy(b).chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the reader of standard output has gone away: a pipe whose read
/// end is closed reports POLLERR on its write end. A terminal or a file never
/// does, so for them this stays false.
pub fn stdout_reader_gone() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Follows the topics until `stop` is set, `max` records were printed or
/// `reader_gone` says nobody reads `out` any more.
pub fn run(
    opts: &TailOptions,
    stop: Arc<AtomicBool>,
    out: &mut dyn Write,
    reader_gone: &dyn Fn() -> bool,
) -> Result<u64, TailError> {
    let properties = crate::config::kafka_properties(opts.kafka_property.clone())?;
    let mut cfg = client_config(
        &opts.kafka_brokers,
        "outbox-relay-tail",
        &[("group.id", "outbox-relay-tail")],
        &properties,
    );
    // What tail relies on, over the user's properties.
    let consumer: BaseConsumer = cfg
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut follow = Follow {
        assigned: HashSet::new(),
        last_scan: None,
        first_scan: true,
    };
    let mut printed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        follow.scan(&consumer, opts)?;
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            // Idle: no write would notice a closed output, so ask.
            if reader_gone() {
                return Ok(printed);
            }
            continue;
        };
        match writeln!(out, "{}", line(&m?)).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader went away (`tail | head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(printed),
            Err(e) => return Err(TailError::Output(e)),
        }
        printed += 1;
        if opts.max.is_some_and(|max| printed >= max) {
            break;
        }
    }
    Ok(printed)
}

/// The partitions followed so far. New topics with the prefix are picked up
/// within a second of their creation, and read from their start.
struct Follow {
    assigned: HashSet<(String, i32)>,
    last_scan: Option<Instant>,
    first_scan: bool,
}

impl Follow {
    fn scan(&mut self, consumer: &BaseConsumer, opts: &TailOptions) -> Result<(), TailError> {
        if self
            .last_scan
            .is_some_and(|t| t.elapsed() <= Duration::from_secs(1))
        {
            return Ok(());
        }
        self.last_scan = Some(Instant::now());
        let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(3)) else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            if !t.name().starts_with(&opts.topic_prefix) || t.name().starts_with("__") {
                continue;
            }
            for p in t.partitions() {
                if self.assigned.insert((t.name().to_string(), p.id())) {
                    let offset = if self.first_scan && !opts.from_beginning {
                        let (_, high) =
                            consumer.fetch_watermarks(t.name(), p.id(), Duration::from_secs(5))?;
                        Offset::Offset(high)
                    } else {
                        Offset::Beginning
                    };
                    tpl.add_partition_offset(t.name(), p.id(), offset)?;
                }
            }
        }
        if tpl.count() > 0 {
            consumer.incremental_assign(&tpl)?;
        }
        if self.first_scan {
            self.first_scan = false;
            eprintln!(
                "tail: following {} partitions{}; topics created from now on are read from their start",
                self.assigned.len(),
                if opts.from_beginning { " from their start" } else { " from their end" }
            );
        }
        Ok(())
    }
}

/// One record as a line: where it is, key, headers and payload, every
/// control character escaped.
fn line(m: &BorrowedMessage<'_>) -> String {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    format!(
                        "{}={}",
                        printable(Some(h.key.as_bytes())),
                        printable(h.value)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!(
        "{}[{}]@{} key={} headers={{{}}} payload={}",
        m.topic(),
        m.partition(),
        m.offset(),
        printable(m.key()),
        headers,
        printable(m.payload())
    )
}

/// `outbox-relay tail`: follows the topics on stdout until a signal, `--max`
/// records, or the reader leaving; the exit code.
/// Tail reads Kafka alone: it takes no relay options, so the config file
/// is not read.
pub async fn command(_config: Option<&std::path::Path>, opts: TailOptions) -> u8 {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        crate::signals::shutdown_signal().await;
        flag.store(true, Ordering::Relaxed);
    });
    let result = tokio::task::spawn_blocking(move || {
        run(
            &opts,
            stop,
            &mut std::io::stdout().lock(),
            &stdout_reader_gone,
        )
    })
    .await;
    match result {
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            eprintln!("outbox-relay tail: {e}");
            1
        }
        Err(e) => {
            eprintln!("outbox-relay tail: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L4 of the December 2026 review: no terminal escapes from a record.
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            printable(Some(b"red \x1b[31m\r\nbell\x07")),
            "red \\u{1b}[31m\\u{d}\\u{a}bell\\u{7}"
        );
        assert_eq!(printable(Some("ünïcode ✓".as_bytes())), "ünïcode ✓");
        assert_eq!(printable(None), "∅");
    }
}
