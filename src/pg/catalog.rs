//! What the catalog says that several callers must say alike: the session
//! set-up, `setup` and `check` describe a publication's problems in the
//! same words.

use super::quote_ident;
use super::table_name::TableName;

/// Why a publication without publish_via_partition_root cannot serve a
/// partitioned outbox table, and the fix.
pub fn partitions_by_name(publication: &str, table: &str) -> String {
    format!(
        "publication {publication} publishes the partitioned table {table} under its partitions' names (publish_via_partition_root is off), so the relay would not recognise its rows: ALTER PUBLICATION {} SET (publish_via_partition_root = true); (its other subscribers then see {table}'s name too), or give the relay a publication of its own (outbox-relay setup --publication NAME creates one)",
        quote_ident(publication)
    )
}

/// One simple query (no parameters, so the replication connection can run
/// it too) that lists, for each schema pattern among `tables`, the schemas
/// in which its table exists: `(index into tables, schema)` rows, ordinary or
/// partitioned tables, not partitions (their rows arrive under the root's
/// name). None when no table is a pattern.
pub fn pattern_schemas_sql(tables: &[TableName]) -> Option<String> {
    let selects: Vec<String> = tables
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_pattern())
        .map(|(i, t)| {
            format!(
                "SELECT {i}::text, n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relname = {} AND n.nspname LIKE {} AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
                crate::pg::quote_literal(&t.name),
                crate::pg::quote_literal(&t.schema_like())
            )
        })
        .collect();
    if selects.is_empty() {
        return None;
    }
    Some(format!("{} ORDER BY 1, 2", selects.join(" UNION ALL ")))
}

/// The tables as they exist now: each schema pattern replaced by each table
/// it matches (`found`: the rows of [`pattern_schemas_sql`]), in
/// configuration order, with the index of the name it came from. A table
/// that an earlier name already covers is left to that one, as the router
/// does.
pub fn concrete_tables(tables: &[TableName], found: &[(usize, String)]) -> Vec<(usize, TableName)> {
    let mut out = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        if !t.is_pattern() {
            // Config resolution refuses a table an earlier pattern matches;
            // should one get here, the router's first-section rule decides.
            let earlier = tables[..i].iter().any(|e| e.matches(&t.schema, &t.name));
            if !earlier {
                out.push((i, t.clone()));
            }
            continue;
        }
        for (_, schema) in found.iter().filter(|(j, _)| *j == i) {
            let earlier = tables[..i].iter().any(|e| e.matches(schema, &t.name));
            if !earlier {
                out.push((i, t.in_schema(schema)));
            }
        }
    }
    out
}

/// The rows of [`pattern_schemas_sql`] from `simple_query` text values.
pub fn pattern_rows(
    rows: impl IntoIterator<Item = (Option<String>, Option<String>)>,
) -> Vec<(usize, String)> {
    rows.into_iter()
        .filter_map(|(i, s)| Some((i?.parse().ok()?, s?)))
        .collect()
}

/// The tables as they exist now (as [`concrete_tables`]), over an ordinary
/// SQL connection.
pub async fn expand_tables(
    client: &tokio_postgres::Client,
    tables: &[TableName],
) -> Result<Vec<(usize, TableName)>, tokio_postgres::Error> {
    let found = match pattern_schemas_sql(tables) {
        None => Vec::new(),
        Some(sql) => {
            let rows = client.simple_query(&sql).await?;
            pattern_rows(rows.iter().filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((r.get(0).map(String::from), r.get(1).map(String::from)))
                }
                _ => None,
            }))
        }
    };
    Ok(concrete_tables(tables, &found))
}

/// The tables the schema patterns of `tables` stand for now that
/// `publication` does not cover, `schema.table` (review N4): a tenant table
/// created while setup's event trigger did not fire (session_replication_role
/// = replica, a disabled trigger, event_triggers = off) whose rows are never
/// decoded until it is added.
pub async fn unpublished_pattern_tables(
    client: &tokio_postgres::Client,
    publication: &str,
    tables: &[TableName],
) -> Result<Vec<String>, tokio_postgres::Error> {
    if !tables.iter().any(TableName::is_pattern) {
        return Ok(Vec::new());
    }
    let published: Vec<String> = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(expand_tables(client, tables)
        .await?
        .into_iter()
        .filter(|(_, t)| !tables.contains(t))
        .map(|(_, t)| t.to_string())
        .filter(|t| !published.contains(t))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_expand_to_the_tables_that_exist_first_section_first() {
        let tables: Vec<TableName> = ["tenant_a.outbox", "tenant_*.outbox", "public.outbox"]
            .iter()
            .map(|t| TableName::parse(t).unwrap())
            .collect();
        let sql = pattern_schemas_sql(&tables).unwrap();
        assert!(sql.contains("LIKE  E'tenant\\\\_%'"), "{sql}");
        assert!(pattern_schemas_sql(&tables[2..]).is_none());
        let found = pattern_rows([
            (Some("1".into()), Some("tenant_a".into())),
            (Some("1".into()), Some("tenant_b".into())),
            (Some("x".into()), Some("bad".into())),
        ]);
        let names: Vec<(usize, String)> = concrete_tables(&tables, &found)
            .iter()
            .map(|(i, t)| (*i, t.to_string()))
            .collect();
        assert_eq!(
            names,
            [
                (0, "tenant_a.outbox".to_string()),
                (1, "tenant_b.outbox".to_string()),
                (2, "public.outbox".to_string())
            ]
        );
    }
}
