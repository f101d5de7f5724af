//! The scenarios, one module each; every one uses a database and topics of its own
//! and adds one section to the report. What is shared here is the workload itself
//! (payload size, keys, headers), so that every publisher moves the same records.

mod committed;
mod drain;
mod latency;
mod pollers;
mod sustained;

use rdkafka::message::{Header, OwnedHeaders};

pub(crate) use drain::scenario_drain;
pub(crate) use latency::scenario_latency;
pub(crate) use pollers::scenario_pollers;
pub(crate) use sustained::scenario_sustained;
#[cfg(test)]
pub(crate) use {committed::parse_seq, sustained::wal_age};

/// `repeat('x', PAD)` in a `{"pad": …, "seq": n}` jsonb gives ~500 B of JSON text.
pub(crate) const PAD: usize = 473;
pub(crate) const AGGREGATES: i64 = 1000;

/// The headers the relay sends for the classic table: the event id and type.
pub(crate) fn relay_headers(id: &str, event_type: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(2);
    for (key, value) in [("id", id), ("event_type", event_type)] {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}
