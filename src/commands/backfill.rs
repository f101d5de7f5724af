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

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::{Options, RelayConfig};
use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::decode::pgoutput::{Column, Insert, Relation, TupleValue};
use crate::pipeline::route::router::{Routed, Router};
use crate::pipeline::sink::inflight::InFlight;
use crate::pipeline::sink::{Ack, Enqueued, KafkaSink};
use crate::pipeline::source::{ConnectParams, ReplicationConnection};

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
    Setup(#[from] crate::commands::setup::SetupError),
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

/// A table column as pgoutput would describe it.
struct TableColumn {
    name: String,
    type_oid: u32,
    type_modifier: i32,
    type_name: String,
}

/// The table's OID and its published columns, in table order (generated
/// columns are left out, as pgoutput leaves them out).
async fn table_columns(
    client: &Client,
    cfg: &RelayConfig,
) -> Result<(u32, Vec<TableColumn>), BackfillError> {
    let table = &cfg.router.table;
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
        .await
        .map_err(sql(format!("reading the columns of {table}")))?;
    let oid = rows.first().map(|r| r.get::<_, u32>(0)).unwrap_or(0);
    let columns = rows
        .iter()
        .map(|r| TableColumn {
            name: r.get(1),
            type_oid: r.get(2),
            type_modifier: r.get(3),
            type_name: r.get(4),
        })
        .collect();
    Ok((oid, columns))
}

/// Progress: a line redrawn in place on a terminal, plain lines otherwise.
struct Progress {
    terminal: bool,
    every: u64,
    next_line: u64,
    last_draw: Option<Instant>,
    started: Instant,
    total: u64,
}

impl Progress {
    fn new(total: u64, every: u64) -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            every: every.max(1),
            next_line: every.max(1),
            last_draw: None,
            started: Instant::now(),
            total,
        }
    }

    fn text(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        format!(
            "backfill: {done} of {} rows published ({pct:.1}%), {rate:.0} rows/s",
            self.total
        )
    }

    fn update(&mut self, done: u64) {
        if self.terminal {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || done == self.total {
                self.last_draw = Some(Instant::now());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{}\x1b[K", self.text(done));
                let _ = err.flush();
            }
        } else if done >= self.next_line {
            eprintln!("{}", self.text(done));
            while self.next_line <= done {
                self.next_line += self.every;
            }
        }
    }

    fn finish(&mut self, done: u64) {
        if self.terminal {
            self.last_draw = None;
            self.update(done);
            eprintln!();
        } else if !done.is_multiple_of(self.every) || done == 0 {
            eprintln!("{}", self.text(done));
        }
    }
}

/// Runs the backfill; `say` receives one line per step.
pub async fn run(
    cfg: &RelayConfig,
    args: &BackfillArgs,
    say: &mut dyn FnMut(String),
) -> Result<Summary, BackfillError> {
    let started = Instant::now();
    let ack_timeout = Duration::try_from_secs_f64(args.ack_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            BackfillError::Config(format!(
                "--ack-timeout {}: expected a positive number of seconds",
                args.ack_timeout
            ))
        })?;
    let table = cfg.router.table.clone();
    let slot = cfg.slot.clone();
    let (client, _conn) = crate::pg::sql::connect(&cfg.database).await?;

    // Everything that can be checked is checked before the slot exists.
    crate::commands::setup::check_wal_level(&client).await?;
    crate::commands::setup::check_table(&client, cfg).await?;
    if let Some(row) = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '-') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?
    {
        return Err(BackfillError::SlotExists {
            slot,
            confirmed: row.get(0),
        });
    }
    let (rel_oid, columns) = table_columns(&client, cfg).await?;
    let order_idx = columns
        .iter()
        .position(|c| c.name == args.order_column)
        .ok_or_else(|| {
            BackfillError::Config(format!(
                "--order-column {} is not a column of {table}; its columns are: {}",
                args.order_column,
                columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if args.mark_processed && !columns.iter().any(|c| c.name == args.processed_column) {
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
    // The router refuses a table shape it cannot route before anything exists.
    let relation = Relation {
        oid: rel_oid,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: b'd',
        columns: columns
            .iter()
            .map(|c| Column {
                flags: 0,
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
            })
            .collect(),
    };
    let mut router = Router::new(cfg.router.clone());
    router
        .on_relation(&relation)
        .map_err(|e| BackfillError::Config(e.to_string()))?;
    let (sink, mut acks) = KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties)
        .map_err(|e| BackfillError::Config(e.to_string()))?;

    // The publication must exist before the slot: pgoutput looks it up as of
    // each decoded change.
    say(crate::commands::setup::ensure_publication(&client, cfg).await?);

    let (repl, consistent_point, snapshot) = create_slot_with_snapshot(cfg, &slot).await?;
    say(format!(
        "created logical replication slot {slot} (pgoutput) at {consistent_point} with snapshot {snapshot}: rows committed before it are read here, rows committed after it are streamed by `run`"
    ));
    let abort = |what: String| BackfillError::Aborted {
        what,
        slot: slot.clone(),
        consistent_point,
    };

    // The exported snapshot lives while `repl` stays open and idle.
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(|e| abort(format!("importing snapshot {snapshot} failed: {e}")))?;
    let pending: i64 = client
        .query_one(&format!("SELECT count(*) {from_where}"), &[])
        .await
        .map_err(|e| abort(format!("counting the pending rows failed: {e}")))?
        .get(0);
    let pending = pending as u64;
    say(format!(
        "{pending} pending row(s) in {table} where {} (in the slot's snapshot)",
        args.pending_where
    ));
    let select: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    client
        .execute(
            &format!(
                "DECLARE outbox_backfill NO SCROLL CURSOR FOR SELECT {} {from_where} ORDER BY {order_col}",
                select.join(", ")
            ),
            &[],
        )
        .await
        .map_err(|e| abort(format!("opening the cursor failed: {e}")))?;

    let mut progress = Progress::new(pending, args.progress_every);
    let mut acked: u64 = 0;
    // The order value of each record in flight, for errors and
    // --mark-processed.
    let mut in_flight: InFlight<String> = InFlight::default();
    let mut done_values: Vec<String> = Vec::new();
    let max_inflight = cfg.max_inflight.max(1);
    let fetch = format!("FETCH {} FROM outbox_backfill", args.batch_size.max(1));

    // Takes one delivery report; an error aborts.
    async fn take_ack(
        acks: &mut mpsc::UnboundedReceiver<Ack>,
        in_flight: &mut InFlight<String>,
        done_values: Option<&mut Vec<String>>,
        order_column: &str,
        limit: Duration,
    ) -> Result<(), String> {
        let ack = tokio::time::timeout(limit, acks.recv())
            .await
            .map_err(|_| {
                format!(
                    "no delivery report from Kafka within {:.0} s with {} record(s) in flight: check --kafka-brokers and that the brokers are up (--ack-timeout sets the wait)",
                    limit.as_secs_f64(),
                    in_flight.len()
                )
            })?
            .ok_or_else(|| "the Kafka producer stopped".to_string())?;
        let value = in_flight.take(ack.tag).unwrap_or_default();
        match ack.result {
            Ok(_) => {
                if let Some(v) = done_values {
                    v.push(value);
                }
                Ok(())
            }
            Err(e) => Err(format!(
                "delivery of the row with {order_column} = {value} to topic {} failed: {e}",
                ack.topic
            )),
        }
    }

    loop {
        let messages = client
            .simple_query(&fetch)
            .await
            .map_err(|e| abort(format!("reading the pending rows failed: {e}")))?;
        let mut fetched = 0usize;
        for m in messages {
            let SimpleQueryMessage::Row(row) = m else {
                continue;
            };
            fetched += 1;
            // Text format is each type's output function: what pgoutput sends.
            let tuple: Vec<TupleValue> = (0..columns.len())
                .map(|i| match row.get(i) {
                    Some(v) => TupleValue::Text(Bytes::copy_from_slice(v.as_bytes())),
                    None => TupleValue::Null,
                })
                .collect();
            let order_value = row.get(order_idx).unwrap_or("NULL").to_string();
            let insert = Insert {
                relation_oid: rel_oid,
                tuple,
            };
            let rec = match router.route(&insert) {
                Ok(Routed::Record(rec)) => rec,
                // Backfill reads the outbox table itself: its relation is
                // always the outbox.
                Ok(Routed::OtherTable(t)) => {
                    return Err(abort(format!(
                        "the backfill read a row of {t}, not of the outbox table"
                    )))
                }
                Err(e) => {
                    return Err(abort(format!(
                        "the row with {} = {order_value} cannot be published: {e}",
                        args.order_column
                    )))
                }
            };
            while in_flight.len() as u64 >= max_inflight {
                take_ack(
                    &mut acks,
                    &mut in_flight,
                    args.mark_processed.then_some(&mut done_values),
                    &args.order_column,
                    ack_timeout,
                )
                .await
                .map_err(&abort)?;
                acked += 1;
                progress.update(acked);
            }
            loop {
                let tag = in_flight.push(order_value.clone());
                let outcome = sink.enqueue(&rec, tag);
                if matches!(outcome, Ok(Enqueued::Yes)) {
                    break;
                }
                in_flight.undo_push();
                match outcome {
                    Ok(Enqueued::Yes) => unreachable!("handled above"),
                    Ok(Enqueued::QueueFull) if in_flight.is_empty() => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Ok(Enqueued::QueueFull) => {
                        take_ack(
                            &mut acks,
                            &mut in_flight,
                            args.mark_processed.then_some(&mut done_values),
                            &args.order_column,
                            ack_timeout,
                        )
                        .await
                        .map_err(&abort)?;
                        acked += 1;
                        progress.update(acked);
                    }
                    Err(e) => return Err(abort(e.to_string())),
                }
            }
            // Reports that already arrived, without waiting.
            while let Ok(ack) = acks.try_recv() {
                let value = in_flight.take(ack.tag).unwrap_or_default();
                if let Err(e) = ack.result {
                    return Err(abort(format!(
                        "delivery of the row with {} = {value} to topic {} failed: {e}",
                        args.order_column, ack.topic
                    )));
                }
                if args.mark_processed {
                    done_values.push(value);
                }
                acked += 1;
            }
            progress.update(acked);
        }
        if fetched == 0 {
            break;
        }
    }
    while !in_flight.is_empty() {
        take_ack(
            &mut acks,
            &mut in_flight,
            args.mark_processed.then_some(&mut done_values),
            &args.order_column,
            ack_timeout,
        )
        .await
        .map_err(&abort)?;
        acked += 1;
        progress.update(acked);
    }
    progress.finish(acked);
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| abort(format!("closing the snapshot's transaction failed: {e}")))?;
    // The snapshot is no longer needed: the slot stays.
    drop(repl);

    let marked = if args.mark_processed {
        let order_type = &columns[order_idx].type_name;
        Some(mark_processed(&client, cfg, args, order_type, &done_values, say).await?)
    } else {
        None
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

/// Creates the slot over a replication connection of its own, exporting a
/// snapshot that lives while that connection stays open and idle: the slot's
/// consistent point is where the snapshot ends and the stream begins.
async fn create_slot_with_snapshot(
    cfg: &RelayConfig,
    slot: &str,
) -> Result<(ReplicationConnection, Lsn, String), BackfillError> {
    let slot = slot.to_string();
    let params = ConnectParams::from_config(&cfg.database)
        .map_err(|e| BackfillError::Config(e.to_string()))?;
    let mut repl =
        ReplicationConnection::connect(&params)
            .await
            .map_err(|e| BackfillError::CreateSlot {
                slot: slot.clone(),
                reason: e.to_string(),
            })?;
    // The pre-15 spelling: accepted by PostgreSQL 14 to 18.
    let created = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&slot)
        ))
        .await;
    let row = match created {
        Ok(rows) => rows.into_iter().next().unwrap_or_default(),
        Err(e) if e.sqlstate() == Some("42710") => {
            return Err(BackfillError::SlotExists {
                slot,
                confirmed: "-".into(),
            })
        }
        Err(e) => {
            return Err(BackfillError::CreateSlot {
                slot,
                reason: e.to_string(),
            })
        }
    };
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let consistent_point: Lsn = field(1).parse().map_err(|e| BackfillError::CreateSlot {
        slot: slot.clone(),
        reason: format!("unexpected answer to CREATE_REPLICATION_SLOT: {e}"),
    })?;
    let snapshot = field(2);
    Ok((repl, consistent_point, snapshot))
}

/// `--mark-processed`: sets the processed column of every backfilled row,
/// after every record was acknowledged, so the old scheme's "pending" query
/// shows 0.
async fn mark_processed(
    client: &Client,
    cfg: &RelayConfig,
    args: &BackfillArgs,
    order_type: &str,
    done_values: &[String],
    say: &mut dyn FnMut(String),
) -> Result<u64, BackfillError> {
    let table = &cfg.router.table;
    let order_col = quote_ident(&args.order_column);
    let update = format!(
        "UPDATE {} SET {} = now() WHERE {} = ANY($1::text[]::{order_type}[]) AND {} IS NULL",
        table.quoted(),
        quote_ident(&args.processed_column),
        order_col,
        quote_ident(&args.processed_column),
    );
    let mut marked = 0u64;
    for chunk in done_values.chunks(args.batch_size.max(1) as usize) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        marked += client
            .execute(&update, &[&chunk])
            .await
            .map_err(sql(format!(
                "--mark-processed: every row is published, but setting {} failed",
                args.processed_column
            )))?;
    }
    say(format!(
        "marked {marked} backfilled row(s) processed ({} = now())",
        args.processed_column
    ));
    Ok(marked)
}

/// The `backfill` subcommand; returns the exit code (0 done, 1 failed, 2
/// configuration error).
pub async fn command(config: Option<&Path>, args: BackfillArgs) -> u8 {
    let cfg = match crate::config::load(config, args.options.clone(), true) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outbox-relay backfill: configuration error: {e}");
            return 2;
        }
    };
    let mut say = |line: String| println!("{line}");
    match run(&cfg, &args, &mut say).await {
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
        Err(BackfillError::Config(e)) => {
            eprintln!("outbox-relay backfill: {e}");
            2
        }
        Err(e) => {
            eprintln!("outbox-relay backfill: {e}");
            1
        }
    }
}
