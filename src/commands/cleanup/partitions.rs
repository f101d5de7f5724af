//! `cleanup --drop-partitions`: for an outbox partitioned by range on its
//! time column, drops the partitions that lie wholly before the retention
//! and whose rows the slot has confirmed, instead of deleting row by row.
//!
//! Why the order detach, wait, drop: a partition is safe to drop only when
//! every row it holds is published, i.e. the slot confirmed a position after
//! the commit of its last row. While it is attached a late writer can still
//! put a row into it (an old `created_at`), so no position taken before the
//! detach covers it. `DETACH PARTITION` takes a lock that waits for every
//! transaction writing to the partition and keeps new ones out, so once it
//! returns, every row the partition will ever hold is committed, and the
//! WAL insert position read then (T) lies after all of them. The slot
//! reaching T means the relay delivered them all. If it does not reach T
//! within `--wait` (relay stopped or lagging), the partitions are attached
//! again with their old bounds: nothing is dropped, nothing is lost.

use std::time::Duration;

use tokio_postgres::Client;

use super::{slot_confirmed, wait_confirmed, CleanupArgs, CleanupError, Summary};
use crate::lsn::Lsn;
use crate::pg::sql::sql;
use crate::pipeline::route::router::TableName;

/// A partition that may be dropped: its name (as SQL) and its bound clause
/// (`FOR VALUES FROM (…) TO (…)`, what ATTACH takes back).
struct Partition {
    name: String,
    bound: String,
}

/// Checks that `table` is partitioned by range on `time_column` alone: only
/// then does a partition's upper bound say how old all its rows are.
async fn check_partitioning(
    client: &Client,
    table: &TableName,
    time_column: &str,
) -> Result<(), CleanupError> {
    let row = client
        .query_opt(
            "SELECT p.partstrat::text, p.partnatts::int,
                    (SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = p.partrelid AND a.attnum = p.partattrs[0])
               FROM pg_partitioned_table p WHERE p.partrelid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .map_err(sql(format!("reading how {table} is partitioned")))?;
    let Some(row) = row else {
        return Err(CleanupError::Config(format!(
            "{table} is not a partitioned table: --drop-partitions needs one partitioned by range on --time-column; use --older-than alone to delete rows"
        )));
    };
    let (strategy, columns, key): (String, i32, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    if strategy != "r" || columns != 1 || key.as_deref() != Some(time_column) {
        return Err(CleanupError::Config(format!(
            "{table} is not partitioned by range on {time_column} alone (strategy {strategy}, key {}): a partition's bounds then say nothing about its rows' age; pass the partition key as --time-column, or use --older-than alone",
            key.unwrap_or_else(|| "an expression".into())
        )));
    }
    Ok(())
}

/// The leaf partitions whose upper bound is at or before now - `age`.
/// DEFAULT and MAXVALUE partitions never qualify.
async fn old_partitions(
    client: &Client,
    table: &TableName,
    age: Duration,
) -> Result<Vec<Partition>, CleanupError> {
    let rows = client
        .query(
            "SELECT c.oid::regclass::text, pg_get_expr(c.relpartbound, c.oid)
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = to_regclass($1) AND c.relkind = 'r'
                AND (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)$'))[1]::timestamptz
                    <= now() - $2::float8 * interval '1 second'
              ORDER BY 2",
            &[&table.quoted(), &age.as_secs_f64()],
        )
        .await
        .map_err(sql(format!("reading the partitions of {table}")))?;
    Ok(rows
        .iter()
        .map(|r| Partition {
            name: r.get(0),
            bound: r.get(1),
        })
        .collect())
}

/// Detaches, waits for the slot, drops; attaches back if the slot does not
/// get there.
pub(super) async fn drop_partitions(
    db: super::Db<'_>,
    slot: &str,
    table: &TableName,
    args: &CleanupArgs,
    age: Duration,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, CleanupError> {
    let super::Db { reader, writer } = db;
    check_partitioning(reader, table, &args.time_column).await?;
    if slot_confirmed(reader, slot).await?.is_none() {
        return Err(CleanupError::NoSlot(slot.to_string()));
    }
    let old = old_partitions(reader, table, age).await?;
    let mut summary = Summary::default();
    if old.is_empty() {
        say(format!(
            "no partition of {table} lies wholly before {} ago",
            super::humanize(age)
        ));
        return Ok(summary);
    }
    if args.dry_run {
        for p in &old {
            say(format!(
                "dry run: would drop partition {} ({})",
                p.name, p.bound
            ));
        }
        return Ok(summary);
    }
    let parent = table.quoted();
    let mut detached: Vec<&Partition> = Vec::new();
    for p in &old {
        if let Err(e) = writer
            .batch_execute(&format!("ALTER TABLE {parent} DETACH PARTITION {}", p.name))
            .await
        {
            attach_back(writer, &parent, &detached, say).await;
            return Err(sql(format!("detaching partition {} of {table}", p.name))(e).into());
        }
        say(format!("detached partition {} ({})", p.name, p.bound));
        detached.push(p);
    }
    let target: Lsn = match writer
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
    {
        Ok(r) => r.get::<_, String>(0).parse().unwrap_or_default(),
        Err(e) => {
            attach_back(writer, &parent, &detached, say).await;
            return Err(sql("reading the WAL position")(e).into());
        }
    };
    if let Err(e) = wait_confirmed(writer, slot, target, args.wait, say).await {
        attach_back(writer, &parent, &detached, say).await;
        return Err(e);
    }
    summary.confirmed_target = Some(target);
    for p in detached {
        let rows: i64 = writer
            .query_one(&format!("SELECT count(*) FROM {}", p.name), &[])
            .await
            .map_err(sql(format!("counting the rows of {}", p.name)))?
            .get(0);
        writer
            .batch_execute(&format!("DROP TABLE {}", p.name))
            .await
            .map_err(sql(format!("dropping partition {}", p.name)))?;
        say(format!(
            "dropped partition {} ({rows} row(s), all published)",
            p.name
        ));
        summary.deleted += rows as u64;
        summary.dropped_partitions.push(p.name.clone());
    }
    Ok(summary)
}

/// Puts detached partitions back with their bounds, so that a refused
/// cleanup leaves the table as it found it.
async fn attach_back(
    client: &Client,
    parent: &str,
    detached: &[&Partition],
    say: &mut (dyn FnMut(String) + Send),
) {
    for p in detached {
        match client
            .batch_execute(&format!("ALTER TABLE {parent} ATTACH PARTITION {} {}", p.name, p.bound))
            .await
        {
            Ok(()) => say(format!("attached partition {} again", p.name)),
            Err(e) => say(format!(
                "could not attach partition {} again ({e}): it is intact but detached; attach it by hand: ALTER TABLE {parent} ATTACH PARTITION {} {}",
                p.name, p.name, p.bound
            )),
        }
    }
}
