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
use crate::pipeline::source::{
    quote_literal, ConnectParams, ReplicationConnection, ReplicationError,
};

use super::errors::PipelineError;

/// Parses a Postgres duration setting (`60s`, `1min`, `500ms`, `0`).
pub fn parse_pg_duration(s: &str) -> Option<Duration> {
    crate::duration::parse_duration(s, crate::duration::BareNumber::Millis).ok()
}

pub(super) struct Slot {
    pub(super) confirmed: Lsn,
    pub(super) active_pid: Option<i32>,
}

pub(super) async fn check_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<Slot, PipelineError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT coalesce(plugin, ''), coalesce(confirmed_flush_lsn::text, '0/0'), active_pid::text, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| PipelineError::SlotMissing { slot: slot.into() })?;
    let plugin = row.first().cloned().flatten().unwrap_or_default();
    if plugin != "pgoutput" {
        return Err(PipelineError::WrongPlugin {
            slot: slot.into(),
            plugin,
        });
    }
    let field = |i: usize| row.get(i).cloned().flatten();
    if field(3).as_deref() == Some("lost") {
        return Err(PipelineError::SlotInvalidated { slot: slot.into() });
    }
    let confirmed = field(1).and_then(|s| s.parse().ok()).unwrap_or_default();
    let active_pid = field(2).and_then(|s| s.parse().ok());
    Ok(Slot {
        confirmed,
        active_pid,
    })
}

/// Without a progress topic, a slot found past the position this process
/// confirmed was moved by someone the relay cannot tell apart from a hand
/// over unpublished events: stop. With one, the session judges the move
/// once it has read the record (`session::moved_by_us`).
fn refuse_moved_without_record(
    cfg: &RelayConfig,
    resume: Option<Lsn>,
    found: Lsn,
) -> Result<(), PipelineError> {
    match resume.filter(|_| cfg.progress_topic.is_none()) {
        Some(ours) if found > ours => Err(PipelineError::SlotMovedAhead {
            slot: cfg.slot.clone(),
            found,
            ours,
        }),
        _ => Ok(()),
    }
}

/// Whether the holder found on the second read is the one already ended
/// (its walsender may linger a moment after pg_terminate_backend):
/// START_REPLICATION then waits for it or fails as usual.
fn terminated_holder(first: &Slot, again: &Slot) -> bool {
    first.active_pid.is_some() && first.active_pid == again.active_pid
}

/// The publication must exist, publish inserts and cover every outbox
/// table: otherwise the stream is silently empty for a table and its events
/// would never arrive.
pub(super) async fn check_publication(
    conn: &mut ReplicationConnection,
    cfg: &RelayConfig,
) -> Result<(), PipelineError> {
    // A schema pattern stands for the tables that exist now; one created
    // later is added by setup's event trigger (and checked at the next
    // session).
    let names = crate::pipeline::tables::names(&cfg.tables);
    let tables = match crate::pg::catalog::pattern_schemas_sql(&names) {
        None => cfg.tables.clone(),
        Some(sql) => {
            let rows = conn.simple_query(&sql).await?;
            let found = crate::pg::catalog::pattern_rows(rows.into_iter().map(|mut r| {
                let schema = r.get_mut(1).and_then(Option::take);
                let index = r.get_mut(0).and_then(Option::take);
                (index, schema)
            }));
            crate::pipeline::tables::concrete(
                &cfg.tables,
                crate::pg::catalog::concrete_tables(&names, &found),
            )
        }
    };
    for t in &tables {
        match check_publication_of(conn, cfg, &t.table).await {
            // A table a pattern stands for, left out of the publication
            // (review N4): one tenant's table stops no other. The session
            // streams the rest, says which, and the watch counts it.
            Err(PipelineError::Publication(problem))
                if !cfg.tables.iter().any(|c| c.table == t.table) =>
            {
                tracing::warn!(table = %t.table, "{problem}. Rows written to it before it is added are never decoded: after adding it, publish them again from the table (operations §4)");
            }
            other => other?,
        }
    }
    Ok(())
}

/// Without setup's event trigger, a tenant table created from now on is not
/// in the publication, and its rows are never decoded: say so at once.
async fn warn_if_no_trigger(
    conn: &mut ReplicationConnection,
    cfg: &RelayConfig,
) -> Result<(), PipelineError> {
    use crate::pg::publish_trigger::{
        problem, state_sql, trigger_name, TriggerProblem, TriggerRow,
    };
    let rows = conn.simple_query(&state_sql(&cfg.publication)).await?;
    let row = rows
        .into_iter()
        .next()
        .map(|r| TriggerRow::from_fields(r.into_iter()));
    let problem = match problem(row, &cfg.patterns()) {
        None => return Ok(()),
        Some(TriggerProblem::Unsafe(why)) => {
            tracing::warn!(
                publication = %cfg.publication,
                trigger = %trigger_name(&cfg.publication),
                "the event trigger that adds new tables to the publication runs as a superuser on every CREATE TABLE, and {why}: that role could make it run anything as a superuser. Run `outbox-relay setup` as a superuser (it moves the function into schema outbox_relay), and see `outbox-relay check`"
            );
            return Ok(());
        }
        Some(TriggerProblem::Missing) => "missing".to_string(),
        Some(TriggerProblem::Disabled) => "disabled".to_string(),
        Some(TriggerProblem::Uncovered { missing, .. }) => {
            format!("installed without {}", missing.join(", "))
        }
    };
    tracing::warn!(
        publication = %cfg.publication,
        trigger = %trigger_name(&cfg.publication),
        "the event trigger that adds new tables of the schema patterns to the publication is {problem}: rows of such a table created from now on would never be published. Run `outbox-relay setup` as a superuser with this configuration"
    );
    Ok(())
}

async fn check_publication_of(
    conn: &mut ReplicationConnection,
    cfg: &RelayConfig,
    table: &crate::pipeline::route::router::TableName,
) -> Result<(), PipelineError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT p.pubinsert::text, EXISTS (SELECT 1 FROM pg_publication_tables t
                      WHERE t.pubname = p.pubname AND t.schemaname = {0} AND t.tablename = {1})::text,
                    (p.pubviaroot OR NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = {0} AND c.relname = {1} AND c.relkind = 'p'))::text
               FROM pg_publication p WHERE p.pubname = {2}",
            quote_literal(&table.schema),
            quote_literal(&table.name),
            quote_literal(&cfg.publication)
        ))
        .await?;
    let problem = match rows.first() {
        None => Some(format!(
            "publication {:?} does not exist: run `outbox-relay setup`",
            cfg.publication
        )),
        Some(row) if row.first().cloned().flatten().as_deref() != Some("true") => Some(format!(
            "publication {0:?} does not publish inserts: ALTER PUBLICATION {1} SET (publish = 'insert')",
            cfg.publication,
            quote_ident(&cfg.publication)
        )),
        Some(row) if row.get(2).cloned().flatten().as_deref() != Some("true") => Some(
            crate::pg::catalog::partitions_by_name(&cfg.publication, &table.to_string()),
        ),
        Some(row) if row.get(1).cloned().flatten().as_deref() != Some("true") => Some(format!(
            "publication {0:?} does not cover the outbox table {table}: ALTER PUBLICATION {1} ADD TABLE {2} (or run `outbox-relay setup`)",
            cfg.publication,
            quote_ident(&cfg.publication),
            table.quoted()
        )),
        Some(_) => None,
    };
    match problem {
        Some(p) => Err(PipelineError::Publication(p)),
        None => Ok(()),
    }
}

/// With --terminate-stale-walsender: ends the walsender holding the slot only
/// if its client has gone quiet, no status update for twice our status
/// interval (at least 5 s). A live relay reports at least that often, so two
/// relays started with the flag never terminate each other's walsenders (a
/// live holder makes this one a standby); a hung or half-open client that
/// the server has not timed out yet is ended.
///
/// Returns whether it terminated the walsender.
pub(super) async fn terminate_if_stale(
    conn: &mut ReplicationConnection,
    slot: &str,
    pid: i32,
    status_interval: Duration,
) -> Result<bool, PipelineError> {
    let quiet = (status_interval * 2).max(Duration::from_secs(5));
    let rows = conn
        .simple_query(&format!(
            "SELECT (coalesce(reply_time, backend_start) < now() - interval '{} milliseconds')::text
               FROM pg_stat_replication WHERE pid = {pid}",
            quiet.as_millis()
        ))
        .await?;
    let stale = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .is_none_or(|v| v == "true");
    if !stale {
        tracing::info!(
            slot = %slot,
            pid,
            "the walsender holding the slot has a live client (it reported within {}s): not terminating it; waiting as a standby",
            quiet.as_secs()
        );
        return Ok(false);
    }
    tracing::warn!(
        slot = %slot,
        pid,
        "terminating the walsender holding the slot: its client sent nothing for {}s (--terminate-stale-walsender)",
        quiet.as_secs()
    );
    conn.simple_query(&format!("SELECT pg_terminate_backend({pid})"))
        .await?;
    Ok(true)
}

/// On PostgreSQL 17+, a failover slot's walsender sends nothing until every
/// slot `synchronized_standby_slots` names has flushed it; a name with no
/// physical slot behind it (typically on a promoted standby that inherited
/// the setting) stalls the session without an error from the server. Say so
/// at the start of the session. Only a diagnosis: a failed query is ignored.
async fn warn_if_standby_slots_absent(conn: &mut ReplicationConnection, slot: &str) {
    let rows = match conn
        .simple_query(&format!(
            "SELECT s.failover::text, current_setting('synchronized_standby_slots'),
                    (SELECT coalesce(string_agg(slot_name::text, ','), '') FROM pg_replication_slots
                      WHERE slot_type = 'physical')
               FROM pg_replication_slots s WHERE s.slot_name = {}",
            quote_literal(slot)
        ))
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, "could not read synchronized_standby_slots");
            return;
        }
    };
    let Some(row) = rows.first() else { return };
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if field(0) != "true" {
        return;
    }
    let physical: Vec<String> = field(2)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let absent = crate::pg::standbys::absent_standby_slots(&field(1), &physical);
    if !absent.is_empty() {
        tracing::warn!(
            slot = %slot,
            absent = %absent.join(","),
            "synchronized_standby_slots names slots that do not exist on this server: the server sends this failover slot's changes only after they flush, so nothing will arrive; remove them (ALTER SYSTEM SET synchronized_standby_slots = …; SELECT pg_reload_conf()) or create them"
        );
    }
}

/// The error START_REPLICATION gives for a slot another connection holds
/// (SQLSTATE 55006, object in use), found before asking for it.
fn slot_in_use(slot: &str, pid: i32) -> PipelineError {
    PipelineError::Replication(ReplicationError::Server(
        crate::pipeline::source::ServerError {
            severity: "ERROR".into(),
            code: "55006".into(),
            message: format!("replication slot \"{slot}\" is active for PID {pid}"),
            detail: None,
            hint: None,
        },
    ))
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
    let mut conn = ReplicationConnection::connect(&params).await?;
    let set_up = async move {
        let system = conn.identify_system().await?;
        let history = server_history(&mut conn, system.timeline, system.xlogpos).await?;
        let slot = check_slot(&mut conn, &cfg.slot).await?;
        check_publication(&mut conn, cfg).await?;
        refuse_moved_without_record(cfg, resume, slot.confirmed)?;
        let status_interval = match conn
            .show("wal_sender_timeout")
            .await
            .ok()
            .as_deref()
            .and_then(parse_pg_duration)
        {
            Some(t) if !t.is_zero() => cfg.status_interval.min(t / 2),
            _ => cfg.status_interval,
        };
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
        if let Some(streaming) = &cfg.streaming {
            stream_buffer::prepare_spill_dir(&streaming.spill_dir.join(&cfg.slot))?;
        }
        // Before START_REPLICATION: a producer setting the relay refuses
        // stops it before the slot is touched.
        let (sink, acks) = producer(cfg, &system.system_id).await?;
        // Review N8: seconds may have passed since the slot was read (a
        // stale holder ended, the progress topic made), in which the holder
        // confirmed further. Sending that older position in the first status
        // update would move confirmed_flush_lsn back on PostgreSQL 17 and
        // older: read it again, right before taking it.
        let slot = match check_slot(&mut conn, &cfg.slot).await? {
            again if again.active_pid.is_some() && !terminated_holder(&slot, &again) => {
                return Err(slot_in_use(&cfg.slot, again.active_pid.unwrap_or_default()));
            }
            again => Slot {
                confirmed: again.confirmed.max(slot.confirmed),
                active_pid: None,
            },
        };
        refuse_moved_without_record(cfg, resume, slot.confirmed)?;
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
    };
    match cfg.replication_timeout {
        Some(limit) => tokio::time::timeout(limit, set_up)
            .await
            .map_err(|_| timed_out("setting up the replication session", limit))?,
        None => set_up.await,
    }
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
