//! The outbox side: every row, read over an ordinary SQL connection, with
//! the record the router would make of it.

use std::collections::{BTreeSet, HashMap};

use super::*;
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::{RouteError, RouterConfig, TopicTemplate};

/// Postgres type OIDs the checker cares about.
pub(super) const BYTEA_OID: u32 = 17;
pub(super) const INTEGER_OIDS: [u32; 3] = [20, 21, 23];

/// One outbox row, as the relay would have routed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub event_id: Option<String>,
    pub key: Option<String>,
    /// The record value the relay sends: the column's text, or bytea's bytes.
    pub payload: Option<Vec<u8>>,
    /// The routed topic, or why the template cannot be filled for this row.
    pub topic: Result<String, String>,
    /// Header columns (not `id`), by header name, as text.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Rank in the ordering column (equal values share a rank); None when
    /// order is not checked by column or the value is NULL.
    pub rank: Option<i64>,
    /// The ordering column's value as text, for messages.
    pub order_value: Option<String>,
}

/// What the outbox side of the check found.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    pub table: String,
    pub rows: Vec<OutboxRow>,
    /// "column id", or None when order is not checked by a column.
    pub order_column: Option<String>,
    pub notes: Vec<String>,
}

/// Fills the template from a row's placeholder values, as the router does.
pub(super) fn expand_topic(
    t: &TopicTemplate,
    schema: &str,
    values: &HashMap<String, Option<String>>,
) -> Result<String, String> {
    t.fill(schema, |c| values.get(c).and_then(|v| v.as_deref()))
}

/// Reads the outbox rows with everything needed to check their records.
pub async fn read_outbox(
    client: &tokio_postgres::Client,
    router: &RouterConfig,
    order: &OrderBy,
) -> Result<Outbox, VerifyError> {
    let columns = table_columns(client, router, order).await?;
    let mut notes = Vec::new();
    let order_column = match order {
        OrderBy::Column(c) => Some(c.clone()),
        OrderBy::Header(_) => None,
        OrderBy::Default => default_order_column(client, router, &mut notes).await?,
    };
    let query = RowQuery::new(router, &columns, order_column.as_deref());
    let result = client
        .query(&query.sql, &[])
        .await
        .map_err(read_error("rows"))?;
    Ok(Outbox {
        table: router.table.to_string(),
        rows: result.iter().map(|r| query.row(router, r)).collect(),
        order_column: order_column.map(|c| format!("column {c}")),
        notes,
    })
}

fn read_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let adapt = sql(format!("cannot read the outbox ({what})"));
    move |e| adapt(e).into()
}

/// The columns (name, type OID) the catalog query `sql` finds for the
/// table, `$1` its quoted name; `what` they are, for an error.
async fn catalog_columns(
    client: &tokio_postgres::Client,
    router: &RouterConfig,
    sql: &str,
    what: &str,
) -> Result<Vec<(String, u32)>, VerifyError> {
    Ok(client
        .query(sql, &[&router.table.quoted()])
        .await
        .map_err(read_error(what))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The table's columns and their types; an error names a column the
/// configuration refers to that the table lacks.
async fn table_columns(
    client: &tokio_postgres::Client,
    router: &RouterConfig,
    order: &OrderBy,
) -> Result<Vec<(String, u32)>, VerifyError> {
    let table = router.table.to_string();
    let columns = catalog_columns(
        client,
        router,
        "SELECT a.attname::text, a.atttypid FROM pg_attribute a
          WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
        "columns",
    )
    .await?;
    if columns.is_empty() {
        return Err(VerifyError::NoTable(table));
    }
    let mut wanted = router.referenced_columns();
    if let OrderBy::Column(c) = order {
        wanted.push((c.clone(), "--order-column"));
    }
    for (col, option) in &wanted {
        if !columns.iter().any(|(c, _)| c == col) {
            return Err(RouteError::MissingColumn {
                table,
                missing: col.clone(),
                option,
                existing: columns
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
    }
    Ok(columns)
}

/// The table's single-column integer primary key, the order rows were
/// inserted in; without one, order is not checked and a note says why.
async fn default_order_column(
    client: &tokio_postgres::Client,
    router: &RouterConfig,
    notes: &mut Vec<String>,
) -> Result<Option<String>, VerifyError> {
    let pk = catalog_columns(
        client,
        router,
        "SELECT a.attname::text, a.atttypid FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
          WHERE i.indrelid = to_regclass($1) AND i.indisprimary",
        "primary key",
    )
    .await?;
    Ok(match pk.as_slice() {
        [(c, t)] if INTEGER_OIDS.contains(t) => Some(c.clone()),
        _ => {
            notes.push(
                "order not checked: the table has no single-column integer primary key \
                 to order by; pass --order-column (a column growing in commit order) or \
                 --order-header"
                    .into(),
            );
            None
        }
    })
}

/// The one query over all rows, and where each value lands in its result:
/// id, key, payload, the template's columns, the header columns, then rank
/// and value of the ordering column.
struct RowQuery {
    sql: String,
    template_cols: Vec<String>,
}

impl RowQuery {
    fn new(router: &RouterConfig, columns: &[(String, u32)], order_column: Option<&str>) -> Self {
        let type_of = |col: &str| columns.iter().find(|(c, _)| c == col).map(|(_, t)| *t);
        let template_cols: Vec<String> = {
            let mut seen = BTreeSet::new();
            router
                .topic
                .columns()
                .filter(|c| seen.insert(c.to_string()))
                .map(str::to_string)
                .collect()
        };
        let text = |c: &str| format!("{}::text", quote_ident(c));
        // Text in UTF-8 bytes, as the relay's replication connection receives it.
        let text_bytes = |c: &str| format!("convert_to({}::text, 'UTF8')", quote_ident(c));
        let payload = if type_of(&router.payload_column) == Some(BYTEA_OID) {
            quote_ident(&router.payload_column)
        } else {
            text_bytes(&router.payload_column)
        };
        let mut select = vec![text(&router.id_column), text(&router.key_column), payload];
        select.extend(template_cols.iter().map(|c| text(c)));
        select.extend(router.headers.iter().map(|h| text_bytes(&h.column)));
        match order_column {
            Some(c) => {
                let c = quote_ident(c);
                select.push(format!(
                    "CASE WHEN {c} IS NULL THEN NULL ELSE rank() OVER (ORDER BY {c}) END::int8"
                ));
                select.push(format!("{c}::text"));
            }
            None => {
                select.push("NULL::int8".into());
                select.push("NULL::text".into());
            }
        }
        let sql = format!(
            "SELECT {} FROM {}",
            select.join(", "),
            router.table.quoted()
        );
        RowQuery { sql, template_cols }
    }

    fn row(&self, router: &RouterConfig, r: &tokio_postgres::Row) -> OutboxRow {
        let ntpl = self.template_cols.len();
        let nh = router.headers.len();
        let values: HashMap<String, Option<String>> = self
            .template_cols
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), r.get(3 + i)))
            .collect();
        OutboxRow {
            event_id: r.get(0),
            // As the relay sends it (--key-format), so it compares as bytes.
            key: r.get::<_, Option<String>>(1).map(|k| {
                let key = router.key_format.encode(bytes::Bytes::from(k));
                String::from_utf8_lossy(&key).into_owned()
            }),
            payload: r.get(2),
            topic: expand_topic(&router.topic, &router.table.schema, &values),
            headers: router
                .headers
                .iter()
                .enumerate()
                .map(|(i, h)| (h.header.clone(), r.get(3 + ntpl + i)))
                .collect(),
            rank: r.get(3 + ntpl + nh),
            order_value: r.get(4 + ntpl + nh),
        }
    }
}
