//! outbox-relay: the transactional outbox, published by change data capture.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! replication (source) -> pgoutput (decoder) [-> stream_buffer] -> router -> sink (Kafka) -> checkpoint (LSN)
//! ```
//!
//! `pipeline` drives the stages and `supervisor` its sessions; `policy`
//! decides about bad events, `messages` routes logical messages. Beside
//! them: `config`, `tls`, `metrics` and `http`, `announce` (stdout lines),
//! and the operator commands `setup`, `check`, `status`, `backfill`,
//! `cleanup`, `tail` and `verify`.

pub mod announce;
pub mod backfill;
pub mod check;
pub mod checkpoint;
pub mod cleanup;
pub mod config;
pub mod http;
pub mod lsn;
pub mod messages;
pub mod metrics;
pub mod pg;
pub mod pgoutput;
pub mod pipeline;
pub mod policy;
pub mod replication;
pub mod router;
pub mod setup;
pub mod sink;
pub mod status;
pub mod stream_buffer;
pub mod supervisor;
pub mod tail;
pub mod tls;
pub mod verify;
