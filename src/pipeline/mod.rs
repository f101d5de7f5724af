//! The stages from the replication stream to the confirmed position, one
//! module each, in the order an event passes them: `source`, `decode`,
//! `route`, `sink`, `checkpoint`. `driver` runs one session of them;
//! `history` tells which WAL history a recorded position belongs to;
//! `policy` decides what a bad event does; `recover` publishes a lost
//! slot's gap from the outbox table. A stage does not reach into
//! another's state: the driver hands values from one to the next.

pub mod checkpoint;
pub mod decode;
pub mod driver;
pub mod history;
pub mod policy;
pub mod recover;
pub mod route;
pub mod settings;
pub mod sink;
pub mod source;
pub mod tables;
