//! `outbox-relay setup`: creates the publication and the slot if missing.
//!
//! Idempotent, over an ordinary SQL connection. It checks what the relay
//! needs (wal_level, the table and every configured column) and reports each
//! thing it found or did, so that a DBA can see exactly what changed.

use tokio_postgres::Client;

use crate::config::RelayConfig;
use crate::pg::catalog::partitions_by_name;
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::{RouterConfig, TableName};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("wal_level is {0:?} but logical replication needs 'logical': set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart Postgres")]
    WalLevel(String),
    #[error("table {table} does not exist in database {database}; create it (see sql/ in the outbox-relay repository) or set --table")]
    NoTable { table: String, database: String },
    #[error("table {table} has no column {column} (set by {option}); its columns are: {existing}")]
    NoColumn {
        table: String,
        column: String,
        option: &'static str,
        existing: String,
    },
    #[error("publication {0} exists but does not publish inserts: run ALTER PUBLICATION {0} SET (publish = 'insert')")]
    NoInserts(String),
    #[error("{0}")]
    PartitionsByName(String),
    #[error("replication slot {slot} exists but uses plugin {plugin:?}; the relay needs pgoutput: drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another --slot")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot {slot} belongs to database {other:?}, not {ours:?}: choose another --slot")]
    WrongDatabase {
        slot: String,
        other: String,
        ours: String,
    },
    #[error("replication slot {slot} is physical; the relay needs a logical slot: choose another --slot")]
    PhysicalSlot { slot: String },
    #[error("--failover needs PostgreSQL 17 or later, which copies failover slots to a physical standby (sync_replication_slots); this server is {version}. Without it a promoted standby has no slot: after a failover run `outbox-relay backfill` on the new primary, or upgrade")]
    FailoverUnsupported { version: String },
    #[error("installing the event trigger that publishes the new tables of {patterns} failed: {error}. Creating an event trigger needs a superuser: run `outbox-relay setup` once as one (the relay itself needs no more than before), or publish every table yourself (CREATE PUBLICATION … FOR ALL TABLES) and accept that the relay decodes them all")]
    Trigger { patterns: String, error: String },
    #[error("the event trigger's schema {schema} is not a superuser's alone ({found}): such a role could change the function a superuser's event trigger runs on every CREATE TABLE, and so act as a superuser. Nothing was installed. Look at what it holds, then as a superuser drop it (DROP SCHEMA {schema} CASCADE) or make it a superuser's (ALTER SCHEMA {schema} OWNER TO postgres; ALTER FUNCTION … OWNER TO postgres; REVOKE CREATE ON SCHEMA {schema} FROM …), and run setup again")]
    TriggerOwner { schema: &'static str, found: String },
    #[error("replication slot {slot} exists without failover, and --failover asks for it: a standby will not keep a copy. Recreate it while no relay runs and nothing is pending (SELECT pg_drop_replication_slot('{slot}'), then setup --failover), or over a replication connection: ALTER_REPLICATION_SLOT {slot} (FAILOVER true)")]
    NotFailover { slot: String },
}

/// How `setup` creates the slot.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotKind {
    /// `failover = true` (PostgreSQL 17+): synchronised to physical standbys.
    pub failover: bool,
}

/// Opens an ordinary SQL connection (the relay's own, not replication),
/// with the configured TLS.
pub async fn connect(cfg: &RelayConfig) -> Result<Client, SetupError> {
    Ok(crate::pg::sql::connect(&cfg.database).await?.0)
}

/// Logical decoding needs `wal_level = logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SetupError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel(wal_level));
    }
    Ok(())
}

/// Checks the table and its configured columns exist.
pub async fn check_table(client: &Client, mapping: &RouterConfig) -> Result<(), SetupError> {
    let table = &mapping.table;
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(sql("reading the database name"))?
        .get(0);
    let rows = client
        .query(
            "SELECT a.attname FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql(format!("reading the columns of {table}")))?;
    if rows.is_empty() {
        return Err(SetupError::NoTable {
            table: table.to_string(),
            database,
        });
    }
    let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for (column, option) in mapping.referenced_columns() {
        if !columns.contains(&column) {
            return Err(SetupError::NoColumn {
                table: table.to_string(),
                column,
                option,
                existing: columns.join(", "),
            });
        }
    }
    Ok(())
}

/// Creates the publication over the outbox tables, or adds a missing table
/// to an existing one; refuses one that does not publish inserts. Returns
/// the lines that say what it found or did, one per table. Shared by
/// `setup` and `backfill`.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[RouterConfig],
) -> Result<Vec<String>, SetupError> {
    let mut lines = Vec::with_capacity(tables.len());
    for t in tables {
        lines.push(ensure_published(client, publication, &t.table).await?);
    }
    Ok(lines)
}

/// Every table in the publication: `tables` (the configuration's, a
/// pattern's as they exist now) added, and for schema patterns the event
/// trigger that adds the ones to come. Shared by `setup` and `backfill`.
pub async fn publish_tables(
    client: &Client,
    cfg: &RelayConfig,
    tables: &[RouterConfig],
) -> Result<Vec<String>, SetupError> {
    let mut report = Vec::new();
    let patterns = cfg.patterns();
    // The trigger first, then the tables as they exist once it is in place:
    // a table created in between is added by one or the other.
    if !patterns.is_empty() {
        let sections: Vec<&RouterConfig> =
            cfg.tables.iter().filter(|t| t.table.is_pattern()).collect();
        report.extend(ensure_pattern_publication(client, &cfg.publication, &sections).await?);
    }
    let now = crate::pipeline::tables::expand(client, &cfg.tables)
        .await
        .map_err(sql("finding the tables of the schema patterns"))?;
    let tables: Vec<RouterConfig> = tables
        .iter()
        .chain(
            now.iter()
                .filter(|t| !tables.iter().any(|k| k.table == t.table)),
        )
        .cloned()
        .collect();
    for p in &patterns {
        if !tables
            .iter()
            .any(|t| p.matches(&t.table.schema, &t.table.name))
        {
            report.push(format!("no table matches {p} yet"));
        }
    }
    report.extend(ensure_publication(client, &cfg.publication, &tables).await?);
    Ok(report)
}

/// For schema patterns (`tenant_*.outbox`): the publication exists even
/// before any tenant table does (with publish_via_partition_root, so that a
/// partitioned tenant outbox is published under its own name), and the event
/// trigger adds each new table a pattern stands for in the transaction that
/// creates it (`pg::publish_trigger` says why). Returns what it did.
pub async fn ensure_pattern_publication(
    client: &Client,
    publication: &str,
    sections: &[&RouterConfig],
) -> Result<Vec<String>, SetupError> {
    let patterns: &[&TableName] = &sections.iter().map(|s| &s.table).collect::<Vec<_>>();
    let mut lines = Vec::new();
    let via_root: Option<bool> = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql("reading pg_publication"))?
        .map(|r| r.get(0));
    // A tenant's outbox may be partitioned: without via-root its rows would
    // arrive under the partitions' names, which no pattern matches.
    if via_root == Some(false) {
        return Err(SetupError::PartitionsByName(partitions_by_name(
            publication,
            &names(patterns),
        )));
    }
    if via_root.is_none() {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} WITH (publish = 'insert', publish_via_partition_root = true)",
                quote_ident(publication)
            ))
            .await
            .map_err(sql(format!("creating publication {publication}")))?;
        lines.push(format!(
            "created publication {publication} (publish = 'insert', publish_via_partition_root = true), for the tables of {} to come",
            names(patterns)
        ));
    }
    install_trigger(client, publication, sections).await?;
    lines.push(format!(
        "event trigger {} adds each new table of {} to publication {publication} as it is created",
        crate::pg::publish_trigger::trigger_name(publication),
        names(patterns)
    ));
    Ok(lines)
}

/// Installs the trigger in one transaction: the relay's schema made sure
/// of first, and nothing installed if a role that is not a superuser owns
/// it, its function, or may create in it (`pg::publish_trigger` says why).
async fn install_trigger(
    client: &Client,
    publication: &str,
    sections: &[&RouterConfig],
) -> Result<(), SetupError> {
    let patterns: &[&TableName] = &sections.iter().map(|s| &s.table).collect::<Vec<_>>();
    // Each pattern with the columns its section maps: the trigger publishes
    // only a table that has them all.
    let with_columns: Vec<(&TableName, Vec<String>)> = sections
        .iter()
        .map(|s| (&s.table, s.mapped_columns()))
        .collect();
    use crate::pg::publish_trigger::{install_sql, owners_sql, schema_sql, trigger_name, SCHEMA};
    let failed = |e: tokio_postgres::Error| SetupError::Trigger {
        patterns: names(patterns),
        error: e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string()),
    };
    let attempt = async {
        client
            .batch_execute(&format!("BEGIN; {}", schema_sql()))
            .await
            .map_err(failed)?;
        let owned = client
            .query(&owners_sql(), &[&trigger_name(publication)])
            .await
            .map_err(failed)?;
        if !owned.is_empty() {
            let found = owned
                .iter()
                .map(|r| format!("{} by {}", r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(SetupError::TriggerOwner {
                schema: SCHEMA,
                found,
            });
        }
        client
            .batch_execute(&format!(
                "{} COMMIT;",
                install_sql(publication, &with_columns)
            ))
            .await
            .map_err(failed)
    };
    let result = attempt.await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

fn names(patterns: &[&TableName]) -> String {
    patterns
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn ensure_published(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<String, SetupError> {
    let publication = &publication.to_string();
    // A partitioned outbox (the usual way to make cleanup cheap) is published
    // under its own name only with publish_via_partition_root: otherwise
    // every row arrives under its partition's name.
    let partitioned = client
        .query_opt(
            "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql("reading pg_class"))?
        .is_some_and(|r| r.get::<_, bool>(0));
    let pub_row = client
        .query_opt(
            "SELECT pubinsert, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(sql("reading pg_publication"))?;
    let Some(row) = pub_row else {
        let via_root = if partitioned {
            ", publish_via_partition_root = true"
        } else {
            ""
        };
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert'{via_root})",
                quote_ident(publication),
                table.quoted()
            ))
            .await
            .map_err(sql(format!("creating publication {publication}")))?;
        return Ok(format!(
            "created publication {publication} for table {table} (publish = 'insert'{via_root})"
        ));
    };
    if !row.get::<_, bool>(0) {
        return Err(SetupError::NoInserts(publication.clone()));
    }
    if partitioned && !row.get::<_, bool>(1) {
        return Err(SetupError::PartitionsByName(partitions_by_name(
            publication,
            &table.to_string(),
        )));
    }
    let covered = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[publication, &table.schema, &table.name],
        )
        .await
        .map_err(sql("reading pg_publication_tables"))?
        .is_some();
    if covered {
        return Ok(format!(
            "publication {publication} exists and covers {table}"
        ));
    }
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            table.quoted()
        ))
        .await
        .map_err(sql(format!("adding {table} to publication {publication}")))?;
    Ok(format!(
        "added table {table} to existing publication {publication}"
    ))
}

/// Runs the setup and returns the lines that explain what it did.
pub async fn run(cfg: &RelayConfig, kind: SlotKind) -> Result<Vec<String>, SetupError> {
    let client = connect(cfg).await?;
    let mut report = Vec::new();

    check_wal_level(&client).await?;
    report.push("wal_level is logical".to_string());

    let tables = crate::pipeline::tables::expand(&client, &cfg.tables)
        .await
        .map_err(sql("finding the tables of the schema patterns"))?;
    for t in &tables {
        check_table(&client, t).await?;
        report.push(format!("table {} has every configured column", t.table));
    }
    report.extend(publish_tables(&client, cfg, &tables).await?);

    let slot = &cfg.slot;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql("reading server_version_num"))?
        .get(0);
    if kind.failover && version < 170000 {
        let v: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(sql("reading server_version"))?
            .get(0);
        return Err(SetupError::FailoverUnsupported { version: v });
    }
    // The failover column exists from PostgreSQL 17.
    let failover_col = if version >= 170000 {
        "failover::text"
    } else {
        "'false'"
    };
    let slot_row = client
        .query_opt(
            &format!(
                "SELECT slot_type, coalesce(plugin, ''), coalesce(database, ''), current_database(),
                        coalesce(confirmed_flush_lsn::text, ''), {failover_col}
                   FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?;
    match slot_row {
        None => {
            let create = if kind.failover {
                // (name, plugin, temporary, two_phase, failover)
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
            } else {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
            };
            let row = client
                .query_one(create, &[slot])
                .await
                .map_err(sql(format!("creating replication slot {slot}")))?;
            let lsn: String = row.get(0);
            report.push(format!(
                "created logical replication slot {slot} (pgoutput{}) at {lsn}: events committed from now on will be published",
                if kind.failover { ", failover" } else { "" }
            ));
        }
        Some(row) => {
            let (slot_type, plugin, db, ours, lsn, failover): (
                String,
                String,
                String,
                String,
                String,
                String,
            ) = (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
            );
            if slot_type != "logical" {
                return Err(SetupError::PhysicalSlot { slot: slot.clone() });
            }
            if plugin != "pgoutput" {
                return Err(SetupError::WrongPlugin {
                    slot: slot.clone(),
                    plugin,
                });
            }
            if db != ours {
                return Err(SetupError::WrongDatabase {
                    slot: slot.clone(),
                    other: db,
                    ours,
                });
            }
            let failover = failover == "true";
            if kind.failover && !failover {
                return Err(SetupError::NotFailover { slot: slot.clone() });
            }
            report.push(format!(
                "replication slot {slot} exists (pgoutput{}), confirmed up to {lsn}",
                if failover { ", failover" } else { "" }
            ));
        }
    }
    Ok(report)
}
