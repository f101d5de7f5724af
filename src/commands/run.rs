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
    #[error("--table {0} picks one of the config file's [[tables]] sections, but run publishes every table of the publication: with one section picked, the rows of the others would be skipped as another table's. Remove --table (and OUTBOX_RELAY_TABLE), or give this relay a file with only the tables it should publish (and a publication and slot of its own)")]
    TablePicked(String),
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
    crate::supervisor::run(cfg, metrics, shutdown_flag())
        .await
        .map(|_| ())
        .map_err(RunError::Stopped)
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the relay still runs; it just cannot stop gracefully.
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without waiting for deliveries");
        std::process::exit(130);
    });
}

/// The shutdown signal as a flag every session can watch.
fn shutdown_flag() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
        // Keep the sender alive so receivers never see a closed channel.
        std::future::pending::<()>().await;
    });
    rx
}
