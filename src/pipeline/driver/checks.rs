//! What a session checks before it streams: the slot (there, free, not
//! moved past this process's position without a record), the publication
//! (its tables, their columns, the trigger for schema patterns), a stale
//! walsender holding the slot, the standby slots of failover slots.

use std::time::Duration;

use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::source::{quote_literal, ReplicationConnection, ReplicationError};

use super::errors::PipelineError;

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
pub(super) fn refuse_moved_without_record(
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
pub(super) fn terminated_holder(first: &Slot, again: &Slot) -> bool {
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
pub(super) async fn warn_if_no_trigger(
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
pub(super) async fn warn_if_standby_slots_absent(conn: &mut ReplicationConnection, slot: &str) {
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
pub(super) fn slot_in_use(slot: &str, pid: i32) -> PipelineError {
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
