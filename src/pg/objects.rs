//! The Postgres objects the relay needs, checked and made alike by `setup`,
//! `backfill` and `check`: `wal_level`, the outbox table and its columns,
//! the publication over it, and for schema patterns the event trigger that
//! publishes each new table. Postgres names in, lines that say what was
//! found or done out; no pipeline types.

use tokio_postgres::Client;

use super::catalog::partitions_by_name;
use super::quote_ident;
use super::sql::sql;
use super::table_name::TableName;

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error(transparent)]
    Sql(#[from] super::sql::SqlError),
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
    #[error("installing the event trigger that publishes the new tables of {patterns} failed: {error}. Creating an event trigger needs a superuser: run `outbox-relay setup` once as one (the relay itself needs no more than before), or publish every table yourself (CREATE PUBLICATION … FOR ALL TABLES) and accept that the relay decodes them all")]
    Trigger { patterns: String, error: String },
    #[error("the event trigger's schema {schema} is not a superuser's alone ({found}): such a role could change the function a superuser's event trigger runs on every CREATE TABLE, and so act as a superuser. Nothing was installed. Look at what it holds, then as a superuser drop it (DROP SCHEMA {schema} CASCADE) or make it a superuser's (ALTER SCHEMA {schema} OWNER TO postgres; ALTER FUNCTION … OWNER TO postgres; REVOKE CREATE ON SCHEMA {schema} FROM …), and run setup again")]
    TriggerOwner { schema: &'static str, found: String },
}

/// Logical decoding needs `wal_level = logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), ObjectsError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(ObjectsError::WalLevel(wal_level));
    }
    Ok(())
}

/// Checks the table and the columns a mapping names (`wanted`: each column
/// with the option that set it) exist.
pub async fn check_table(
    client: &Client,
    table: &TableName,
    wanted: &[(String, &'static str)],
) -> Result<(), ObjectsError> {
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
        return Err(ObjectsError::NoTable {
            table: table.to_string(),
            database,
        });
    }
    let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for (column, option) in wanted {
        if !columns.contains(column) {
            return Err(ObjectsError::NoColumn {
                table: table.to_string(),
                column: column.clone(),
                option,
                existing: columns.join(", "),
            });
        }
    }
    Ok(())
}

/// For schema patterns (`tenant_*.outbox`): the publication exists even
/// before any tenant table does (with publish_via_partition_root, so that a
/// partitioned tenant outbox is published under its own name), and the event
/// trigger adds each new table a pattern stands for in the transaction that
/// creates it (`pg::publish_trigger` says why). Returns what it did.
pub async fn ensure_pattern_publication(
    client: &Client,
    publication: &str,
    sections: &[(&TableName, Vec<String>)],
) -> Result<Vec<String>, ObjectsError> {
    let patterns: &[&TableName] = &sections.iter().map(|(t, _)| *t).collect::<Vec<_>>();
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
        return Err(ObjectsError::PartitionsByName(partitions_by_name(
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
        super::publish_trigger::trigger_name(publication),
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
    with_columns: &[(&TableName, Vec<String>)],
) -> Result<(), ObjectsError> {
    let patterns: &[&TableName] = &with_columns.iter().map(|(t, _)| *t).collect::<Vec<_>>();
    use super::publish_trigger::{install_sql, owners_sql, schema_sql, trigger_name, SCHEMA};
    let failed = |e: tokio_postgres::Error| ObjectsError::Trigger {
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
            return Err(ObjectsError::TriggerOwner {
                schema: SCHEMA,
                found,
            });
        }
        client
            .batch_execute(&format!(
                "{} COMMIT;",
                install_sql(publication, with_columns)
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

pub async fn ensure_published(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<String, ObjectsError> {
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
        return Err(ObjectsError::NoInserts(publication.clone()));
    }
    if partitioned && !row.get::<_, bool>(1) {
        return Err(ObjectsError::PartitionsByName(partitions_by_name(
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
