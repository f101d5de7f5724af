//! From decoded rows and logical messages to Kafka records: the column
//! mapping, the topic template, keys and headers. Pure: no I/O, no
//! positions to confirm.

pub mod config;
pub mod messages;
pub mod router;
pub mod template;
