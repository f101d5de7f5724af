//! The operator commands, one module each. A command owns its arguments,
//! its output and its exit status; the pipeline's stages are not run from
//! here except by `backfill`, which publishes through the same sink.

pub mod backfill;
pub mod check;
pub mod cleanup;
pub mod recover;
pub mod run;
pub mod setup;
pub mod status;
pub mod tail;
pub mod verify;
