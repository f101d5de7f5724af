//! What a recovery is told: `outbox-relay recover`'s flags, or `run
//! --recover-slot`'s defaults. Beside the recovery, so that `config/`
//! reads into it without importing the recovery itself.

use std::time::Duration;

/// How a recovery compares and publishes; `outbox-relay recover`'s flags,
/// or their defaults for `run --recover-slot`.
#[derive(Debug, Clone)]
pub struct RecoverSettings {
    /// Column the rows are compared from and published in (ORDER BY): one
    /// that grows with commit order.
    pub order_column: String,
    /// How long before the last transaction recorded in Kafka the topics
    /// are read back from.
    pub look_back: Duration,
    /// Rows fetched from the cursor at a time.
    pub batch_size: u32,
    /// Without a terminal, a progress line every this many rows.
    pub progress_every: u64,
    /// How long to wait for Kafka's next delivery report.
    pub ack_timeout: Duration,
    /// How long reading the topics back may take.
    pub read_timeout: Duration,
    /// Only when the progress topic shows a relay ran on the slot (`run
    /// --recover-slot`): without one, a missing slot is a new installation,
    /// for `setup`, not a gap to fill with the whole table.
    pub only_after_a_relay: bool,
}

impl Default for RecoverSettings {
    fn default() -> Self {
        RecoverSettings {
            order_column: "id".into(),
            look_back: Duration::from_secs(600),
            batch_size: 1000,
            progress_every: 10_000,
            ack_timeout: Duration::from_secs(120),
            read_timeout: Duration::from_secs(120),
            only_after_a_relay: false,
        }
    }
}
