//! What the relay shows of itself: Prometheus metrics, the HTTP endpoints
//! that serve them and the health checks, and the one-line announcements on
//! stdout that scripts and tests wait for. Nothing here changes what is
//! published or confirmed.

pub mod announce;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod progress_line;

use serde::Deserialize;

/// How the relay writes its log: text for people, JSON for collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
