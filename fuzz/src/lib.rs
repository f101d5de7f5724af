//! The decoder under fuzzing, compiled straight from the relay's sources:
//! `pgoutput` is pure and depends only on `lsn`, `bytes` and `thiserror`, so
//! the fuzz build does not pull in librdkafka and the rest of the relay.

#[path = "../../src/lsn.rs"]
pub mod lsn;
#[path = "../../src/pipeline/decode/pgoutput/mod.rs"]
pub mod pgoutput;
