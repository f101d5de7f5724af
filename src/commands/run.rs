//! `outbox-relay run`: the HTTP endpoint, then the supervised pipeline until
//! SIGTERM or SIGINT. A first signal stops gracefully (what is in flight is
//! settled and confirmed); a second one exits at once.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::RelayConfig;
use crate::observe::metrics::Metrics;
use crate::pipeline::driver::PipelineError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} for /metrics, /healthz and /readyz: choose another --http-address, or `off`")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("relay stopped")]
    Stopped(#[source] PipelineError),
    #[error("recovering the slot (--recover-slot) failed: {0}")]
    Recover(#[source] crate::pipeline::recover::RecoverError),
    #[error("the slot was recovered (--recover-slot) but some events cannot be: {}; the relay stops so that this is seen. Started again it streams from the new slot", .0.join("; "))]
    Unrecoverable(Vec<String>),
    #[error("--table {0} picks one of the config file's [[tables]] sections, but run publishes every table of the publication: with one section picked, the rows of the others would be skipped as another table's. Remove --table (and OUTBOX_RELAY_TABLE), or give this relay a file with only the tables it should publish (and a publication and slot of its own)")]
    TablePicked(String),
}

/// `outbox-relay run`: logs as `--log-format` says, info and up by default.
pub async fn command(config: Option<&std::path::Path>, options: crate::config::Options) -> u8 {
    super::Entry::new("run", super::Kafka::Required)
        .with_config(config, options, |cfg| async move {
            crate::observe::logging::init(cfg.log_format, "info");
            match run(&cfg).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{}", super::one_line(&e));
                    1
                }
            }
        })
        .await
}

/// Serves /metrics, /healthz and /readyz (unless `--http-address off`), then
/// runs sessions until a signal or a non-retriable error.
pub async fn run(cfg: &RelayConfig) -> Result<(), RunError> {
    if cfg.table_picked {
        return Err(RunError::TablePicked(cfg.table_names()));
    }
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = cfg.http_address {
        let bound = crate::observe::http::serve(addr, metrics.clone())
            .await
            .map_err(|source| RunError::Listen { addr, source })?;
        tracing::info!(address = %bound, "HTTP endpoint listening (/metrics, /healthz, /readyz)");
        crate::observe::announce::http_listening(bound);
    }
    let shutdown = crate::signals::shutdown_flag();
    loop {
        let stopped = match crate::supervisor::run(cfg, metrics.clone(), shutdown.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let Some(settings) = cfg
            .recover_slot
            .as_ref()
            .filter(|_| stopped.asks_for_recover())
        else {
            return Err(RunError::Stopped(stopped));
        };
        tracing::warn!(error = %stopped, "recovering the slot from the outbox table (--recover-slot)");
        let mut say = |line: String| tracing::info!("recover: {line}");
        match crate::pipeline::recover::run(cfg, settings, &mut say).await {
            Ok(done) => {
                metrics.slot_recoveries.inc();
                metrics.events_recovered.inc_by(done.published);
                tracing::info!("slot recovered: {done}");
                if !done.unrecoverable.is_empty() {
                    return Err(RunError::Unrecoverable(done.unrecoverable));
                }
            }
            // Another relay of the slot recovers it, or just did: stream
            // from it, or stand by, as usual.
            Err(e @ crate::pipeline::recover::RecoverError::Running { .. })
            | Err(e @ crate::pipeline::recover::RecoverError::SlotUsable { .. })
            | Err(e @ crate::pipeline::recover::RecoverError::SlotActive { .. }) => {
                tracing::info!("{e}");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => return Err(RunError::Recover(e)),
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}
