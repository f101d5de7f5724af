//! The Postgres side of the preflight: wal_level, capacity (slots, senders,
//! WAL kept), the table, publication, slot and the role's privileges.

use tokio_postgres::Client;

use crate::config::RelayConfig;
use crate::pg::objects::{self, ObjectsError};
use crate::pipeline::route::router::RouterConfig;

use super::*;

pub(super) async fn postgres_checks(client: &Client, cfg: &RelayConfig) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let info = match client
        .query_one(
            "SELECT current_database()::text, current_user::text, current_setting('server_version'),
                    current_setting('server_version_num')::int",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.push(CheckResult::unknown("postgres connection", e));
            return out;
        }
    };
    let (database, user, version, version_num): (String, String, String, i32) =
        (info.get(0), info.get(1), info.get(2), info.get(3));
    out.push(CheckResult::pass(
        "postgres connection",
        format!("connected to database {database} as {user} (PostgreSQL {version})"),
    ));

    out.push(wal_level(client).await);

    // The slot first: whether it exists decides what the capacity checks need.
    let slot = slot_row(client, cfg).await;
    let (slot_exists, slot_active) = match &slot {
        Ok(Some(s)) => (true, s.active),
        _ => (false, false),
    };
    out.extend(capacity(client, slot_exists, slot_active).await);
    out.push(keep_size(client).await);

    // One line per table for what is per table: its columns, its place in
    // the publication, the role's right to read it.
    let tables = pattern_tables(client, cfg, &mut out).await;
    let mut tables_ok = Vec::with_capacity(tables.len());
    for mapping in &tables {
        let (line, ok) = outbox_table(client, mapping).await;
        out.push(line);
        tables_ok.push((&mapping.table, ok));
    }
    for mapping in &tables {
        out.push(publication(client, cfg, mapping, version_num).await);
    }
    if !cfg.patterns().is_empty() {
        out.push(publish_trigger(client, cfg).await);
    }
    out.push(match slot {
        Ok(s) => slot_check(cfg, &database, s),
        Err(e) => CheckResult::unknown("slot", e),
    });
    out.push(slot_headroom(client, cfg).await);
    out.extend(super::failover::failover_checks(client, cfg, version_num).await);
    out.extend(privileges(client, &user, &tables_ok).await);
    out
}

/// The tables to check: a schema pattern stands for the tables that exist
/// now (a line for a pattern nothing matches yet).
async fn pattern_tables(
    client: &Client,
    cfg: &RelayConfig,
    out: &mut Vec<CheckResult>,
) -> Vec<RouterConfig> {
    let tables = match crate::pipeline::tables::expand(client, &cfg.tables).await {
        Ok(t) => t,
        Err(e) => {
            out.push(CheckResult::unknown("outbox table", e));
            cfg.tables
                .iter()
                .filter(|t| !t.table.is_pattern())
                .cloned()
                .collect()
        }
    };
    let patterns = cfg
        .tables
        .iter()
        .map(|t| &t.table)
        .filter(|t| t.is_pattern());
    for p in patterns {
        if !tables
            .iter()
            .any(|t| p.matches(&t.table.schema, &t.table.name))
        {
            out.push(CheckResult::warn(
                "outbox table",
                format!("no table matches {p} yet: each one created is published from its first row (the event trigger adds it)"),
                None,
            ));
        }
    }
    tables
}

/// For schema patterns: setup's event trigger, without which a table
/// created later is never in the publication.
async fn publish_trigger(client: &Client, cfg: &RelayConfig) -> CheckResult {
    use crate::pg::publish_trigger::{
        problem, state_sql, trigger_name, TriggerProblem, TriggerRow,
    };
    const NAME: &str = "publication trigger";
    let trigger = trigger_name(&cfg.publication);
    let row = match client.simple_query(&state_sql(&cfg.publication)).await {
        Ok(messages) => messages.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(TriggerRow::from_fields(
                (0..r.len()).map(|i| r.get(i).map(String::from)),
            )),
            _ => None,
        }),
        Err(e) => return CheckResult::unknown(NAME, e),
    };
    match problem(row, &cfg.patterns()) {
        None => CheckResult::pass(
            NAME,
            format!("event trigger {trigger} adds each new table of the schema patterns to publication {}", cfg.publication),
        ),
        Some(TriggerProblem::Uncovered { installed, missing }) => CheckResult::fail(
            NAME,
            format!(
                "event trigger {trigger} was installed for {installed}, not for {}: the rows of a table of those created now would never be published",
                missing.join(", ")
            ),
            "run outbox-relay setup as a superuser with this configuration (it replaces the trigger)",
        ),
        Some(TriggerProblem::Unsafe(why)) => CheckResult::fail(
            NAME,
            format!(
                "event trigger {trigger} runs as a superuser on every CREATE TABLE, and {why}: that role could make it run anything as a superuser"
            ),
            "run outbox-relay setup as a superuser: it moves the function into schema outbox_relay (a superuser's alone) and drops the old one, or refuses naming the role to deal with first",
        ),
        Some(TriggerProblem::Disabled) => CheckResult::fail(
            NAME,
            format!("event trigger {trigger} is disabled: the rows of a table created now would never be published"),
            format!("ALTER EVENT TRIGGER {} ENABLE;", ident(&trigger)),
        ),
        Some(TriggerProblem::Missing) => CheckResult::fail(
            NAME,
            format!("event trigger {trigger} does not exist: the rows of a table of the schema patterns created now would never be published"),
            "run outbox-relay setup as a superuser (it installs the trigger)",
        ),
    }
}

/// The table exists with every column its mapping names; the bool says so.
async fn outbox_table(client: &Client, mapping: &RouterConfig) -> (CheckResult, bool) {
    match objects::check_table(client, &mapping.table, &mapping.referenced_columns()).await {
        Ok(()) => (
            CheckResult::pass(
                "outbox table",
                format!(
                    "{} has every configured column ({})",
                    mapping.table,
                    mapping.mapped_columns().join(", ")
                ),
            ),
            true,
        ),
        Err(e) => {
            let fix = match &e {
                ObjectsError::NoTable { .. } => format!(
                    "create {} (sql/01_outbox_classic.sql or sql/02_outbox_debezium.sql), or point --table at the outbox table",
                    mapping.table
                ),
                ObjectsError::NoColumn { option, .. } => format!(
                    "set {option} to one of the table's columns, or add the column"
                ),
                _ => "check --database-url and --table".to_string(),
            };
            (CheckResult::fail("outbox table", e.to_string(), fix), false)
        }
    }
}

pub(super) async fn wal_level(client: &Client) -> CheckResult {
    match client.query_one("SHOW wal_level", &[]).await {
        Ok(r) => {
            let level: String = r.get(0);
            if level == "logical" {
                CheckResult::pass("wal_level", "wal_level = logical")
            } else {
                CheckResult::fail(
                    "wal_level",
                    format!("wal_level = {level}, but logical replication needs logical"),
                    "ALTER SYSTEM SET wal_level = logical; then restart Postgres (a reload is not enough)",
                )
            }
        }
        Err(e) => CheckResult::unknown("wal_level", e),
    }
}

pub(super) async fn capacity(
    client: &Client,
    slot_exists: bool,
    slot_active: bool,
) -> Vec<CheckResult> {
    let row = match client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int,
                    (SELECT count(*)::int FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*)::int FROM pg_stat_replication)",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let detail = format!("could not check: {}", pg_error(&e));
            let fix = "run the check as the relay's role with read access to the pg_catalog views";
            return vec![
                CheckResult::fail("free slots", detail.clone(), fix),
                CheckResult::fail("free walsenders", detail, fix),
            ];
        }
    };
    let (max_slots, used_slots, max_senders, used_senders): (i32, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let free_slots = max_slots - used_slots;
    let free_senders = max_senders - used_senders;
    let slots = if slot_exists {
        CheckResult::pass(
            "free slots",
            format!("the relay's slot exists, so it needs none ({used_slots} of max_replication_slots = {max_slots} used)"),
        )
    } else if free_slots >= 1 {
        CheckResult::pass(
            "free slots",
            format!("{free_slots} free ({used_slots} of max_replication_slots = {max_slots} used); the relay needs 1"),
        )
    } else {
        CheckResult::fail(
            "free slots",
            format!("no free replication slot ({used_slots} of max_replication_slots = {max_slots} used); the relay needs 1"),
            format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart Postgres, or drop a slot nobody uses (SELECT slot_name FROM pg_replication_slots WHERE NOT active)",
                max_slots + 1
            ),
        )
    };
    let senders = if slot_active {
        CheckResult::pass(
            "free walsenders",
            format!("the relay's slot is already streaming, so a restart reuses its walsender ({used_senders} of max_wal_senders = {max_senders} used)"),
        )
    } else if free_senders >= 1 {
        CheckResult::pass(
            "free walsenders",
            format!("{free_senders} free ({used_senders} of max_wal_senders = {max_senders} used); the relay needs 1"),
        )
    } else {
        CheckResult::fail(
            "free walsenders",
            format!("no free walsender ({used_senders} of max_wal_senders = {max_senders} used); the relay needs 1"),
            format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart Postgres",
                max_senders + 1
            ),
        )
    };
    vec![slots, senders]
}

pub(super) async fn keep_size(client: &Client) -> CheckResult {
    const NAME: &str = "max_slot_wal_keep_size";
    match client
        .query_one(
            "SELECT setting::bigint, current_setting('max_slot_wal_keep_size')
               FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await
    {
        Ok(r) => {
            let mb: i64 = r.get(0);
            let shown: String = r.get(1);
            if mb < 0 {
                CheckResult::warn(
                    NAME,
                    "max_slot_wal_keep_size = -1 (unlimited): a stopped or stuck relay keeps WAL until the disk fills",
                    Some("ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf(); (no restart; pick a size well below the WAL volume's free space, and alert on the slot's retained WAL; see docs/operations.md)".into()),
                )
            } else {
                CheckResult::pass(
                    NAME,
                    format!("max_slot_wal_keep_size = {shown}: a slot retaining more is invalidated (its events must then be recovered by hand)"),
                )
            }
        }
        Err(e) => CheckResult::unknown(NAME, e),
    }
}

pub(super) async fn publication(
    client: &Client,
    cfg: &RelayConfig,
    mapping: &RouterConfig,
    version_num: i32,
) -> CheckResult {
    let checked = async {
        let all_tables = publication_flags(client, cfg, &mapping.table).await?;
        publication_columns(client, cfg, mapping, version_num).await?;
        let others = other_published_tables(client, cfg).await?;
        Ok(publication_verdict(
            cfg,
            &mapping.table,
            all_tables,
            &others,
        ))
    };
    match checked.await {
        Ok(r) | Err(r) => r,
    }
}

const PUBLICATION: &str = "publication";

/// The publication exists, publishes inserts and the partitions of a
/// partitioned outbox under the parent's name; returns whether it is FOR ALL
/// TABLES. An `Err` is the check's result.
async fn publication_flags(
    client: &Client,
    cfg: &RelayConfig,
    table: &TableName,
) -> Result<bool, CheckResult> {
    let name = &cfg.publication;
    let row = client
        .query_opt(
            "SELECT pubinsert, puballtables, pubviaroot OR NOT EXISTS (
                    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $2 AND c.relname = $3 AND c.relkind = 'p')
               FROM pg_publication WHERE pubname = $1",
            &[name, &table.schema, &table.name],
        )
        .await
        .map_err(|e| CheckResult::unknown(PUBLICATION, e))?;
    let Some(row) = row else {
        return Err(CheckResult::fail(
            PUBLICATION,
            format!("publication {name} does not exist"),
            format!(
                "outbox-relay setup (or CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert');)",
                ident(name),
                table_sql(table)
            ),
        ));
    };
    let (inserts, all_tables, by_root): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !by_root {
        return Err(CheckResult::fail(
            PUBLICATION,
            format!("publication {name} publishes the partitions of {table} under their own names"),
            crate::pg::catalog::partitions_by_name(name, &table.to_string()),
        ));
    }
    if !inserts {
        return Err(CheckResult::fail(
            PUBLICATION,
            format!("publication {name} does not publish inserts"),
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert');",
                ident(name)
            ),
        ));
    }
    Ok(all_tables)
}

/// The publication covers the outbox, and a column list (PostgreSQL 15+)
/// keeps every mapped column.
async fn publication_columns(
    client: &Client,
    cfg: &RelayConfig,
    mapping: &RouterConfig,
    version_num: i32,
) -> Result<(), CheckResult> {
    let name = &cfg.publication;
    let table = &mapping.table;
    let columns_sql = if version_num >= 150000 {
        "SELECT attnames::text[] FROM pg_publication_tables
          WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
    } else {
        "SELECT NULL::text[] FROM pg_publication_tables
          WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
    };
    let covered = client
        .query_opt(columns_sql, &[name, &table.schema, &table.name])
        .await
        .map_err(|e| CheckResult::unknown(PUBLICATION, e))?;
    let Some(covered) = covered else {
        let add = format!(
            "ALTER PUBLICATION {} ADD TABLE {};",
            ident(name),
            table_sql(table)
        );
        return Err(CheckResult::fail(
            PUBLICATION,
            format!("publication {name} does not include {table}"),
            format!("{add} (or run outbox-relay setup, which adds it)"),
        ));
    };
    let Some(published) = covered.get::<_, Option<Vec<String>>>(0) else {
        return Ok(());
    };
    let missing: Vec<String> = mapping
        .mapped_columns()
        .into_iter()
        .filter(|c| !published.contains(c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(CheckResult::fail(
        PUBLICATION,
        format!(
            "publication {name} publishes only some columns of {table}, not {}",
            missing.join(", ")
        ),
        format!(
            "ALTER PUBLICATION {} SET TABLE {};  (without a column list)",
            ident(name),
            table_sql(table)
        ),
    ))
}

/// The tables the publication covers besides the outbox tables. Not an
/// error (the relay skips their rows), but they cost decoding and an
/// operator should know the relay sees them.
async fn other_published_tables(
    client: &Client,
    cfg: &RelayConfig,
) -> Result<Vec<String>, CheckResult> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables
              WHERE pubname = $1 ORDER BY 1, 2",
            &[&cfg.publication],
        )
        .await
        .map_err(|e| CheckResult::unknown(PUBLICATION, e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(schema, name)| !cfg.tables.iter().any(|t| t.table.matches(schema, name)))
        .map(|(schema, name)| format!("{schema}.{name}"))
        .collect())
}

fn publication_verdict(
    cfg: &RelayConfig,
    table: &TableName,
    all_tables: bool,
    others: &[String],
) -> CheckResult {
    let name = &cfg.publication;
    let scope = if all_tables {
        format!("is FOR ALL TABLES (so covers {table})")
    } else {
        format!("covers {table}")
    };
    if others.is_empty() {
        return CheckResult::pass(
            PUBLICATION,
            format!("publication {name} {scope} and publishes inserts"),
        );
    }
    const SHOWN: usize = 5;
    let mut listed = others
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if others.len() > SHOWN {
        listed.push_str(&format!(" and {} more", others.len() - SHOWN));
    }
    CheckResult::warn(
        PUBLICATION,
        format!(
            "publication {name} {scope} and publishes inserts, and it also covers {} other table(s): {listed}. The relay decodes their rows and skips them (counted in outbox_skipped_rows_total); they are never published",
            others.len()
        ),
        Some(format!(
            "to save that decoding, give the relay a publication of its own: CREATE PUBLICATION outbox_relay_pub FOR TABLE {} WITH (publish = 'insert'); and --publication outbox_relay_pub",
            cfg.tables
                .iter()
                .map(|t| table_sql(&t.table))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    )
}

pub(super) struct SlotRow {
    kind: String,
    plugin: Option<String>,
    database: Option<String>,
    active: bool,
    active_pid: Option<i32>,
    wal_status: Option<String>,
    confirmed: Option<String>,
}

/// How long until the server invalidates the slot (issue 25): FAIL when it
/// is or is about to be, WARN under an hour at the WAL rate of the last
/// second.
async fn slot_headroom(client: &Client, cfg: &RelayConfig) -> CheckResult {
    use crate::pg::slot_headroom::{humanize, wal_rate, Headroom};
    const NAME: &str = "slot headroom";
    let h = match Headroom::read(client, &cfg.slot).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            return CheckResult::warn(NAME, "no slot to look at", None);
        }
        Err(e) => return CheckResult::unknown(NAME, e),
    };
    let slot = &cfg.slot;
    if h.lost() {
        return CheckResult::fail(
            NAME,
            format!(
                "replication slot {slot} was invalidated ({}): the WAL after its position is gone, and with it the events written since",
                h.invalidation_reason.as_deref().unwrap_or("wal_status lost")
            ),
            "see operations §13, The slot is lost: recreate it and republish what the outbox table still holds",
        );
    }
    if h.wal_status.as_deref() == Some("unreserved") {
        return CheckResult::fail(
            NAME,
            format!("replication slot {slot} holds more WAL than max_slot_wal_keep_size allows (wal_status unreserved): the next checkpoint invalidates it"),
            "get the relay confirming now (outbox-relay status, its log), or raise max_slot_wal_keep_size at once",
        );
    }
    let rate = if h.safe_wal_size.is_some() {
        match wal_rate(client, std::time::Duration::from_secs(1)).await {
            Ok(r) => r,
            Err(e) => return CheckResult::unknown(NAME, e),
        }
    } else {
        None
    };
    match h.time_left(rate) {
        None if h.safe_wal_size.is_none() => CheckResult::pass(
            NAME,
            "max_slot_wal_keep_size = -1: the server never invalidates the slot for the WAL it holds (the disk is the limit: alert on retained WAL)",
        ),
        None => CheckResult::pass(
            NAME,
            format!(
                "{} bytes of WAL before max_slot_wal_keep_size invalidates the slot; no WAL written in the last second",
                h.safe_wal_size.unwrap_or_default()
            ),
        ),
        Some(t) if t.left < std::time::Duration::from_secs(3600) => CheckResult::warn(
            NAME,
            format!(
                "{t_by} invalidates replication slot {slot} in about {} at the WAL rate of the last second",
                humanize(t.left),
                t_by = t.by
            ),
            Some(format!(
                "start the relay or find what holds it back (outbox-relay status), or raise {}",
                t.by
            )),
        ),
        Some(t) => CheckResult::pass(
            NAME,
            format!(
                "{} invalidates the slot in about {} at the WAL rate of the last second",
                t.by,
                humanize(t.left)
            ),
        ),
    }
}

pub(super) async fn slot_row(
    client: &Client,
    cfg: &RelayConfig,
) -> Result<Option<SlotRow>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT slot_type, plugin::text, database::text, active, active_pid, wal_status,
                    confirmed_flush_lsn::text
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await?
        .map(|r| SlotRow {
            kind: r.get(0),
            plugin: r.get(1),
            database: r.get(2),
            active: r.get(3),
            active_pid: r.get(4),
            wal_status: r.get(5),
            confirmed: r.get(6),
        }))
}

pub(super) fn slot_check(cfg: &RelayConfig, database: &str, slot: Option<SlotRow>) -> CheckResult {
    const NAME: &str = "slot";
    let name = &cfg.slot;
    let Some(s) = slot else {
        return CheckResult::fail(
            NAME,
            format!("replication slot {name} does not exist"),
            format!("outbox-relay setup (or SELECT pg_create_logical_replication_slot('{name}', 'pgoutput');); events committed before it exists are never published"),
        );
    };
    if s.kind != "logical" {
        return CheckResult::fail(
            NAME,
            format!("replication slot {name} is {}, not logical", s.kind),
            "choose another --slot",
        );
    }
    if s.plugin.as_deref() != Some("pgoutput") {
        return CheckResult::fail(
            NAME,
            format!(
                "replication slot {name} uses plugin {}, not pgoutput",
                s.plugin.as_deref().unwrap_or("-")
            ),
            format!(
                "choose another --slot, or drop it: SELECT pg_drop_replication_slot('{name}');"
            ),
        );
    }
    if s.database.as_deref() != Some(database) {
        return CheckResult::fail(
            NAME,
            format!(
                "replication slot {name} belongs to database {}, not {database}",
                s.database.as_deref().unwrap_or("-")
            ),
            "choose another --slot, or put the slot's database in --database-url",
        );
    }
    if s.wal_status.as_deref() == Some("lost") {
        return CheckResult::fail(
            NAME,
            format!("replication slot {name} is lost: the WAL it needed was removed (max_slot_wal_keep_size)"),
            format!("SELECT pg_drop_replication_slot('{name}'); then outbox-relay setup, and republish by hand what was committed after {}", s.confirmed.as_deref().unwrap_or("its confirmed position")),
        );
    }
    let confirmed = s.confirmed.as_deref().unwrap_or("-");
    if s.active {
        return CheckResult::warn(
            NAME,
            format!(
                "replication slot {name} (pgoutput, confirmed up to {confirmed}) is in use by PID {}: another relay would wait for it",
                s.active_pid.map_or("-".to_string(), |p| p.to_string())
            ),
            None,
        );
    }
    CheckResult::pass(
        NAME,
        format!(
            "replication slot {name} exists (pgoutput, confirmed up to {confirmed}, wal_status {})",
            s.wal_status.as_deref().unwrap_or("-")
        ),
    )
}

/// The role's REPLICATION, then its right to read each table (`tables`:
/// each with whether it exists with its columns).
pub(super) async fn privileges(
    client: &Client,
    user: &str,
    tables: &[(&TableName, bool)],
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let role = client
        .query_one(
            "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await;
    let superuser = match role {
        Ok(r) => {
            let (superuser, replication): (bool, bool) = (r.get(0), r.get(1));
            out.push(if superuser {
                CheckResult::pass(
                    "replication privilege",
                    format!("role {user} is a superuser"),
                )
            } else if replication {
                CheckResult::pass(
                    "replication privilege",
                    format!("role {user} has REPLICATION"),
                )
            } else {
                CheckResult::fail(
                    "replication privilege",
                    format!("role {user} has neither REPLICATION nor superuser, so it cannot stream from a slot"),
                    format!("ALTER ROLE {} REPLICATION;  (as a superuser)", ident(user)),
                )
            });
            superuser
        }
        Err(e) => {
            out.push(CheckResult::unknown("replication privilege", e));
            false
        }
    };
    for (table, exists) in tables {
        out.push(table_privilege(client, user, superuser, table, *exists).await);
    }
    out
}

async fn table_privilege(
    client: &Client,
    user: &str,
    superuser: bool,
    table: &TableName,
    table_exists: bool,
) -> CheckResult {
    if !table_exists {
        return CheckResult::warn(
            "table privilege",
            format!("not checked, because {table} does not exist or lacks a column"),
            None,
        );
    }
    if superuser {
        return CheckResult::pass(
            "table privilege",
            format!("role {user} is a superuser, so it can read {table}"),
        );
    }
    let privs = client
        .query_one(
            "SELECT has_schema_privilege($1, 'USAGE'), has_table_privilege($2, 'SELECT')",
            &[&table.schema, &table.quoted()],
        )
        .await;
    match privs {
        Ok(r) => {
            let (usage, select): (bool, bool) = (r.get(0), r.get(1));
            if usage && select {
                CheckResult::pass(
                    "table privilege",
                    format!("role {user} may SELECT from {table}"),
                )
            } else {
                let mut missing = Vec::new();
                let mut fix = Vec::new();
                if !usage {
                    missing.push(format!("USAGE on schema {}", table.schema));
                    fix.push(format!(
                        "GRANT USAGE ON SCHEMA {} TO {};",
                        ident(&table.schema),
                        ident(user)
                    ));
                }
                if !select {
                    missing.push(format!("SELECT on {table}"));
                    fix.push(format!(
                        "GRANT SELECT ON {} TO {};",
                        table_sql(table),
                        ident(user)
                    ));
                }
                CheckResult::fail(
                    "table privilege",
                    format!("role {user} lacks {}", missing.join(" and ")),
                    fix.join(" "),
                )
            }
        }
        Err(e) => CheckResult::unknown("table privilege", e),
    }
}
