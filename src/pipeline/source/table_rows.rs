//! Rows read from the outbox table over SQL, as the stream would have sent
//! them: the table described as pgoutput's Relation, each row as its Insert
//! in text format (each type's output function, which is what the
//! walsender uses). `backfill` and `recover` route them through the same
//! [`Router`](crate::pipeline::route::router::Router) as `run`, so topic,
//! key, headers and payload are byte for byte what the stream gives.

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryRow};

use crate::pipeline::decode::pgoutput::{Column, Insert, Relation, TupleValue};
use crate::pipeline::route::router::TableName;

/// A table column as pgoutput would describe it.
pub struct TableColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub type_name: String,
}

/// The table's OID and its published columns, in table order (generated
/// columns are left out, as pgoutput leaves them out).
pub struct TableShape {
    pub table: TableName,
    pub oid: u32,
    pub columns: Vec<TableColumn>,
}

impl TableShape {
    /// Reads the table's shape from the catalog (OID 0 and no columns when
    /// the table is not there).
    pub async fn read(client: &Client, table: &TableName) -> Result<Self, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT c.oid, a.attname::text, a.atttypid, a.atttypmod,
                        format_type(a.atttypid, a.atttypmod)
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid
                  WHERE n.nspname = $1 AND c.relname = $2
                    AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                  ORDER BY a.attnum",
                &[&table.schema, &table.name],
            )
            .await?;
        Ok(TableShape {
            table: table.clone(),
            oid: rows.first().map(|r| r.get::<_, u32>(0)).unwrap_or(0),
            columns: rows
                .iter()
                .map(|r| TableColumn {
                    name: r.get(1),
                    type_oid: r.get(2),
                    type_modifier: r.get(3),
                    type_name: r.get(4),
                })
                .collect(),
        })
    }

    /// Where `name` is among the columns.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The columns' names, comma-separated, for an error message.
    pub fn names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The column list of a SELECT that reads rows in this shape.
    pub fn select_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| crate::pg::quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The table as pgoutput would describe it, for the router (which
    /// refuses a shape it cannot route before anything is published).
    pub fn relation(&self) -> Relation {
        Relation {
            oid: self.oid,
            namespace: self.table.schema.clone(),
            name: self.table.name.clone(),
            replica_identity: b'd',
            columns: self
                .columns
                .iter()
                .map(|c| Column {
                    flags: 0,
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                })
                .collect(),
        }
    }

    /// A row read with [`TableShape::select_list`] (simple query protocol:
    /// text values) as the Insert pgoutput would have sent.
    pub fn insert(&self, row: &SimpleQueryRow) -> Insert {
        Insert {
            relation_oid: self.oid,
            tuple: (0..self.columns.len())
                .map(|i| match row.get(i) {
                    Some(v) => TupleValue::Text(Bytes::copy_from_slice(v.as_bytes())),
                    None => TupleValue::Null,
                })
                .collect(),
        }
    }
}

/// Starts, on `client`, the read-only transaction that sees exactly what
/// the exported snapshot `snapshot` sees (a slot's, from
/// `create_slot_exporting_snapshot`): every table is then read in it.
pub async fn import_snapshot(client: &Client, snapshot: &str) -> Result<(), String> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::pg::quote_literal(snapshot)
        ))
        .await
        .map_err(|e| format!("importing snapshot {snapshot} failed: {e}"))
}
