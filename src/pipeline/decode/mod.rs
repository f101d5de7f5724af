//! From `pgoutput` bytes to logical messages: the pure, I/O-free decoder
//! and the buffer that holds streamed in-progress transactions until their
//! commit. Nothing here knows about Kafka or the outbox's columns.

pub mod pgoutput;
pub mod stream_buffer;
