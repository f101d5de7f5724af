//! The gap's events: each table compared, in the slot's snapshot, with what
//! Kafka holds of its topics since the window's start, and every row whose
//! event Kafka lacks published in `--order-column` order.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::lsn::Lsn;
use crate::pg::quote_ident;
use crate::pipeline::route::router::{Routed, Router, RouterConfig, TableName};
use crate::pipeline::settings::RelayConfig;
use crate::pipeline::sink::progress::Progress;
use crate::pipeline::sink::publisher::Publisher;
use crate::pipeline::sink::read_back::{read_topics, TopicSelection};
use crate::pipeline::source::table_rows::TableShape;

use super::records::{commit, recovered, Names};
use super::{RecoverSettings, Summary};

/// The gap's events published from the tables as the slot's snapshot shows
/// them.
pub(super) struct Gap<'a> {
    pub(super) cfg: &'a RelayConfig,
    pub(super) args: &'a RecoverSettings,
    pub(super) client: &'a Client,
    /// Where the topics are read back from (`read_back_from`).
    pub(super) since: Option<i64>,
    pub(super) names: &'a Names,
}

impl Gap<'_> {
    /// Every table compared with Kafka in the snapshot, what Kafka lacks
    /// published and acknowledged (under exactly-once in the Kafka
    /// transaction begun here).
    pub(super) async fn publish(
        &self,
        snapshot: &str,
        publisher: &mut Publisher<'_>,
        summary: &mut Summary,
        say: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), String> {
        let (cfg, client) = (self.cfg, self.client);
        if cfg.exactly_once.is_some() {
            publisher
                .sink()
                .begin_transaction()
                .map_err(|e| e.to_string())?;
        }
        crate::pipeline::source::table_rows::import_snapshot(client, snapshot).await?;
        let tables = crate::pipeline::tables::expand(client, &cfg.tables)
            .await
            .map_err(|e| format!("listing the tables in the slot's snapshot failed: {e}"))?;
        let mut router = Router::new(cfg.tables.clone());
        for t in &tables {
            recover_table(self, t, &mut router, publisher, summary, say).await?;
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| format!("closing the snapshot's transaction failed: {e}"))?;
        publisher.settle().await
    }

    /// Once every event of the gap is acknowledged: the record of the new
    /// slot (`recovered`), and under exactly-once the commit of the Kafka
    /// transaction that holds them all.
    pub(super) async fn close(
        &self,
        publisher: &mut Publisher<'_>,
        marker: Option<&Progress>,
        timeline: u32,
        consistent_point: Lsn,
    ) -> Result<(), String> {
        if let (Some(topic), Some(marker)) = (&self.cfg.progress_topic, marker) {
            let record = recovered(marker, timeline, consistent_point);
            let value = self.names.value(&record);
            publisher.record(topic, &self.names.key, &value).await?;
        }
        if self.names.eos_id.is_some() {
            commit(publisher).await?;
        }
        Ok(())
    }
}

/// One table: what Kafka holds of it, the first row of that still in the
/// table, and every row from there on that Kafka lacks, published.
#[allow(clippy::too_many_arguments)]
pub(super) async fn recover_table(
    gap: &Gap<'_>,
    mapping: &RouterConfig,
    router: &mut Router,
    publisher: &mut Publisher<'_>,
    summary: &mut Summary,
    say: &mut (dyn FnMut(String) + Send),
) -> Result<(), String> {
    let (args, client) = (gap.args, gap.client);
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
    let order = quote_ident(&args.order_column);
    let order_type = &shape.columns[order_idx].type_name;
    let (in_kafka, first) = in_kafka(gap, mapping).await?;
    let from_where = match &first {
        Some(first) => format!(
            "FROM {} WHERE {order} >= '{}'::{order_type}",
            table.quoted(),
            first.replace('\'', "''")
        ),
        None => format!("FROM {}", table.quoted()),
    };
    if first.is_none() && !in_kafka.is_empty() {
        summary
            .unrecoverable
            .push(unrecoverable(gap, table, in_kafka.len()).await?);
    }
    let select = shape.select_list();
    client
        .execute(
            &format!("DECLARE outbox_recover NO SCROLL CURSOR FOR SELECT {select} {from_where} ORDER BY {order}"),
            &[],
        )
        .await
        .map_err(|e| format!("reading {table} failed: {e}"))?;
    let rows = Rows {
        table,
        shape: &shape,
        order_idx,
        in_kafka: &in_kafka,
    };
    let (examined, present) = rows.publish_missing(gap, router, publisher).await?;
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

/// What Kafka holds of the table's topics since the window's start, and
/// the first of it still in the table. Without one there (this table had
/// no event in the window), the topics are read whole.
pub(super) async fn in_kafka(
    gap: &Gap<'_>,
    mapping: &RouterConfig,
) -> Result<(HashSet<String>, Option<String>), String> {
    let table = &mapping.table;
    let selection = match mapping.topic.fixed() {
        Some(t) => TopicSelection::Names([t.to_string()].into()),
        None => TopicSelection::Matching(mapping.topic.clone()),
    };
    let order = quote_ident(&gap.args.order_column);
    let id = quote_ident(&mapping.id_column);
    let mut window = gap.since;
    loop {
        let in_kafka = read_ids(gap.cfg, &selection, window, gap.args.read_timeout).await?;
        let ids: Vec<&str> = in_kafka.iter().map(String::as_str).collect();
        let first: Option<String> = gap
            .client
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
            return Ok((in_kafka, first));
        }
        window = None;
    }
}

/// None of the events Kafka holds is in the table any more: what cannot be
/// vouched for, in words.
pub(super) async fn unrecoverable(
    gap: &Gap<'_>,
    table: &TableName,
    held: usize,
) -> Result<String, String> {
    let order_column = &gap.args.order_column;
    let oldest: Option<String> = gap
        .client
        .query_one(
            &format!(
                "SELECT min({})::text FROM {}",
                quote_ident(order_column),
                table.quoted()
            ),
            &[],
        )
        .await
        .map_err(|e| format!("reading the oldest row of {table} failed: {e}"))?
        .get(0);
    Ok(match oldest {
        Some(oldest) => format!(
            "{table}: none of the {held} events Kafka holds is in the table any more, so events committed after the last of them and before the oldest row left ({order_column} = {oldest}) may have been deleted before they were published: rows with {order_column} < {oldest} that are not in Kafka cannot be recovered"
        ),
        None => format!(
            "{table}: the table is empty and none of the {held} events Kafka holds is in it: events committed after the last of them may have been deleted before they were published, and cannot be recovered"
        ),
    })
}

/// The rows of the cursor `outbox_recover`, and what Kafka holds of them.
pub(super) struct Rows<'a> {
    table: &'a TableName,
    shape: &'a TableShape,
    order_idx: usize,
    in_kafka: &'a HashSet<String>,
}

impl Rows<'_> {
    /// Publishes each row whose event Kafka does not hold, in the cursor's
    /// order; how many rows were examined, and how many were in Kafka.
    pub(super) async fn publish_missing(
        &self,
        gap: &Gap<'_>,
        router: &mut Router,
        publisher: &mut Publisher<'_>,
    ) -> Result<(u64, u64), String> {
        let table = self.table;
        let (mut examined, mut present) = (0u64, 0u64);
        let fetch = format!("FETCH {} FROM outbox_recover", gap.args.batch_size.max(1));
        loop {
            let messages = gap
                .client
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
                let order_value = row.get(self.order_idx).unwrap_or("NULL").to_string();
                let rec = match router.route(&self.shape.insert(&row)) {
                    Ok(Routed::Record(rec)) => rec,
                    Ok(Routed::OtherTable(t)) => {
                        return Err(format!("recover read a row of {t}, not of an outbox table"))
                    }
                    Err(e) => {
                        return Err(format!(
                            "the row of {table} with {} = {order_value} cannot be published: {e}",
                            gap.args.order_column
                        ))
                    }
                };
                if self
                    .in_kafka
                    .contains(String::from_utf8_lossy(&rec.event_id).as_ref())
                {
                    present += 1;
                    continue;
                }
                publisher.publish(&rec, order_value).await?;
            }
            if fetched == 0 {
                return Ok((examined, present));
            }
        }
    }
}

/// The event ids (`id` headers) the table's topics hold, read_committed.
pub(super) async fn read_ids(
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
