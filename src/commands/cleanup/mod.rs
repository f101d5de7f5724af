//! `outbox-relay cleanup`: deletes outbox rows that are already published.
//!
//! Two modes:
//!
//! - `--published` (the default) deletes exactly the rows the relay has
//!   confirmed. It opens a REPEATABLE READ transaction and reads
//!   `pg_current_wal_insert_lsn()` (L0) in it. A row visible in that snapshot
//!   was committed before the snapshot was taken, so its commit record ends
//!   at or before L0. It then waits (bounded by `--wait`) until the slot's
//!   `confirmed_flush_lsn` is at least L0: the relay confirms a position only
//!   after the broker acknowledged every event before it, so from then on
//!   every row of the snapshot is published. Then it deletes those rows (by
//!   the key read in the snapshot) from a second connection, in batches. A
//!   row committed later is not in the snapshot and is never touched. If the
//!   slot does not reach L0 in time (relay down or lagging), nothing is
//!   deleted.
//! - `--older-than 7d` deletes rows whose `--time-column` (created_at) is
//!   older than that: the classic retention rule, and like `--published`
//!   only rows of a snapshot the slot confirmed (issue 25): a row the relay
//!   has not published is the only copy of its event, and after a lost slot
//!   it is what the events are recovered from. `--even-unconfirmed` keeps
//!   the old rule, which does not consult the slot.
//!
//! - `--drop-partitions --older-than 7d`, for an outbox partitioned by range
//!   on the time column: drops the partitions wholly older than that once
//!   the slot confirmed every row in them (`partitions.rs`).
//!
//! Precondition of `--published`: rows committed before the slot existed
//! were published some other way (by the old poller, or by `backfill`).

mod partitions;

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::RelayConfig;
use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::{RouterConfig, TableName};

/// A duration option (`7d`, `12h`, `30m`, `45s`, `500ms`; a bare number is
/// seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s, crate::config::BareNumber::Seconds)
}

/// `outbox-relay cleanup`: the relay's options (Kafka unused) plus the mode.
#[derive(Debug, Clone, clap::Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub options: crate::config::Options,

    /// Delete the rows the relay has confirmed (the default mode).
    #[arg(long, conflicts_with = "older_than")]
    pub published: bool,

    /// Delete rows whose --time-column is older than this (7d, 12h, 30m …),
    /// once the slot confirmed them (as --published does).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Option<Duration>,

    /// With --older-than: delete the old rows whether or not the relay has
    /// published them (the slot is not consulted). Events of rows deleted
    /// before they were published are lost.
    #[arg(long, requires = "older_than", conflicts_with = "drop_partitions")]
    pub even_unconfirmed: bool,

    /// With --older-than, on an outbox partitioned by range on
    /// --time-column: detach the partitions wholly older than that, wait
    /// until the slot confirmed every row in them, then drop them (attached
    /// again if the slot does not get there within --wait).
    #[arg(long, requires = "older_than")]
    pub drop_partitions: bool,

    /// Timestamp column of --older-than.
    #[arg(long, default_value = "created_at")]
    pub time_column: String,

    /// Rows deleted per transaction.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: u32,

    /// --published: how long to wait for the slot to confirm the snapshot's
    /// position before giving up (nothing deleted).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub wait: Duration,

    /// Column identifying a row for the delete [default: the table's
    /// single-column primary key].
    #[arg(long)]
    pub row_column: Option<String>,

    /// Extra SQL condition a row must meet to be deleted (both modes).
    #[arg(long = "where")]
    pub filter: Option<String>,

    /// Say what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("replication slot {0} does not exist: without it there is no record of what the relay published, so cleanup deletes nothing (create it with `outbox-relay setup` or `backfill`, or pass --older-than with --even-unconfirmed, which deletes old rows published or not)")]
    NoSlot(String),
    #[error("the slot {slot} did not confirm {target} within {waited:?} (it is at {confirmed}): the relay is stopped or lagging, so rows in the snapshot may not be published yet; nothing was deleted. Check `outbox-relay status`, start or fix the relay, or pass a longer --wait (with --older-than, --even-unconfirmed deletes old rows published or not)")]
    NotConfirmed {
        slot: String,
        target: Lsn,
        confirmed: String,
        waited: Duration,
    },
}

/// What a cleanup did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub deleted: u64,
    pub batches: u64,
    /// --published: the snapshot's position the slot confirmed.
    pub confirmed_target: Option<Lsn>,
    /// --drop-partitions: the partitions dropped.
    pub dropped_partitions: Vec<String>,
}

/// The row column and its SQL type.
async fn row_column(
    client: &Client,
    table: &TableName,
    args: &CleanupArgs,
) -> Result<(String, String), CleanupError> {
    let columns: Vec<(String, String, bool)> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    coalesce((SELECT i.indisprimary AND i.indnatts = 1 FROM pg_index i
                               WHERE i.indrelid = a.attrelid AND i.indisprimary
                                 AND a.attnum = ANY(i.indkey)), false)
               FROM pg_attribute a
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&table.quoted()],
        )
        .await
        .map_err(sql(format!("reading the columns of {table}")))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if columns.is_empty() {
        return Err(CleanupError::Config(format!(
            "table {table} does not exist (or is not visible to this user)"
        )));
    }
    let found = match &args.row_column {
        Some(c) => columns.iter().find(|(name, _, _)| name == c),
        None => columns.iter().find(|(_, _, pk)| *pk),
    };
    match found {
        Some((name, ty, _)) => Ok((name.clone(), ty.clone())),
        None => Err(CleanupError::Config(match &args.row_column {
            Some(c) => format!("--row-column {c} is not a column of {table}"),
            None => format!(
                "{table} has no single-column primary key: pass --row-column (a unique, never updated column)"
            ),
        })),
    }
}

async fn slot_confirmed(client: &Client, slot: &str) -> Result<Option<Lsn>, CleanupError> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots
              WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}

/// Runs the cleanup; `say` receives one line per batch and step.
pub async fn run(
    cfg: &RelayConfig,
    args: &CleanupArgs,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, CleanupError> {
    let (reader, _c1) = crate::pg::sql::connect(&cfg.database).await?;
    let (writer, _c2) = crate::pg::sql::connect(&cfg.database).await?;
    let db = Db {
        reader: &reader,
        writer: &writer,
    };
    // Several tables (a schema pattern's as they exist now): one after the
    // other, each with its own snapshot and wait.
    let tables = if cfg.several_tables() {
        crate::pipeline::tables::expand(&reader, &cfg.tables)
            .await
            .map_err(sql("finding the tables of the schema patterns"))?
    } else {
        vec![cfg
            .single_table("cleanup")
            .map_err(|e| CleanupError::Config(e.to_string()))?
            .clone()]
    };
    let mut total = Summary::default();
    for mapping in &tables {
        if tables.len() > 1 {
            say(format!("table {}:", mapping.table));
        }
        let s = run_table(db, cfg, mapping, args, say).await?;
        total.deleted += s.deleted;
        total.batches += s.batches;
        total.confirmed_target = s.confirmed_target.or(total.confirmed_target);
        total.dropped_partitions.extend(s.dropped_partitions);
    }
    Ok(total)
}

async fn run_table(
    db: Db<'_>,
    cfg: &RelayConfig,
    mapping: &RouterConfig,
    args: &CleanupArgs,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, CleanupError> {
    if let (true, Some(age)) = (args.drop_partitions, args.older_than) {
        return partitions::drop_partitions(db, &cfg.slot, &mapping.table, args, age, say).await;
    }
    let (col, col_type) = row_column(db.reader, &mapping.table, args).await?;
    let scope = Scope {
        table: mapping.table.to_string(),
        quoted_table: mapping.table.quoted(),
        qcol: quote_ident(&col),
        col,
        col_type,
        filter: args
            .filter
            .as_deref()
            .map(|f| format!(" AND ({f})"))
            .unwrap_or_default(),
        batch: args.batch_size.max(1) as usize,
    };
    match args.older_than {
        Some(age) if args.even_unconfirmed => delete_older_than(db, &scope, args, age, say).await,
        age => delete_published(db, &scope, cfg, args, age, say).await,
    }
}

/// The two connections a cleanup works over: the reader holds the snapshot
/// (and the cursor over its rows), the writer deletes, and reads the slot as
/// it is now.
#[derive(Clone, Copy)]
struct Db<'a> {
    reader: &'a Client,
    writer: &'a Client,
}

/// The rows a cleanup may touch, and how to name them in SQL.
struct Scope {
    table: String,
    quoted_table: String,
    /// The column that identifies a row, its quoted name and its type.
    col: String,
    qcol: String,
    col_type: String,
    /// ` AND (<--where>)`, or empty.
    filter: String,
    batch: usize,
}

/// `--older-than --even-unconfirmed`: rows whose time column is older,
/// published or not.
async fn delete_older_than(
    db: Db<'_>,
    scope: &Scope,
    args: &CleanupArgs,
    age: Duration,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, CleanupError> {
    let table = &scope.table;
    let mut summary = Summary::default();
    let secs = age.as_secs_f64();
    let cond = format!(
        "{} < now() - $1::float8 * interval '1 second'{}",
        quote_ident(&args.time_column),
        scope.filter
    );
    if args.dry_run {
        let n: i64 = db
            .reader
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE {cond}", scope.quoted_table),
                &[&secs],
            )
            .await
            .map_err(sql("counting the old rows"))?
            .get(0);
        say(format!(
            "dry run: would delete {n} row(s) of {table} with {} older than {}",
            args.time_column,
            humanize(age)
        ));
        return Ok(summary);
    }
    let sql_batch = format!(
        "DELETE FROM {t} WHERE {c} IN (SELECT {c} FROM {t} WHERE {cond} LIMIT {n})",
        t = scope.quoted_table,
        c = scope.qcol,
        n = scope.batch
    );
    loop {
        let n = db
            .writer
            .execute(&sql_batch, &[&secs])
            .await
            .map_err(sql(format!("deleting old rows of {table}")))?;
        if n == 0 {
            return Ok(summary);
        }
        summary.batches += 1;
        summary.deleted += n;
        say(format!(
            "batch {}: deleted {n} row(s) with {} older than {}",
            summary.batches,
            args.time_column,
            humanize(age)
        ));
    }
}

/// `--published`: the rows a snapshot sees, once the slot confirmed a
/// position after every commit that snapshot sees; with `--older-than`,
/// those of them older than `age`.
async fn delete_published(
    db: Db<'_>,
    scope: &Scope,
    cfg: &RelayConfig,
    args: &CleanupArgs,
    age: Option<Duration>,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, CleanupError> {
    let table = &scope.table;
    if slot_confirmed(db.reader, &cfg.slot).await?.is_none() {
        return Err(CleanupError::NoSlot(cfg.slot.clone()));
    }
    let target = snapshot(db.reader).await?;
    let mut summary = Summary {
        confirmed_target: Some(target),
        ..Summary::default()
    };
    // Read on the other connection: the reader's snapshot would show the
    // slot as it was.
    wait_confirmed(db.writer, &cfg.slot, target, args.wait, say).await?;
    // now() is the snapshot's transaction start.
    let older = age
        .map(|a| older_than(&args.time_column, a))
        .unwrap_or_default();
    // --where is the operator's SQL: one statement only (extended protocol).
    db.reader
        .execute(
            &format!(
                "DECLARE outbox_cleanup NO SCROLL CURSOR FOR SELECT {c}::text AS cleanup_key FROM {t} WHERE true{older}{filter} ORDER BY {c}",
                c = scope.qcol,
                t = scope.quoted_table,
                filter = scope.filter
            ),
            &[],
        )
        .await
        .map_err(sql("opening the cursor over the published rows"))?;
    let would = delete_batches(db, scope, args.dry_run, &mut summary, say).await?;
    let _ = db.reader.batch_execute("COMMIT").await;
    if args.dry_run {
        say(match age {
            Some(a) => format!(
                "dry run: would delete {would} row(s) of {table} with {} older than {} (published: confirmed by the slot)",
                args.time_column,
                humanize(a)
            ),
            None => format!("dry run: would delete {would} published row(s) of {table}"),
        });
    }
    Ok(summary)
}

/// Deletes the rows the cursor `outbox_cleanup` yields, a batch at a time;
/// with `dry_run` only counts them (the count is returned).
async fn delete_batches(
    db: Db<'_>,
    scope: &Scope,
    dry_run: bool,
    summary: &mut Summary,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<u64, CleanupError> {
    let Scope {
        table,
        quoted_table,
        col,
        qcol,
        col_type,
        batch,
        ..
    } = scope;
    let delete = format!("DELETE FROM {quoted_table} WHERE {qcol} = ANY($1::text[]::{col_type}[])");
    let fetch = format!("FETCH {batch} FROM outbox_cleanup");
    let mut would = 0u64;
    loop {
        let keys: Vec<String> = db
            .reader
            .simple_query(&fetch)
            .await
            .map_err(sql("reading the published rows"))?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
            break;
        };
        if dry_run {
            would += keys.len() as u64;
            continue;
        }
        let n = db
            .writer
            .execute(&delete, &[&keys])
            .await
            .map_err(sql(format!("deleting published rows of {table}")))?;
        summary.batches += 1;
        summary.deleted += n;
        say(format!(
            "batch {}: deleted {n} row(s) ({col} {first} … {last})",
            summary.batches
        ));
    }
    Ok(would)
}

/// The condition on the rows' time column for `--older-than`.
fn older_than(time_column: &str, age: Duration) -> String {
    format!(
        " AND {} < now() - {}::float8 * interval '1 second'",
        quote_ident(time_column),
        age.as_secs_f64()
    )
}

/// Takes the reader's snapshot and returns a WAL position at or after every
/// commit it sees: the first statement takes the snapshot, the position is
/// read after it.
async fn snapshot(reader: &Client) -> Result<Lsn, CleanupError> {
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(sql("starting the snapshot"))?;
    reader
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(sql("reading the WAL position"))?
        .get::<_, String>(0)
        .parse()
        .map_err(|e| CleanupError::Config(format!("{e}")))
}

/// Waits (up to `wait`) until the slot confirmed `target`.
async fn wait_confirmed(
    client: &Client,
    slot: &str,
    target: Lsn,
    wait: Duration,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), CleanupError> {
    let started = Instant::now();
    loop {
        match slot_confirmed(client, slot).await? {
            Some(c) if c >= target => {
                say(format!(
                    "slot {slot} confirmed {c} ≥ {target}: every row committed before {target} is published"
                ));
                return Ok(());
            }
            None => return Err(CleanupError::NoSlot(slot.to_string())),
            Some(c) if started.elapsed() >= wait => {
                return Err(CleanupError::NotConfirmed {
                    slot: slot.to_string(),
                    target,
                    confirmed: c.to_string(),
                    waited: wait,
                })
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 86_400.0 && s % 86_400.0 == 0.0 {
        format!("{}d", s / 86_400.0)
    } else if s >= 3600.0 && s % 3600.0 == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    }
}

const CLEANUP: super::Entry = super::Entry::new("cleanup", super::Kafka::Optional);

/// The `cleanup` subcommand; returns the exit code (0 done, 1 refused or
/// failed, 2 configuration error).
pub async fn command(config: Option<&Path>, args: CleanupArgs) -> u8 {
    CLEANUP
        .with_config(config, args.options.clone(), |cfg| async move {
            match run(&cfg, &args, &mut super::say).await {
                Ok(s) if !args.dry_run && args.drop_partitions => {
                    println!(
                        "cleanup done: dropped {} partition(s) of {} ({} row(s), published: confirmed by slot {})",
                        s.dropped_partitions.len(),
                        cfg.table_names(),
                        s.deleted,
                        cfg.slot
                    );
                    0
                }
                Ok(s) if !args.dry_run => {
                    println!(
                        "cleanup done: deleted {} row(s) of {} in {} batch(es){}",
                        s.deleted,
                        cfg.table_names(),
                        s.batches,
                        match s.confirmed_target {
                            Some(t) => format!(
                                " (published: committed before {t}, confirmed by slot {})",
                                cfg.slot
                            ),
                            None => String::new(),
                        }
                    );
                    0
                }
                Ok(_) => 0,
                Err(CleanupError::Config(e)) => CLEANUP.fail(e, 2),
                Err(e) => CLEANUP.fail(e, 1),
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("7 fortnights").is_err());
        assert!(parse_duration("d").is_err());
        assert_eq!(humanize(Duration::from_secs(7 * 86_400)), "7d");
    }
}
