//! The HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process is
//! alive: its streaming loop turns) and `/readyz` (streaming from the slot
//! and the broker reachable, not stopping).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::observe::metrics::Metrics;

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// How long the streaming loop may go without a turn before the process
/// counts as stuck. The loop turns at least every 100 ms (its timer) while
/// it streams, so this only trips on a real hang (a blocking call, a
/// deadlock), never on a slow broker or an idle outbox.
const STALLED: std::time::Duration = std::time::Duration::from_secs(60);

/// Liveness: 503 once the streaming loop is stuck, so an orchestrator
/// restarts the process; the slot makes that safe.
async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.loop_stalled_for() {
        Some(d) if d >= STALLED => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the pipeline loop has not turned for {} s\n",
                d.as_secs()
            ),
        ),
        _ => (StatusCode::OK, "ok\n".to_string()),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.stopping() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: stopping\n".to_string(),
        );
    }
    match (m.streaming(), m.broker_reachable()) {
        (true, true) => (StatusCode::OK, "ready\n".to_string()),
        (streaming, broker) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: streaming={streaming} broker_reachable={broker}\n"),
        ),
    }
}

/// Binds `addr` and serves until the process ends. Returns the bound
/// address (useful with port 0).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(local)
}
