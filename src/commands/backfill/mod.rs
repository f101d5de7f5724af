//! `outbox-relay backfill`: the cutover from a polling publisher.
//!
//! A polling publisher leaves rows it has not published yet (`processed_at IS
//! NULL`). The relay publishes only what is committed after its slot was
//! created. Backfill closes that gap exactly, with no event lost and none
//! published twice:
//!
//! 1. it creates the slot itself, over a replication connection, with
//!    `CREATE_REPLICATION_SLOT … LOGICAL pgoutput EXPORT_SNAPSHOT`. The server
//!    returns the slot's consistent point and the name of a snapshot that
//!    sees exactly the transactions committed before that point;
//! 2. on an ordinary connection it imports that snapshot (`SET TRANSACTION
//!    SNAPSHOT`) and reads the pending rows in it, through a cursor, in the
//!    order of `--order-column`;
//! 3. each row goes through the relay's own [`Router`], fed a pgoutput
//!    Relation and Insert built from the row's text values (the same output
//!    functions the walsender uses), so topic, key, headers and payload are
//!    byte for byte what `run` would have produced, and to the same
//!    idempotent [`KafkaSink`];
//! 4. it waits for every acknowledgement.
//!
//! Every row committed before the consistent point is in the snapshot (and
//! published here if it was pending); every row committed after it is
//! streamed by `run` from the slot, which starts there.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{Options, RelayConfig};
use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::{Routed, Router, RouterConfig, TableName};
use crate::pipeline::sink::{KafkaSink, WithReports};
use crate::pipeline::source::table_rows::TableShape;

mod mark;
mod snapshot;

use crate::observe::progress_line::ProgressLine;
use crate::pipeline::sink::publisher::Publisher;
use mark::mark_processed;
use snapshot::create_slot_with_snapshot;

/// `outbox-relay backfill`: the relay's options plus the backfill's own.
#[derive(Debug, Clone, clap::Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub options: Options,

    /// SQL condition selecting the rows the old publisher has not published
    /// (evaluated in the slot's snapshot).
    #[arg(long, default_value = "processed_at IS NULL")]
    pub pending_where: String,

    /// Column the pending rows are published in (ORDER BY); unique, such as
    /// the primary key, when --mark-processed is used.
    #[arg(long, default_value = "id")]
    pub order_column: String,

    /// Rows fetched from the cursor at a time.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: u32,

    /// Without a terminal, print a progress line every this many rows.
    #[arg(long, default_value_t = 10_000)]
    pub progress_every: u64,

    /// After every record was acknowledged, set --processed-column to now()
    /// for the backfilled rows (so the old scheme's "pending" query shows 0).
    #[arg(long)]
    pub mark_processed: bool,

    /// Column --mark-processed sets.
    #[arg(long, default_value = "processed_at")]
    pub processed_column: String,

    /// Seconds to wait for Kafka's next delivery report while records are in
    /// flight before giving up (the producer itself never gives up on a
    /// record, so an unreachable broker would otherwise stall the cutover).
    #[arg(long, default_value_t = 120.0)]
    pub ack_timeout: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error(transparent)]
    Objects(#[from] crate::pg::objects::ObjectsError),
    #[error("replication slot {slot} already exists (confirmed up to {confirmed}); backfill refuses to use it: a backfill must create the slot itself, so that the snapshot it reads and the stream `run` publishes from meet exactly at the slot's starting point. If no relay has run on it yet and you want to redo the cutover, drop it (SELECT pg_drop_replication_slot('{slot}');) and run backfill again; if the relay is already streaming from it, the cutover is done: do not backfill")]
    SlotExists { slot: String, confirmed: String },
    #[error("the --pending-where condition or --order-column does not work on {table}: {source}")]
    BadPredicate {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot create the replication slot {slot}: {reason}")]
    CreateSlot { slot: String, reason: String },
    #[error("{what}. The slot {slot} already exists (created at {consistent_point}), so backfill cannot simply be rerun: fix the cause, drop the slot (SELECT pg_drop_replication_slot('{slot}');, with no relay running on it) and run backfill again. Records already delivered will be delivered again, with the same `id` header")]
    Aborted {
        what: String,
        slot: String,
        consistent_point: Lsn,
    },
}

/// What a backfill did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub slot: String,
    pub consistent_point: Lsn,
    pub snapshot: String,
    /// Pending rows in the snapshot.
    pub pending: u64,
    /// Records acknowledged by the broker.
    pub published: u64,
    /// Rows --mark-processed updated.
    pub marked: Option<u64>,
    pub elapsed: Duration,
}

/// What the checks before the slot found out about one table.
struct Plan {
    table: TableName,
    shape: TableShape,
    /// Index of `--order-column` in `columns`.
    order_idx: usize,
    /// `FROM <table> WHERE (<pending condition>)`.
    from_where: String,
    order_col: String,
}

/// Runs the backfill; `say` receives one line per step.
pub async fn run(
    cfg: &RelayConfig,
    args: &BackfillArgs,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, BackfillError> {
    // The slot backfill creates is the one `run` then streams every table
    // from: with one section picked, the other tables' backlogs would never
    // be published.
    cfg.refuse_picked("the slot backfill creates serves every table: backfill them all (remove --table), or give this table a configuration (publication and slot) of its own")
        .map_err(BackfillError::Config)?;
    let started = Instant::now();
    let ack_timeout = ack_timeout(args)?;
    let slot = cfg.slot.clone();
    let (client, _conn) = crate::pg::sql::connect(&cfg.database).await?;

    // Everything that can be checked is checked before the slot exists, for
    // every table (a schema pattern's as they exist now).
    crate::pg::objects::check_wal_level(&client).await?;
    refuse_existing_slot(&client, &cfg.slot).await?;
    let tables = crate::pipeline::tables::expand(&client, &cfg.tables)
        .await
        .map_err(sql("finding the tables of the schema patterns"))?;
    let (plans, mut router, sinks) = plans(&client, cfg, args, &tables).await?;

    // The publication must exist before the slot: pgoutput looks it up as of
    // each decoded change.
    for line in
        crate::pipeline::tables::publish(&client, &cfg.publication, &cfg.tables, &tables).await?
    {
        say(line);
    }

    let (repl, consistent_point, snapshot) = create_slot_with_snapshot(cfg, &slot).await?;
    say(format!(
        "created logical replication slot {slot} (pgoutput) at {consistent_point} with snapshot {snapshot}: rows committed before it are read here, rows committed after it are streamed by `run`"
    ));
    let abort = |what: String| BackfillError::Aborted {
        what,
        slot: slot.clone(),
        consistent_point,
    };

    // The exported snapshot lives while `repl` stays open and idle; every
    // table is read in it.
    crate::pipeline::source::table_rows::import_snapshot(&client, &snapshot)
        .await
        .map_err(abort)?;
    all_planned(&client, cfg, &plans).await.map_err(abort)?;
    let (pending, acked, delivered) = publish_all(
        &client,
        (cfg, args, ack_timeout),
        &plans,
        sinks,
        &mut router,
        say,
    )
    .await
    .map_err(abort)?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| abort(format!("closing the snapshot's transaction failed: {e}")))?;
    // The snapshot is no longer needed: the slot stays.
    drop(repl);

    let marked = match args.mark_processed {
        true => Some(mark_all(&client, args, &plans, &delivered, say).await?),
        false => None,
    };
    Ok(Summary {
        slot,
        consistent_point,
        snapshot,
        pending,
        published: acked,
        marked,
        elapsed: started.elapsed(),
    })
}

/// Each table's plan (the checks that need no slot), the router that knows
/// every table, and a producer per table: each table's records are all
/// acknowledged before the next table's start, and --mark-processed needs
/// them apart.
async fn plans(
    client: &Client,
    cfg: &RelayConfig,
    args: &BackfillArgs,
    tables: &[RouterConfig],
) -> Result<(Vec<Plan>, Router, Vec<WithReports>), BackfillError> {
    let mut router = Router::new(cfg.tables.clone());
    let mut plans = Vec::with_capacity(tables.len());
    for t in tables {
        let plan = plan(client, t, args).await?;
        router
            .on_relation(&plan.shape.relation())
            .map_err(|e| BackfillError::Config(e.to_string()))?;
        plans.push(plan);
    }
    let mut sinks = Vec::with_capacity(plans.len());
    for _ in &plans {
        sinks.push(
            KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties)
                .map_err(|e| BackfillError::Config(e.to_string()))?,
        );
    }

    Ok((plans, router, sinks))
}

/// Every table's pending rows published in the slot's snapshot, table after
/// table: the rows pending, the records acknowledged, and each table's
/// delivered order values. An error says what failed (the caller adds
/// what it means for the slot).
async fn publish_all(
    client: &Client,
    (cfg, args, ack_timeout): (&RelayConfig, &BackfillArgs, Duration),
    plans: &[Plan],
    sinks: Vec<WithReports>,
    router: &mut Router,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(u64, u64, Vec<Vec<String>>), String> {
    let mut pending = 0;
    let mut acked = 0;
    let mut delivered = Vec::with_capacity(plans.len());
    for (plan, sink) in plans.iter().zip(sinks) {
        let in_table = open_cursor(client, plan).await?;
        say(format!(
            "{in_table} pending row(s) in {} where {} (in the slot's snapshot)",
            plan.table, args.pending_where
        ));
        let mut publisher = Publisher::new(
            sink,
            &args.order_column,
            args.mark_processed,
            ack_timeout,
            cfg.max_inflight,
            ProgressLine::new("backfill", Some(in_table), args.progress_every),
        );
        publish_cursor(client, args, plan, router, &mut publisher).await?;
        let published = publisher.finish().await?;
        client
            .batch_execute("CLOSE outbox_backfill")
            .await
            .map_err(|e| format!("closing the cursor failed: {e}"))?;
        pending += in_table;
        acked += published.acked;
        delivered.push(published.delivered);
    }
    Ok((pending, acked, delivered))
}

fn ack_timeout(args: &BackfillArgs) -> Result<Duration, BackfillError> {
    Duration::try_from_secs_f64(args.ack_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            BackfillError::Config(format!(
                "--ack-timeout {}: expected a positive number of seconds",
                args.ack_timeout
            ))
        })
}

/// Backfill creates the slot: one that exists already is someone's.
async fn refuse_existing_slot(client: &Client, slot: &str) -> Result<(), BackfillError> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '-') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?;
    match row {
        Some(row) => Err(BackfillError::SlotExists {
            slot: slot.to_string(),
            confirmed: row.get(0),
        }),
        None => Ok(()),
    }
}

/// A tenant table created after the tables were listed, and written to
/// before the slot's consistent point, would be in the snapshot but in no
/// plan: its pending rows would be published by no one.
async fn all_planned(client: &Client, cfg: &RelayConfig, plans: &[Plan]) -> Result<(), String> {
    let in_snapshot = crate::pipeline::tables::expand(client, &cfg.tables)
        .await
        .map_err(|e| format!("listing the tables in the slot's snapshot failed: {e}"))?;
    let unplanned: Vec<String> = in_snapshot
        .iter()
        .filter(|t| !plans.iter().any(|p| p.table == t.table))
        .map(|t| t.table.to_string())
        .collect();
    if unplanned.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} appeared while the backfill was starting",
        unplanned.join(", ")
    ))
}

/// `--mark-processed` for every table, by what was delivered of each.
async fn mark_all(
    client: &Client,
    args: &BackfillArgs,
    plans: &[Plan],
    delivered: &[Vec<String>],
    say: &mut (dyn FnMut(String) + Send),
) -> Result<u64, BackfillError> {
    let mut marked = 0;
    for (plan, done) in plans.iter().zip(delivered) {
        let order_type = &plan.shape.columns[plan.order_idx].type_name;
        marked += mark_processed(client, &plan.table, args, order_type, done, say).await?;
    }
    Ok(marked)
}

/// The checks of one table that need no slot: its columns, the order and
/// processed columns, and the operator's condition.
async fn plan(
    client: &Client,
    mapping: &RouterConfig,
    args: &BackfillArgs,
) -> Result<Plan, BackfillError> {
    let table = &mapping.table;
    crate::pg::objects::check_table(client, &mapping.table, &mapping.referenced_columns()).await?;
    let shape = TableShape::read(client, table)
        .await
        .map_err(sql(format!("reading the columns of {table}")))?;
    let order_idx = shape.position(&args.order_column).ok_or_else(|| {
        BackfillError::Config(format!(
            "--order-column {} is not a column of {table}; its columns are: {}",
            args.order_column,
            shape.names()
        ))
    })?;
    if args.mark_processed && shape.position(&args.processed_column).is_none() {
        return Err(BackfillError::Config(format!(
            "--mark-processed: {table} has no column {} (set --processed-column)",
            args.processed_column
        )));
    }
    let order_col = quote_ident(&args.order_column);
    let from_where = format!("FROM {} WHERE ({})", table.quoted(), args.pending_where);
    // The condition is the operator's SQL: run it through the extended
    // protocol, which takes exactly one statement, so a `;` cannot smuggle
    // in another one.
    client
        .execute(
            &format!("SELECT 1 {from_where} ORDER BY {order_col} LIMIT 0"),
            &[],
        )
        .await
        .map_err(|source| BackfillError::BadPredicate {
            table: table.to_string(),
            source,
        })?;
    Ok(Plan {
        table: table.clone(),
        shape,
        order_idx,
        from_where,
        order_col,
    })
}

/// Counts the table's pending rows in the snapshot and opens the cursor
/// over them; returns the count.
async fn open_cursor(client: &Client, plan: &Plan) -> Result<u64, String> {
    let from_where = &plan.from_where;
    let pending: i64 = client
        .query_one(&format!("SELECT count(*) {from_where}"), &[])
        .await
        .map_err(|e| format!("counting the pending rows failed: {e}"))?
        .get(0);
    client
        .execute(
            &format!(
                "DECLARE outbox_backfill NO SCROLL CURSOR FOR SELECT {} {from_where} ORDER BY {}",
                plan.shape.select_list(),
                plan.order_col
            ),
            &[],
        )
        .await
        .map_err(|e| format!("opening the cursor failed: {e}"))?;
    Ok(pending as u64)
}

/// Reads the cursor to its end, `--batch-size` rows at a time, and publishes
/// each row as `run` would have.
async fn publish_cursor(
    client: &Client,
    args: &BackfillArgs,
    plan: &Plan,
    router: &mut Router,
    publisher: &mut Publisher<'_>,
) -> Result<(), String> {
    let fetch = format!("FETCH {} FROM outbox_backfill", args.batch_size.max(1));
    loop {
        let messages = client
            .simple_query(&fetch)
            .await
            .map_err(|e| format!("reading the pending rows failed: {e}"))?;
        let mut fetched = 0usize;
        for m in messages {
            let SimpleQueryMessage::Row(row) = m else {
                continue;
            };
            fetched += 1;
            let order_value = row.get(plan.order_idx).unwrap_or("NULL").to_string();
            let rec = match router.route(&plan.shape.insert(&row)) {
                Ok(Routed::Record(rec)) => rec,
                // Backfill reads the outbox table itself: its relation is
                // always the outbox.
                Ok(Routed::OtherTable(t)) => {
                    return Err(format!(
                        "the backfill read a row of {t}, not of the outbox table"
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "the row with {} = {order_value} cannot be published: {e}",
                        args.order_column
                    ))
                }
            };
            publisher.publish(&rec, order_value).await?;
        }
        if fetched == 0 {
            return Ok(());
        }
    }
}

const BACKFILL: super::Entry = super::Entry::new("backfill", super::Kafka::Required);

/// The `backfill` subcommand; returns the exit code (0 done, 1 failed, 2
/// configuration error).
pub async fn command(config: Option<&Path>, args: BackfillArgs) -> u8 {
    BACKFILL
        .with_config(config, args.options.clone(), |cfg| async move {
            match run(&cfg, &args, &mut super::say).await {
                Ok(s) => {
                    println!(
                        "backfill done: {} row(s) published in {:.1} s; slot {} starts at {}: start `outbox-relay run` now, it publishes everything committed after that point",
                        s.published,
                        s.elapsed.as_secs_f64(),
                        s.slot,
                        s.consistent_point
                    );
                    0
                }
                Err(BackfillError::Config(e)) => BACKFILL.fail(e, 2),
                Err(e) => BACKFILL.fail(e, 1),
            }
        })
        .await
}
