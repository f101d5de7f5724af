//! Recovering a lost slot (`outbox-relay recover`, `run --recover-slot`):
//! a new slot after the old one was lost
//! (invalidated, dropped, missing after a restore or a failover), and the
//! events of the gap published from the outbox table.
//!
//! Why this loses nothing and, under exactly-once, repeats nothing:
//!
//! 1. The slot is created with an exported snapshot
//!    (`CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`). Every transaction
//!    committed before the slot's consistent point is in the snapshot; every
//!    one after it is streamed by `run` from the new slot. So the events the
//!    lost slot never delivered are, if their rows are still there, rows of
//!    the snapshot.
//! 2. What Kafka holds is read back read_committed, after the relay's
//!    transactional producer was fenced (`init_transactions` aborts what it
//!    left open), from the last transaction the progress topic records in
//!    Kafka minus `--look-back` (transactions still open when it committed
//!    may have smaller order values). Records of an aborted transaction are
//!    not "in Kafka": their rows are published again, which is right.
//! 3. The rows compared are bounded by the order column: from the first row
//!    of that window that is still in the table. A row of the snapshot whose
//!    `id` is not among the records read is published, in `--order-column`
//!    order (commit order per aggregate, as `backfill` publishes), through
//!    the same router as `run`. Under exactly-once they go out in one Kafka
//!    transaction together with a progress record at the new slot.
//! 4. The new progress record (a later epoch) is what lets `run` start on a
//!    slot behind or ahead of the old record without taking either for
//!    "already delivered".
//!
//! When the table no longer holds any event of that window (a retention
//! shorter than the gap deleted them), recover cannot tell which events
//! between the last one in Kafka and the oldest row left were deleted
//! unpublished: it publishes what is there, names the range it cannot
//! vouch for, and exits 1.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::pipeline::settings::RelayConfig;

pub mod settings;
use crate::lsn::Lsn;
use crate::observe::progress_line::ProgressLine;
use crate::pg::quote_ident;
use crate::pg::sql::sql;
use crate::pipeline::route::router::{Routed, Router, RouterConfig};
use crate::pipeline::sink::progress::{self, Progress, ProgressError};
use crate::pipeline::sink::publisher::Publisher;
use crate::pipeline::sink::read_back::{read_topics, ReadBackError, TopicSelection};
use crate::pipeline::sink::KafkaSink;
use crate::pipeline::source::table_rows::TableShape;
use crate::pipeline::source::{ConnectParams, ReplicationConnection};
pub use settings::RecoverSettings;

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("replication slot {slot} is usable (wal_status {wal_status}, confirmed up to {confirmed}): there is nothing to recover, `outbox-relay run` streams from it. If a recover was interrupted after creating it, drop it (SELECT pg_drop_replication_slot('{slot}');) and run recover again")]
    SlotUsable {
        slot: String,
        wal_status: String,
        confirmed: String,
    },
    #[error("replication slot {slot} is missing and the progress topic has no record of a relay on it: if this is a new installation, run `outbox-relay setup`; if the relay did run on it (without a progress topic, or with another one), run `outbox-relay recover` by hand")]
    NeverRan { slot: String },
    #[error("another recover of replication slot {slot} is running (it holds the advisory lock): wait for it")]
    Running { slot: String },
    #[error("replication slot {slot} is in use by the process with PID {pid}: stop the relay first (recover replaces the slot)")]
    SlotActive { slot: String, pid: i32 },
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    ReadBack(#[from] ReadBackError),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("cannot create the replication slot {slot}: {reason}")]
    CreateSlot { slot: String, reason: String },
    #[error("{what}. The new slot {slot} was dropped again: fix the cause and run recover again (nothing it published is published twice: it compares with Kafka first)")]
    Aborted { what: String, slot: String },
}

/// What a recovery did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub slot: String,
    pub consistent_point: Lsn,
    /// Rows of the snapshot compared with Kafka.
    pub examined: u64,
    /// Of those, already in Kafka.
    pub in_kafka: u64,
    /// Published now (acknowledged).
    pub published: u64,
    /// Ranges that may have been deleted before they were published, one
    /// sentence each; non-empty means exit 1.
    pub unrecoverable: Vec<String>,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row(s) compared, {} already in Kafka, {} published in {:.1} s; slot {} starts at {}",
            self.examined,
            self.in_kafka,
            self.published,
            self.elapsed.as_secs_f64(),
            self.slot,
            self.consistent_point
        )
    }
}

impl RecoverError {
    /// Nothing to recover, or not now: the operator's call, not a failure.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RecoverError::Config(_)
                | RecoverError::SlotUsable { .. }
                | RecoverError::SlotActive { .. }
                | RecoverError::Running { .. }
                | RecoverError::NeverRan { .. }
        )
    }
}

/// The old slot, as `pg_replication_slots` shows it.
struct OldSlot {
    active_pid: Option<i32>,
    confirmed: Option<String>,
    wal_status: Option<String>,
    invalidation_reason: Option<String>,
}

impl OldSlot {
    async fn read(client: &Client, slot: &str) -> Result<Option<OldSlot>, RecoverError> {
        // to_jsonb: invalidation_reason is PostgreSQL 17+, conflicting 16+.
        let row = client
            .query_opt(
                "SELECT active_pid, confirmed_flush_lsn::text, wal_status,
                        coalesce(to_jsonb(s)->>'invalidation_reason',
                                 CASE WHEN (to_jsonb(s)->>'conflicting')::bool THEN 'conflicting' END)
                   FROM pg_replication_slots s WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql("reading pg_replication_slots"))?;
        Ok(row.map(|r| OldSlot {
            active_pid: r.get(0),
            confirmed: r.get(1),
            wal_status: r.get(2),
            invalidation_reason: r.get(3),
        }))
    }

    fn lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }
}

/// Microseconds since 2000-01-01 (Postgres) to milliseconds since 1970.
fn unix_ms(pg_micros: i64) -> i64 {
    (pg_micros + crate::pipeline::decode::pgoutput::PG_EPOCH_OFFSET_SECS * 1_000_000) / 1000
}

/// A Postgres timestamp (µs since 2000) as the server writes it.
async fn pg_time_text(client: &Client, micros: i64) -> String {
    client
        .query_one(
            "SELECT (timestamptz '2000-01-01 00:00:00+00' + $1::bigint * interval '1 microsecond')::text",
            &[&micros],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|_| micros.to_string())
}

/// Runs the recovery; `say` receives one line per step.
pub async fn run(
    cfg: &RelayConfig,
    args: &RecoverSettings,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<Summary, RecoverError> {
    if cfg.table_picked {
        return Err(RecoverError::Config(format!(
            "--table {} picks one of the config file's [[tables]] sections, but the new slot serves every table: recover them all (remove --table)",
            cfg.table_names()
        )));
    }
    let started = Instant::now();
    let (look_back, ack_timeout, read_timeout) =
        (args.look_back, args.ack_timeout, args.read_timeout);
    let slot = cfg.slot.clone();
    let (client, _conn) = crate::pg::sql::connect(&cfg.database).await?;

    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(sql("reading the system identifier"))?
        .get(0);
    let key = progress::key(&system_id, &slot);
    let eos_id = cfg
        .exactly_once
        .as_ref()
        .map(|e| e.transactional_id(&system_id, &slot));
    // One recover of a slot at a time (relays with --recover-slot may all
    // try): held by this connection until it ends, so a killed recover
    // lets go of it. Holding it is also what makes a slot found under an
    // unfinished recover's record that one's leftover, safe to drop.
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('outbox-relay recover ' || $1, 0))",
            &[&slot],
        )
        .await
        .map_err(sql("taking the recover's advisory lock"))?
        .get(0);
    if !locked {
        return Err(RecoverError::Running { slot });
    }
    // The old slot first without Kafka: a relay on it, or a usable slot,
    // is refused before anything is fenced or written.
    let old = OldSlot::read(&client, &slot).await?;
    if let Some(OldSlot {
        active_pid: Some(pid),
        ..
    }) = old
    {
        return Err(RecoverError::SlotActive { slot, pid });
    }
    let (sink, acks) = match &eos_id {
        Some(id) => KafkaSink::transactional(&cfg.kafka_brokers, &cfg.kafka_properties, id),
        None => KafkaSink::new(&cfg.kafka_brokers, &cfg.kafka_properties),
    }
    .map_err(|e| RecoverError::Config(e.to_string()))?;
    let recorded = match &cfg.progress_topic {
        Some(topic) => {
            progress::ensure_topic(&cfg.kafka_brokers, &cfg.kafka_properties, topic).await?;
            let (brokers, props, topic, key) = (
                cfg.kafka_brokers.clone(),
                cfg.kafka_properties.clone(),
                topic.clone(),
                key.clone(),
            );
            tokio::task::spawn_blocking(move || {
                progress::read_furthest_written(&brokers, &props, &topic, &key, read_timeout)
            })
            .await
            .map_err(|e| RecoverError::Kafka(e.to_string()))??
        }
        None => None,
    };
    let (recorded, written_at) = match recorded {
        Some((p, at)) => (Some(p), at),
        None => (None, None),
    };
    if args.only_after_a_relay && recorded.is_none() {
        return Err(RecoverError::NeverRan { slot });
    }
    let interrupted = recorded.as_ref().is_some_and(|p| p.recovering);
    match old {
        None => say(format!(
            "replication slot {slot} does not exist: the events committed since the last one in Kafka are published from the table"
        )),
        Some(old) if old.lost() || interrupted => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(sql(format!("dropping the slot {slot}")))?;
            say(if interrupted {
                format!("dropped replication slot {slot}: an earlier recover created it and did not finish")
            } else {
                format!(
                    "dropped replication slot {slot}: it was invalidated ({}) and can never stream again",
                    old.invalidation_reason
                        .or(old.wal_status)
                        .unwrap_or_else(|| "lost".into())
                )
            });
        }
        Some(old) => {
            return Err(RecoverError::SlotUsable {
                slot,
                wal_status: old.wal_status.unwrap_or_else(|| "-".into()),
                confirmed: old.confirmed.unwrap_or_else(|| "-".into()),
            })
        }
    }
    if let Some(id) = &eos_id {
        // Fences a relay of this id still running somewhere and aborts what
        // it left open: nothing of it can become visible behind the read.
        sink.init_transactions(Duration::from_secs(60))
            .await
            .map_err(|e| RecoverError::Kafka(format!("registering transactional.id {id}: {e}")))?;
    }
    let since = match recorded.as_ref().and_then(|p| p.anchor) {
        Some(a) => {
            let since = unix_ms(a.commit_time) - look_back.as_millis() as i64;
            say(format!(
                "the last transaction in Kafka committed at {} (commit LSN {}): reading the topics back from {} s before it",
                pg_time_text(&client, a.commit_time).await,
                a.commit_lsn,
                look_back.as_secs()
            ));
            Some(since)
        }
        // At-least-once records name no transaction, but one was written
        // after everything up to its position was delivered.
        None => match written_at.filter(|_| recorded.is_some()) {
            Some(at) => {
                say(format!(
                    "the progress record confirming {} was written at {} ms since the epoch: reading the topics back from {} s before it",
                    recorded.as_ref().map_or(Lsn(0), |p| p.confirmed),
                    at,
                    look_back.as_secs()
                ));
                Some(at - look_back.as_millis() as i64)
            }
            None => {
                say("no progress record: the topics are read back whole".into());
                None
            }
        },
    };
    let mut publisher = Publisher::new(
        (sink, acks),
        &args.order_column,
        false,
        ack_timeout,
        cfg.max_inflight,
        ProgressLine::new("recover", None, args.progress_every),
    );
    // Said before the slot exists: a relay that finds this record refuses
    // to stream, and a recover run again knows the slot it finds is the
    // unfinished one's. It keeps the old record's last transaction, so a
    // recover run again reads back the same window.
    let marker = match (&cfg.progress_topic, &recorded) {
        (Some(topic), recorded) => {
            let mut p = recorded.clone().unwrap_or(Progress {
                commit_lsn: None,
                anchor: None,
                timeline: None,
                epoch: 0,
                transactional_id: None,
                recovering: false,
                confirmed: Lsn(0),
            });
            if !p.recovering {
                p.epoch += 1;
            }
            p.recovering = true;
            p.transactional_id = eos_id.clone();
            write_record(
                &mut publisher,
                eos_id.is_some(),
                topic,
                &key,
                &progress::value(&p, &system_id, &slot),
            )
            .await
            .map_err(RecoverError::Kafka)?;
            Some(p)
        }
        (None, _) => None,
    };

    // The new slot and its snapshot. From here on a failure drops the slot
    // again, so that recover can simply be run again.
    let params = ConnectParams::from_config(&cfg.database)
        .map_err(|e| RecoverError::Config(e.to_string()))?;
    let create = |reason: String| RecoverError::CreateSlot {
        slot: slot.clone(),
        reason,
    };
    let mut repl = ReplicationConnection::connect(&params)
        .await
        .map_err(|e| create(e.to_string()))?;
    let system = repl
        .identify_system()
        .await
        .map_err(|e| create(e.to_string()))?;
    let (consistent_point, snapshot) = repl
        .create_slot_exporting_snapshot(&slot)
        .await
        .map_err(|e| create(e.to_string()))?;
    say(format!(
        "created logical replication slot {slot} (pgoutput) at {consistent_point}: rows committed before it are compared with Kafka here, rows committed after it are streamed by `run`"
    ));
    let mut summary = Summary {
        slot: slot.clone(),
        consistent_point,
        ..Summary::default()
    };
    let done = async {
        if eos_id.is_some() {
            publisher
                .sink()
                .begin_transaction()
                .map_err(|e| e.to_string())?;
        }
        crate::pipeline::source::table_rows::import_snapshot(&client, &snapshot).await?;
        let tables = crate::pipeline::tables::expand(&client, &cfg.tables)
            .await
            .map_err(|e| format!("listing the tables in the slot's snapshot failed: {e}"))?;
        let mut router = Router::new(cfg.tables.clone());
        for t in &tables {
            recover_table(
                cfg,
                args,
                &client,
                t,
                since,
                read_timeout,
                &mut router,
                &mut publisher,
                &mut summary,
                say,
            )
            .await?;
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| format!("closing the snapshot's transaction failed: {e}"))?;
        publisher.settle().await?;
        if let (Some(topic), Some(marker)) = (&cfg.progress_topic, &marker) {
            // A later epoch than any record of the lost slot: `run` takes
            // the new slot's position as what Kafka holds, wherever the old
            // record points.
            let record = Progress {
                commit_lsn: None,
                anchor: None,
                timeline: Some(system.timeline),
                epoch: marker.epoch + 1,
                transactional_id: eos_id.clone(),
                recovering: false,
                confirmed: consistent_point,
            };
            publisher
                .record(topic, &key, &progress::value(&record, &system_id, &slot))
                .await?;
        }
        if eos_id.is_some() {
            commit(&publisher).await?;
        }
        Ok::<_, String>(())
    }
    .await;
    drop(repl);
    if let Err(what) = done {
        let _ = client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        return Err(RecoverError::Aborted { what, slot });
    }
    let published = publisher
        .finish()
        .await
        .map_err(|what| RecoverError::Aborted {
            what,
            slot: slot.clone(),
        })?;
    summary.published = published.acked;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Starts the transaction that reads every table in the slot's snapshot.
/// Writes a progress record and waits for it: under exactly-once in a Kafka
/// transaction of its own.
async fn write_record(
    publisher: &mut Publisher<'_>,
    transactional: bool,
    topic: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), String> {
    if transactional {
        publisher
            .sink()
            .begin_transaction()
            .map_err(|e| e.to_string())?;
    }
    publisher.record(topic, key, value).await?;
    if transactional {
        commit(publisher).await?;
    }
    Ok(())
}

async fn commit(publisher: &Publisher<'_>) -> Result<(), String> {
    publisher
        .sink()
        .commit_transaction(Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// One table: what Kafka holds of it, the first row of that still in the
/// table, and every row from there on that Kafka lacks, published.
#[allow(clippy::too_many_arguments)]
async fn recover_table(
    cfg: &RelayConfig,
    args: &RecoverSettings,
    client: &Client,
    mapping: &RouterConfig,
    since: Option<i64>,
    read_timeout: Duration,
    router: &mut Router,
    publisher: &mut Publisher<'_>,
    summary: &mut Summary,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), String> {
    let table = &mapping.table;
    let shape = TableShape::read(client, table)
        .await
        .map_err(|e| format!("reading the columns of {table} failed: {e}"))?;
    let order_idx = shape.position(&args.order_column).ok_or_else(|| {
        format!(
            "--order-column {} is not a column of {table}; its columns are: {}",
            args.order_column,
            shape.names()
        )
    })?;
    router
        .on_relation(&shape.relation())
        .map_err(|e| e.to_string())?;
    let selection = match mapping.topic.fixed() {
        Some(t) => TopicSelection::Names([t.to_string()].into()),
        None => TopicSelection::Matching(mapping.topic.clone()),
    };
    let order = quote_ident(&args.order_column);
    let id = quote_ident(&mapping.id_column);
    let order_type = &shape.columns[order_idx].type_name;

    // What Kafka holds since the window's start, and the first of it still
    // in the table. Without one there (this table had no event in the
    // window), the topics are read whole.
    let mut window = since;
    let (in_kafka, first) = loop {
        let in_kafka = read_ids(cfg, &selection, window, read_timeout).await?;
        let ids: Vec<&str> = in_kafka.iter().map(String::as_str).collect();
        let first: Option<String> = client
            .query_one(
                &format!(
                    "SELECT min({order})::text FROM {} WHERE {id}::text = ANY($1)",
                    table.quoted()
                ),
                &[&ids],
            )
            .await
            .map_err(|e| format!("finding the events of {table} that are in Kafka failed: {e}"))?
            .get(0);
        if first.is_some() || window.is_none() {
            break (in_kafka, first);
        }
        window = None;
    };
    let from_where = match &first {
        Some(first) => format!(
            "FROM {} WHERE {order} >= '{}'::{order_type}",
            table.quoted(),
            first.replace('\'', "''")
        ),
        None => format!("FROM {}", table.quoted()),
    };
    if first.is_none() && !in_kafka.is_empty() {
        let oldest: Option<String> = client
            .query_one(
                &format!("SELECT min({order})::text FROM {}", table.quoted()),
                &[],
            )
            .await
            .map_err(|e| format!("reading the oldest row of {table} failed: {e}"))?
            .get(0);
        summary.unrecoverable.push(match oldest {
            Some(oldest) => format!(
                "{table}: none of the {} events Kafka holds is in the table any more, so events committed after the last of them and before the oldest row left ({} = {oldest}) may have been deleted before they were published: rows with {} < {oldest} that are not in Kafka cannot be recovered",
                in_kafka.len(), args.order_column, args.order_column
            ),
            None => format!(
                "{table}: the table is empty and none of the {} events Kafka holds is in it: events committed after the last of them may have been deleted before they were published, and cannot be recovered",
                in_kafka.len()
            ),
        });
    }
    let select = shape.select_list();
    client
        .execute(
            &format!("DECLARE outbox_recover NO SCROLL CURSOR FOR SELECT {select} {from_where} ORDER BY {order}"),
            &[],
        )
        .await
        .map_err(|e| format!("reading {table} failed: {e}"))?;
    let (mut examined, mut present) = (0u64, 0u64);
    let fetch = format!("FETCH {} FROM outbox_recover", args.batch_size.max(1));
    loop {
        let messages = client
            .simple_query(&fetch)
            .await
            .map_err(|e| format!("reading the rows of {table} failed: {e}"))?;
        let mut fetched = 0;
        for m in messages {
            let SimpleQueryMessage::Row(row) = m else {
                continue;
            };
            fetched += 1;
            examined += 1;
            let order_value = row.get(order_idx).unwrap_or("NULL").to_string();
            let rec = match router.route(&shape.insert(&row)) {
                Ok(Routed::Record(rec)) => rec,
                Ok(Routed::OtherTable(t)) => {
                    return Err(format!("recover read a row of {t}, not of an outbox table"))
                }
                Err(e) => {
                    return Err(format!(
                        "the row of {table} with {} = {order_value} cannot be published: {e}",
                        args.order_column
                    ))
                }
            };
            if in_kafka.contains(String::from_utf8_lossy(&rec.event_id).as_ref()) {
                present += 1;
                continue;
            }
            publisher.publish(&rec, order_value).await?;
        }
        if fetched == 0 {
            break;
        }
    }
    client
        .batch_execute("CLOSE outbox_recover")
        .await
        .map_err(|e| format!("closing the cursor failed: {e}"))?;
    say(format!(
        "{table}: {examined} row(s) compared from {}, {present} already in Kafka, {} published",
        match &first {
            Some(f) => format!("{} = {f}", args.order_column),
            None => "the table's start".into(),
        },
        examined - present
    ));
    summary.examined += examined;
    summary.in_kafka += present;
    Ok(())
}

/// The event ids (`id` headers) the table's topics hold, read_committed.
async fn read_ids(
    cfg: &RelayConfig,
    selection: &TopicSelection,
    since: Option<i64>,
    timeout: Duration,
) -> Result<HashSet<String>, String> {
    let (brokers, props, selection) = (
        cfg.kafka_brokers.clone(),
        cfg.kafka_properties.clone(),
        selection.clone(),
    );
    let snapshot = tokio::task::spawn_blocking(move || {
        read_topics(&brokers, &props, &selection, since, timeout)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(snapshot
        .records
        .iter()
        .filter_map(|r| r.event_id())
        .collect())
}
