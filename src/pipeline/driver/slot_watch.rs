//! What the running relay watches over SQL while it streams.
//!
//! The slot's headroom (issue 25, "see it coming"): how many bytes of WAL,
//! and at the current rate how many seconds, before the server invalidates
//! the slot. Streaming alone keeps it far off; a relay that cannot deliver
//! (Kafka down, a halt being looked at) holds the slot still while the
//! database writes on, and this is what says how long that may last.
//!
//! The schema patterns' tables the publication lacks (review N4): a tenant
//! table created while setup's event trigger did not fire is never decoded;
//! checked every `COVERAGE_EVERY`, counted and named in a WARN, without
//! stopping the other tables.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::observe::metrics::Metrics;
use crate::pg::slot_headroom::{current_wal, humanize, Headroom};
use crate::pipeline::settings::RelayConfig;

const EVERY: Duration = Duration::from_secs(5);
/// A query that takes longer than this is a connection to start again.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Below this the relay warns (once until it is above again).
const WARN_BELOW: Duration = Duration::from_secs(3600);
/// How often the patterns' tables are checked against the publication.
const COVERAGE_EVERY: Duration = Duration::from_secs(30);

pub(super) async fn slot_watch(cfg: RelayConfig, metrics: Arc<Metrics>) {
    let mut client = None;
    let mut headroom = HeadroomWatch::default();
    let mut coverage = CoverageWatch::default();
    loop {
        if client.is_none() {
            match tokio::time::timeout(QUERY_TIMEOUT, crate::pg::sql::connect(&cfg.database)).await
            {
                Ok(Ok((c, _connection))) => client = Some(c),
                Ok(Err(e)) => tracing::debug!(error = %e, "slot watch: cannot connect; will retry"),
                Err(_) => tracing::debug!("slot watch: no answer to connecting; will retry"),
            }
        }
        if let Some(c) = &client {
            if !headroom.sample(c, &cfg, &metrics).await {
                client = None;
            }
        }
        if let Some(c) = &client {
            coverage.check(c, &cfg, &metrics).await;
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// The slot's headroom, and the WAL rate that turns it into time.
#[derive(Default)]
struct HeadroomWatch {
    last: Option<(Lsn, Instant)>,
    rate: Option<f64>,
    warned: bool,
}

impl HeadroomWatch {
    /// One sample into the gauges (and a warning when time runs short);
    /// false when the connection is to be made again.
    async fn sample(
        &mut self,
        c: &tokio_postgres::Client,
        cfg: &RelayConfig,
        metrics: &Metrics,
    ) -> bool {
        let sample = tokio::time::timeout(QUERY_TIMEOUT, async {
            Ok::<_, tokio_postgres::Error>((
                Headroom::read(c, &cfg.slot).await?,
                current_wal(c).await?,
            ))
        })
        .await;
        let (h, wal) = match sample {
            Ok(Ok((Some(h), wal))) => (h, wal),
            Ok(Ok((None, _))) => return true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "slot watch: query failed; will reconnect");
                return false;
            }
            Err(_) => {
                tracing::debug!("slot watch: no answer within {QUERY_TIMEOUT:?}; will reconnect");
                return false;
            }
        };
        if let (Some(now), Some((before, at))) = (wal, self.last) {
            let r = now.0.saturating_sub(before.0) as f64 / at.elapsed().as_secs_f64().max(0.001);
            self.rate = Some(self.rate.map_or(r, |p| 0.7 * p + 0.3 * r));
        }
        self.last = wal.map(|w| (w, Instant::now()));
        metrics
            .slot_safe_wal_bytes
            .set(h.safe_wal_size.unwrap_or(-1));
        let left = h.time_left(self.rate);
        metrics
            .slot_invalidation_seconds
            .set(left.map_or(-1, |t| t.left.as_secs() as i64));
        match left {
            Some(t) if t.left < WARN_BELOW && !self.warned => {
                self.warned = true;
                tracing::warn!(
                    slot = %cfg.slot,
                    left_s = t.left.as_secs(),
                    safe_wal_bytes = h.safe_wal_size,
                    "the server will invalidate the slot in about {} ({} at the current WAL rate) unless it moves on: the relay is not confirming fast enough (see outbox_replication_lag_bytes and its log). An invalidated slot loses the events written meanwhile to the stream: fix what holds the relay back, or raise {}",
                    humanize(t.left),
                    t.by,
                    t.by
                );
            }
            Some(t) if t.left >= WARN_BELOW => self.warned = false,
            None => self.warned = false,
            _ => {}
        }
        true
    }
}

/// The schema patterns' tables the publication lacks, each named once.
#[derive(Default)]
struct CoverageWatch {
    at: Option<Instant>,
    unpublished: HashSet<String>,
}

impl CoverageWatch {
    async fn check(&mut self, c: &tokio_postgres::Client, cfg: &RelayConfig, metrics: &Metrics) {
        if self.at.is_some_and(|at| at.elapsed() < COVERAGE_EVERY) {
            return;
        }
        self.at = Some(Instant::now());
        let lacking = tokio::time::timeout(
            QUERY_TIMEOUT,
            crate::pg::catalog::unpublished_pattern_tables(
                c,
                &cfg.publication,
                &crate::pipeline::tables::names(&cfg.tables),
            ),
        )
        .await;
        let Ok(Ok(lacking)) = lacking else { return };
        metrics.unpublished_tables.set(lacking.len() as i64);
        for table in &lacking {
            if !self.unpublished.contains(table) {
                tracing::warn!(
                    %table,
                    publication = %cfg.publication,
                    "table {table} matches a schema pattern but publication {} does not cover it (setup's event trigger did not fire: session_replication_role = replica, a disabled trigger, event_triggers = off): its rows are never decoded. Add it (ALTER PUBLICATION {} ADD TABLE {table}), then publish again the rows written before that (operations §4)",
                    cfg.publication,
                    crate::pg::quote_ident(&cfg.publication),
                );
            }
        }
        self.unpublished = lacking.into_iter().collect();
    }
}
