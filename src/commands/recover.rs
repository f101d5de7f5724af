//! `outbox-relay recover`: the lost slot's gap published from the outbox
//! table (`pipeline::recover` says how and why it is safe). Owns the flags,
//! the output and the exit status.

use std::path::Path;
use std::time::Duration;

use crate::config::Options;
use crate::pipeline::recover::RecoverSettings;

/// `outbox-relay recover`: the relay's options plus the recovery's own.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub options: Options,

    /// Column the rows are compared from and published in (ORDER BY): one
    /// that grows with commit order, such as a sequence-backed primary key.
    #[arg(long, default_value = "id")]
    pub order_column: String,

    /// Seconds before the last transaction recorded in Kafka from which the
    /// topics are read back: covers transactions that took their order
    /// values before it and committed after it.
    #[arg(long, default_value_t = 600.0)]
    pub look_back: f64,

    /// Rows fetched from the cursor at a time.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: u32,

    /// Without a terminal, print a progress line every this many rows.
    #[arg(long, default_value_t = 10_000)]
    pub progress_every: u64,

    /// Seconds to wait for Kafka's next delivery report before giving up.
    #[arg(long, default_value_t = 120.0)]
    pub ack_timeout: f64,

    /// Seconds allowed for reading the topics back.
    #[arg(long, default_value_t = 120.0)]
    pub read_timeout: f64,
}

fn seconds(name: &str, value: f64, zero_ok: bool) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| zero_ok || !d.is_zero())
        .ok_or_else(|| format!("{name} {value}: expected a positive number of seconds"))
}

impl RecoverArgs {
    fn settings(&self) -> Result<RecoverSettings, String> {
        Ok(RecoverSettings {
            order_column: self.order_column.clone(),
            look_back: seconds("--look-back", self.look_back, true)?,
            batch_size: self.batch_size,
            progress_every: self.progress_every,
            ack_timeout: seconds("--ack-timeout", self.ack_timeout, false)?,
            read_timeout: seconds("--read-timeout", self.read_timeout, false)?,
            only_after_a_relay: false,
        })
    }
}

const RECOVER: super::Entry = super::Entry::new("recover", super::Kafka::Required);

/// The `recover` subcommand; returns the exit code (0 recovered, 1 failed or
/// a range that cannot be recovered, 2 configuration error or nothing to
/// recover).
pub async fn command(config: Option<&Path>, args: RecoverArgs) -> u8 {
    RECOVER
        .with_config(config, args.options.clone(), |cfg| async move {
            let settings = match args.settings() {
                Ok(s) => s,
                Err(e) => return RECOVER.fail(e, 2),
            };
            match crate::pipeline::recover::run(&cfg, &settings, &mut super::say).await {
                Ok(s) => {
                    println!("recover done: {s}: start `outbox-relay run` now");
                    for u in &s.unrecoverable {
                        eprintln!("outbox-relay recover: cannot recover: {u}");
                    }
                    u8::from(!s.unrecoverable.is_empty())
                }
                Err(e) if e.is_usage() => RECOVER.fail(e, 2),
                Err(e) => RECOVER.fail(e, 1),
            }
        })
        .await
}
