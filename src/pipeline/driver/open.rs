//! Session set-up: connect, identify the system, check the slot and the
//! publication, choose the pgoutput protocol, start streaming, all within
//! the connect and replication timeouts. Nothing here reads events.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pipeline::decode::stream_buffer;
use crate::pipeline::history::ServerHistory;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::{Ack, KafkaSink};
use crate::pipeline::source::{ConnectParams, ReplicationConnection, ReplicationError};

use super::checks::{
    check_publication, check_slot, refuse_moved_without_record, slot_in_use, terminate_if_stale,
    terminated_holder, warn_if_no_trigger, warn_if_standby_slots_absent, Slot,
};
use super::errors::PipelineError;

/// Parses a Postgres duration setting (`60s`, `1min`, `500ms`, `0`).
pub fn parse_pg_duration(s: &str) -> Option<Duration> {
    crate::duration::parse_duration(s, crate::duration::BareNumber::Millis).ok()
}

/// The newest pgoutput protocol a server version speaks. Without
/// `--streaming` every version delivers whole committed transactions; with
/// it, protocol 2 or later carries the streamed blocks.
pub fn protocol_for(server_version_num: u32) -> u32 {
    match server_version_num {
        160000.. => 4,
        150000.. => 3,
        140000.. => 2,
        _ => 1,
    }
}

/// A session's connection after set-up: streaming has started.
pub(super) struct Opened {
    pub(super) stream: crate::pipeline::source::ReplicationStream,
    pub(super) slot: Slot,
    pub(super) status_interval: Duration,
    pub(super) protocol: u32,
    pub(super) sink: KafkaSink,
    pub(super) acks: mpsc::UnboundedReceiver<Ack>,
    pub(super) system_id: String,
    /// The server's timeline, its ancestors and how far its WAL went when
    /// the session started: what the progress record's history is judged by.
    pub(super) history: ServerHistory,
}

/// An error for a step that took longer than `limit`: the connection is
/// treated as lost, so the supervisor reconnects.
pub(super) fn timed_out(what: &str, limit: Duration) -> PipelineError {
    PipelineError::Replication(ReplicationError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "{what}: no answer from the server within {:.1}s (--replication-timeout)",
            limit.as_secs_f64()
        ),
    )))
}

/// The session's producer: transactional with exactly-once (its progress
/// topic created first, if missing), idempotent otherwise.
async fn producer(
    cfg: &RelayConfig,
    system_id: &str,
) -> Result<(KafkaSink, mpsc::UnboundedReceiver<Ack>), PipelineError> {
    let Some(e) = &cfg.exactly_once else {
        return Ok(KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties)?);
    };
    // At-least-once creates it in the background, so that it streams while
    // Kafka is away; exactly-once can do nothing without Kafka.
    if let Some(topic) = &cfg.progress_topic {
        crate::pipeline::sink::progress::ensure_topic(
            &cfg.kafka_brokers,
            &cfg.kafka_properties,
            topic,
        )
        .await?;
    }
    let id = e.transactional_id(system_id, &cfg.slot);
    Ok(KafkaSink::transactional(
        &cfg.kafka_brokers,
        &cfg.kafka_properties,
        &id,
    )?)
}

/// The server's history for `pipeline::history`: its ancestors come from the
/// current timeline's history file (none on timeline 1).
async fn server_history(
    conn: &mut ReplicationConnection,
    timeline: u32,
    xlogpos: Lsn,
) -> Result<ServerHistory, PipelineError> {
    let ancestors = if timeline > 1 {
        let file = conn.timeline_history(timeline).await?;
        ServerHistory::parse_ancestors(&file).map_err(|e| {
            PipelineError::Replication(ReplicationError::Protocol(format!(
                "the history file of timeline {timeline}: {e}"
            )))
        })?
    } else {
        Vec::new()
    };
    Ok(ServerHistory {
        timeline,
        xlogpos,
        ancestors,
    })
}

/// Connects, checks the slot and the publication and starts streaming.
/// Connecting and authenticating are bounded by the connect timeout, the
/// queries after it by the replication timeout: a server that stops
/// answering (a failover that black-holes its address) must not hold the
/// relay for the kernel's TCP retry time.
pub(super) async fn open(cfg: &RelayConfig, resume: Option<Lsn>) -> Result<Opened, PipelineError> {
    let mut params = ConnectParams::from_config(&cfg.database)?;
    params.tcp_user_timeout = cfg.replication_timeout;
    let conn = ReplicationConnection::connect(&params).await?;
    match cfg.replication_timeout {
        Some(limit) => tokio::time::timeout(limit, set_up(conn, cfg, resume))
            .await
            .map_err(|_| timed_out("setting up the replication session", limit))?,
        None => set_up(conn, cfg, resume).await,
    }
}

async fn set_up(
    mut conn: ReplicationConnection,
    cfg: &RelayConfig,
    resume: Option<Lsn>,
) -> Result<Opened, PipelineError> {
    let system = conn.identify_system().await?;
    let history = server_history(&mut conn, system.timeline, system.xlogpos).await?;
    let slot = check_slot(&mut conn, &cfg.slot).await?;
    check_publication(&mut conn, cfg).await?;
    refuse_moved_without_record(cfg, resume, slot.confirmed)?;
    let status_interval = status_interval(&mut conn, cfg).await;
    if let Some(pid) = slot.active_pid {
        let terminated = cfg.terminate_stale_walsender
            && terminate_if_stale(&mut conn, &cfg.slot, pid, status_interval).await?;
        // A standby's attempt ends here, before it builds a producer (and
        // connects to Kafka) it cannot use: it is cheap enough to repeat
        // every STANDBY_RETRY, which bounds the takeover.
        if !terminated {
            return Err(slot_in_use(&cfg.slot, pid));
        }
    }
    let server_version: u32 = conn
        .show("server_version_num")
        .await?
        .trim()
        .parse()
        .unwrap_or(0);
    // Diagnoses only a session that will stream makes: a standby's
    // attempts every half second would repeat them.
    if server_version >= 170000 {
        warn_if_standby_slots_absent(&mut conn, &cfg.slot).await;
    }
    if !cfg.patterns().is_empty() {
        warn_if_no_trigger(&mut conn, cfg).await?;
    }
    let protocol = cfg
        .protocol_version
        .unwrap_or_else(|| protocol_for(server_version));
    let options = start_options(cfg, protocol)?;
    if let Some(streaming) = &cfg.streaming {
        stream_buffer::prepare_spill_dir(&streaming.spill_dir.join(&cfg.slot))?;
    }
    // Before START_REPLICATION: a producer setting the relay refuses
    // stops it before the slot is touched.
    let (sink, acks) = producer(cfg, &system.system_id).await?;
    let slot = take_slot(&mut conn, cfg, resume, slot).await?;
    tracing::info!(
        server_version,
        protocol,
        slot = %cfg.slot,
        publication = %cfg.publication,
        resume_from = %slot.confirmed,
        server_wal = %system.xlogpos,
        tables = %cfg.table_names(),
        "starting replication"
    );
    // Ask for the position we expect explicitly rather than 0/0, so the
    // server log shows it; the server never starts before the slot's
    // confirmed_flush_lsn anyway.
    let stream = conn
        .start_logical(&cfg.slot, slot.confirmed, &options)
        .await?;
    Ok(Opened {
        stream,
        slot,
        status_interval,
        protocol,
        sink,
        acks,
        system_id: system.system_id,
        history,
    })
}

/// How often to send status updates: the configured interval, but at
/// least twice per the server's wal_sender_timeout.
async fn status_interval(conn: &mut ReplicationConnection, cfg: &RelayConfig) -> Duration {
    let timeout = conn
        .show("wal_sender_timeout")
        .await
        .ok()
        .as_deref()
        .and_then(parse_pg_duration);
    match timeout {
        Some(t) if !t.is_zero() => cfg.status_interval.min(t / 2),
        _ => cfg.status_interval,
    }
}

/// Review N8: seconds may have passed since the slot was read (a stale
/// holder ended, the progress topic made), in which the holder confirmed
/// further. Sending that older position in the first status update would
/// move confirmed_flush_lsn back on PostgreSQL 17 and older: read it
/// again, right before taking it.
async fn take_slot(
    conn: &mut ReplicationConnection,
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    first: Slot,
) -> Result<Slot, PipelineError> {
    let slot = match check_slot(conn, &cfg.slot).await? {
        again if again.active_pid.is_some() && !terminated_holder(&first, &again) => {
            return Err(slot_in_use(&cfg.slot, again.active_pid.unwrap_or_default()));
        }
        again => Slot {
            confirmed: again.confirmed.max(first.confirmed),
            active_pid: None,
        },
    };
    refuse_moved_without_record(cfg, resume, slot.confirmed)?;
    Ok(slot)
}

/// pgoutput's options for START_REPLICATION.
fn start_options(
    cfg: &RelayConfig,
    protocol: u32,
) -> Result<Vec<(&'static str, String)>, PipelineError> {
    let mut options = vec![
        ("proto_version", protocol.to_string()),
        ("publication_names", quote_ident(&cfg.publication)),
    ];
    if cfg.messages.is_some() {
        options.push(("messages", "true".to_string()));
    }
    if cfg.streaming.is_some() {
        if protocol < 2 {
            return Err(PipelineError::Config(format!(
                "--streaming needs pgoutput protocol 2 or later (PostgreSQL 14+); this session uses {protocol}"
            )));
        }
        options.push(("streaming", "on".to_string()));
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_follows_the_server_version() {
        assert_eq!(protocol_for(130012), 1);
        assert_eq!(protocol_for(140023), 2);
        assert_eq!(protocol_for(150019), 3);
        assert_eq!(protocol_for(160015), 4);
        assert_eq!(protocol_for(180006), 4);
    }

    #[test]
    fn parses_postgres_durations() {
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("abc"), None);
    }
}
