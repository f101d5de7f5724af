//! outbox-relay: the transactional outbox, published by change data capture.
//!
//! The tree is the pipeline:
//!
//! ```text
//! pipeline::source (replication connection) -> pipeline::decode (pgoutput [+ stream buffer])
//!   -> pipeline::route (router, logical messages) -> pipeline::sink (Kafka)
//!   -> pipeline::checkpoint (the LSN to confirm)
//! ```
//!
//! `pipeline::driver` runs one session of those stages and `supervisor` the
//! sessions; `pipeline::policy` decides about bad events. Beside them:
//! `config` (flags, environment, TOML, presets), `pg` (Postgres connection
//! settings, TLS, identifier quoting), `observe` (metrics, HTTP, stdout
//! announcements), `signals` (SIGTERM and SIGINT) and the operator commands
//! in `commands`. `testing` is for tests only (unit and integration).

pub mod commands;
pub mod config;
pub mod duration;
pub mod lsn;
pub mod observe;
pub mod pg;
pub mod pipeline;
pub mod signals;
pub mod supervisor;
#[doc(hidden)]
pub mod testing;
