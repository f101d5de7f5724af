//! The configured outbox tables as they exist now: a section naming a
//! schema pattern stands for one route config per table the pattern
//! matches. `pg::catalog` finds the tables (Postgres names); this turns them
//! into the pipeline's route configs.

use crate::pg::catalog;
use crate::pg::objects::{self, ObjectsError};
use crate::pg::sql::sql;
use crate::pg::table_name::TableName;
use crate::pipeline::route::router::RouterConfig;

/// The sections' table names, in order.
pub fn names(sections: &[RouterConfig]) -> Vec<TableName> {
    sections.iter().map(|s| s.table.clone()).collect()
}

/// Each found table with the mapping of the section it came from.
pub fn concrete(sections: &[RouterConfig], found: Vec<(usize, TableName)>) -> Vec<RouterConfig> {
    found
        .into_iter()
        .filter_map(|(i, table)| {
            Some(RouterConfig {
                table,
                ..sections.get(i)?.clone()
            })
        })
        .collect()
}

/// The sections as they exist now, over an ordinary SQL connection.
pub async fn expand(
    client: &tokio_postgres::Client,
    sections: &[RouterConfig],
) -> Result<Vec<RouterConfig>, tokio_postgres::Error> {
    let found = catalog::expand_tables(client, &names(sections)).await?;
    Ok(concrete(sections, found))
}

/// Every table in `publication`: `tables` (the sections', a pattern's as
/// they exist now) added, and for the schema patterns among `sections` the
/// event trigger that adds the ones to come. Returns what it found or did,
/// a line each. Shared by `setup` and `backfill`.
pub async fn publish(
    client: &tokio_postgres::Client,
    publication: &str,
    sections: &[RouterConfig],
    tables: &[RouterConfig],
) -> Result<Vec<String>, ObjectsError> {
    let mut report = Vec::new();
    let patterns: Vec<&RouterConfig> = sections.iter().filter(|t| t.table.is_pattern()).collect();
    // The trigger first, then the tables as they exist once it is in place:
    // a table created in between is added by one or the other.
    if !patterns.is_empty() {
        // Each pattern with the columns its section maps: the trigger
        // publishes only a table that has them all.
        let with_columns: Vec<(&TableName, Vec<String>)> = patterns
            .iter()
            .map(|s| (&s.table, s.mapped_columns()))
            .collect();
        report
            .extend(objects::ensure_pattern_publication(client, publication, &with_columns).await?);
    }
    let now = expand(client, sections)
        .await
        .map_err(sql("finding the tables of the schema patterns"))?;
    let tables: Vec<&RouterConfig> = tables
        .iter()
        .chain(
            now.iter()
                .filter(|t| !tables.iter().any(|k| k.table == t.table)),
        )
        .collect();
    for p in &patterns {
        if !tables
            .iter()
            .any(|t| p.table.matches(&t.table.schema, &t.table.name))
        {
            report.push(format!("no table matches {} yet", p.table));
        }
    }
    for t in tables {
        report.push(objects::ensure_published(client, publication, &t.table).await?);
    }
    Ok(report)
}
