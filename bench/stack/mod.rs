//! Talking to the local stack that scripts/bench brings up (Postgres, Kafka, the
//! relay's binary), and the run's settings. Nothing here measures or summarises:
//! the scenarios decide what a figure is, and all of them share these helpers, so
//! every figure reaches the stack the same way.

pub(crate) mod debezium;
pub(crate) mod kafka;
pub(crate) mod pg;
pub(crate) mod proc;
pub(crate) mod relay;

pub(crate) use debezium::Debezium;
pub(crate) use relay::Relay;

use crate::Args;

/// The command line, with the defaults that depend on `--quick` filled in.
pub(crate) struct Cfg {
    pub(crate) a: Args,
    pub(crate) events: u64,
    pub(crate) latency_rate: u64,
    pub(crate) sustained_secs: u64,
    pub(crate) poll_secs: u64,
    /// Clock ticks per second, for /proc CPU times.
    pub(crate) clk_tck: f64,
}
