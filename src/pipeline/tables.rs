//! The configured outbox tables as they exist now: a section naming a
//! schema pattern stands for one route config per table the pattern
//! matches. `pg::catalog` finds the tables (Postgres names); this turns them
//! into the pipeline's route configs.

use crate::pg::catalog;
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
