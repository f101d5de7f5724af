//! The integration tests, one binary (linked once): a module per area, the
//! shared helpers in `support`. Each module's tests talk to the real
//! PostgreSQL and Apache Kafka that `scripts/stack up` starts.
//!
//! `scripts/test` runs the modules one at a time (`main -- MODULE::`), so
//! that tests run side by side only with tests of their own module, as
//! they were written to: some share cluster-wide state (WAL, slots) and
//! take turns through a lock of their module.

#[macro_use]
mod support;

mod auth;
mod cli;
mod cutover;
mod debezium;
mod differential;
mod e2e;
mod errors;
mod exactly_once;
mod failover;
mod faults;
mod ha;
mod heartbeat;
mod history;
mod kafka_tls;
mod messages;
mod metrics;
mod misconfig;
mod pgoutput_captured;
mod pgoutput_versions;
mod source;
mod status_check;
mod streaming;
mod tables;
mod tls;
mod verify;
