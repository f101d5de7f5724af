//! `outbox-relay status`: the replication slot and publication as Postgres
//! sees them, over an ordinary SQL connection (Kafka is not contacted).
//!
//! The slot is the source of truth for how far the relay got: its
//! `confirmed_flush_lsn` is what the relay confirmed after Kafka acknowledged,
//! and its `restart_lsn` is how much WAL the server keeps for it.

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::RelayConfig;
use crate::pg::sql::sql;

/// `outbox-relay status` options: the relay's options (Kafka ones unused)
/// and the output format.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusOptions {
    #[command(flatten)]
    pub options: crate::config::Options,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
}

/// Everything `status` reports. Serialized as one JSON object whose keys are
/// stable; slot fields are `null` when the slot does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The configured slot name.
    pub slot: String,
    pub slot_exists: bool,
    /// `logical` or `physical`.
    pub slot_type: Option<String>,
    pub plugin: Option<String>,
    /// The database the slot belongs to (slots are per database).
    pub slot_database: Option<String>,
    pub active: Option<bool>,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// WAL the server keeps for this slot: current position minus `restart_lsn`.
    pub retained_wal_bytes: Option<i64>,
    /// Current position minus `confirmed_flush_lsn`.
    pub unconfirmed_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot is lost; `null` when
    /// `max_slot_wal_keep_size` is -1 (unlimited).
    pub safe_wal_size: Option<i64>,
    /// Seconds until the server invalidates the slot at the WAL rate
    /// sampled over a second (`max_slot_wal_keep_size`), or until
    /// PostgreSQL 18's `idle_replication_slot_timeout` does while no relay
    /// holds it; `null` when no limit applies. `invalidated_by` names it.
    pub invalidation_in_s: Option<u64>,
    pub invalidated_by: Option<String>,
    /// PostgreSQL 17+: why the slot was invalidated.
    pub invalidation_reason: Option<String>,
    /// The slot's `failover` flag (PostgreSQL 17+; `null` before): a physical
    /// standby with `sync_replication_slots = on` keeps a copy of it.
    pub failover: Option<bool>,
    /// `synced` (PostgreSQL 17+): true on a standby whose copy of the slot is
    /// synchronised from the primary; false on the primary itself.
    pub synced: Option<bool>,
    /// `pg_current_wal_lsn()` when this was read.
    pub current_wal_lsn: String,
    pub publication: String,
    pub publication_exists: bool,
    pub publishes_inserts: Option<bool>,
    /// `FOR ALL TABLES` publication.
    pub publication_all_tables: Option<bool>,
    /// Tables in the publication, `schema.table`, sorted.
    pub publication_tables: Vec<String>,
    /// The configured outbox tables, comma-separated.
    pub table: String,
    /// Whether the publication covers every configured table.
    pub table_published: bool,
    /// The database the connection is on.
    pub database: String,
    /// `server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub server_version: String,
    pub server_version_num: i32,
    /// What the progress topic holds for this slot (the last transaction in
    /// Kafka with exactly-once, the position recorded as confirmable), or
    /// why it could not be read; absent without --kafka-brokers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The other hosts of a multi-host database URL that are standbys, each
    /// with the state of its copy of the slot (PostgreSQL 17+ failover
    /// slots); absent with one host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub standbys: Vec<StandbyCopy>,
}

/// A standby's copy of the slot, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandbyCopy {
    /// `host:port` as the URL names it.
    pub server: String,
    /// `synced` (a promotion now resumes from it), `not persisted`,
    /// `invalidated: <reason>`, `none`, `none: PostgreSQL <version> keeps no
    /// copies` (before 17), or `unreachable: <error>`.
    pub copy: String,
    pub confirmed_flush_lsn: Option<String>,
}

impl StandbyCopy {
    fn from_standby(s: crate::pg::standbys::Standby) -> StandbyCopy {
        use crate::pg::standbys::StandbyState;
        let (copy, confirmed) = match s.state {
            StandbyState::Unreachable(e) => (format!("unreachable: {e}"), None),
            StandbyState::TooOld { version } => {
                (format!("none: PostgreSQL {version} keeps no copies"), None)
            }
            StandbyState::Standby { copy: None, .. } => ("none".to_string(), None),
            StandbyState::Standby { copy: Some(c), .. } => (
                match &c.invalidation_reason {
                    Some(r) => format!("invalidated: {r}"),
                    None if c.usable() => "synced".to_string(),
                    None => "not persisted".to_string(),
                },
                c.confirmed_flush_lsn,
            ),
        };
        StandbyCopy {
            server: s.server,
            copy,
            confirmed_flush_lsn: confirmed,
        }
    }
}

/// Reads the slot, the publication and the server's position.
pub async fn collect(client: &Client, cfg: &RelayConfig) -> Result<Status, StatusError> {
    let server = client
        .query_one(
            "SELECT current_database()::text, current_setting('server_version'),
                    current_setting('server_version_num')::int,
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                          ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(sql("reading the server version and WAL position"))?;
    let database: String = server.get(0);
    let current_wal_lsn: Option<String> = server.get(3);
    let version: i32 = server.get(2);
    // failover and synced exist from PostgreSQL 17.
    let flags = if version >= 170000 {
        "failover, synced"
    } else {
        "NULL::bool, NULL::bool"
    };

    let slot = client
        .query_opt(
            &format!(
                "SELECT slot_type, plugin, database::text, active, active_pid,
                        confirmed_flush_lsn::text, restart_lsn::text,
                        pg_wal_lsn_diff(cur, restart_lsn)::bigint,
                        pg_wal_lsn_diff(cur, confirmed_flush_lsn)::bigint,
                        wal_status, safe_wal_size, {flags}
                   FROM pg_replication_slots,
                        LATERAL (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                             ELSE pg_current_wal_lsn() END AS cur) AS c
                  WHERE slot_name = $1"
            ),
            &[&cfg.slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?;

    let publication = client
        .query_opt(
            "SELECT pubinsert, puballtables FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(sql("reading pg_publication"))?;
    let publication_tables: Vec<String> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables
              WHERE pubname = $1 ORDER BY 1, 2",
            &[&cfg.publication],
        )
        .await
        .map_err(sql("reading pg_publication_tables"))?
        .iter()
        .map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    // pg_publication_tables lists a FOR ALL TABLES publication's tables too;
    // a schema pattern stands for the tables that exist now.
    let tables = crate::pipeline::tables::expand(client, &cfg.tables)
        .await
        .map_err(sql("finding the tables of the schema patterns"))?;
    let table_published = tables
        .iter()
        .all(|t| publication_tables.contains(&t.table.to_string()));

    let headroom = crate::pg::slot_headroom::Headroom::read(client, &cfg.slot)
        .await
        .map_err(sql("reading the slot's headroom"))?;
    let left = match &headroom {
        // The WAL rate is worth a second only when a WAL limit applies.
        Some(h) if h.safe_wal_size.is_some() => {
            let rate =
                crate::pg::slot_headroom::wal_rate(client, std::time::Duration::from_secs(1))
                    .await
                    .map_err(sql("sampling the WAL rate"))?;
            h.time_left(rate)
        }
        Some(h) => h.time_left(None),
        None => None,
    };

    let s = slot.as_ref();
    Ok(Status {
        invalidation_in_s: left.map(|t| t.left.as_secs()),
        invalidated_by: left.map(|t| t.by.to_string()),
        invalidation_reason: headroom.and_then(|h| h.invalidation_reason),
        slot: cfg.slot.clone(),
        slot_exists: slot.is_some(),
        slot_type: s.map(|r| r.get(0)),
        plugin: s.and_then(|r| r.get(1)),
        slot_database: s.and_then(|r| r.get(2)),
        active: s.map(|r| r.get(3)),
        active_pid: s.and_then(|r| r.get(4)),
        confirmed_flush_lsn: s.and_then(|r| r.get(5)),
        restart_lsn: s.and_then(|r| r.get(6)),
        retained_wal_bytes: s.and_then(|r| r.get(7)),
        unconfirmed_bytes: s.and_then(|r| r.get(8)),
        wal_status: s.and_then(|r| r.get(9)),
        safe_wal_size: s.and_then(|r| r.get(10)),
        failover: s.and_then(|r| r.get(11)),
        synced: s.and_then(|r| r.get(12)),
        current_wal_lsn: current_wal_lsn.unwrap_or_default(),
        publication: cfg.publication.clone(),
        publication_exists: publication.is_some(),
        publishes_inserts: publication.as_ref().map(|r| r.get(0)),
        publication_all_tables: publication.as_ref().map(|r| r.get(1)),
        publication_tables,
        table: cfg.table_names(),
        table_published,
        database,
        server_version: server.get(1),
        server_version_num: server.get(2),
        progress: None,
        standbys: Vec::new(),
    })
}

/// Where the progress topic says this slot's events stand in Kafka: beside
/// the slot's confirmed position, what a restart would skip.
pub async fn progress_position(client: &Client, cfg: &RelayConfig) -> Option<String> {
    let topic = cfg.progress_topic.as_ref()?;
    if cfg.kafka_brokers.trim().is_empty() {
        // Exactly-once keeps what Kafka holds there: worth asking for.
        return cfg
            .exactly_once
            .as_ref()
            .map(|_| "not read: pass --kafka-brokers to read the progress topic".into());
    }
    let system_id: String = match client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(err) => {
            return Some(format!(
                "not read: the system identifier is not readable ({err})"
            ))
        }
    };
    let key = crate::pipeline::sink::progress::key(&system_id, &cfg.slot);
    let (brokers, props, t) = (
        cfg.kafka_brokers.clone(),
        cfg.kafka_properties.clone(),
        topic.clone(),
    );
    let read = tokio::task::spawn_blocking(move || {
        crate::pipeline::sink::progress::read_furthest(
            &brokers,
            &props,
            &t,
            &key,
            std::time::Duration::from_secs(10),
        )
    })
    .await;
    Some(match read {
        Ok(Ok(Some(p))) => format!(
            "{} (last transaction in Kafka; positions up to {} recorded as confirmable; in {})",
            p.commit_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "none".into()),
            p.confirmed,
            topic
        ),
        Ok(Ok(None)) => format!("none yet (in {topic})"),
        Ok(Err(err)) => format!("not read: {err}"),
        Err(err) => format!("not read: {err}"),
    })
}

/// `1234567` → `1234567 (1.2 MiB)`; small values stay bare.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n.abs() < 1024 {
        return n.to_string();
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v.abs() < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{n} ({v:.1} {unit})")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn or_dash<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

/// The status as `label  value` lines with aligned values.
pub fn render_table(s: &Status) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    rows.push(("slot", s.slot.clone()));
    if s.slot_exists {
        rows.push(("slot exists", "yes".into()));
        rows.push((
            "slot type",
            format!(
                "{} ({})",
                or_dash(&s.slot_type),
                s.plugin.as_deref().unwrap_or("no plugin")
            ),
        ));
        let db = or_dash(&s.slot_database);
        let db = if s.slot_database.as_deref() == Some(&s.database) || s.slot_database.is_none() {
            db
        } else {
            format!("{db} (not this connection's database {})", s.database)
        };
        rows.push(("slot database", db));
        rows.push((
            "active",
            match s.active {
                Some(true) => "yes".into(),
                Some(false) => "no (no relay is connected)".into(),
                None => "-".into(),
            },
        ));
        rows.push(("active pid", or_dash(&s.active_pid)));
        rows.push(("confirmed flush lsn", or_dash(&s.confirmed_flush_lsn)));
        rows.push(("restart lsn", or_dash(&s.restart_lsn)));
        rows.push(("current wal lsn", s.current_wal_lsn.clone()));
        rows.push((
            "retained wal bytes",
            s.retained_wal_bytes.map_or_else(|| "-".into(), bytes),
        ));
        rows.push((
            "unconfirmed bytes",
            s.unconfirmed_bytes.map_or_else(|| "-".into(), bytes),
        ));
        rows.push(("wal status", or_dash(&s.wal_status)));
        rows.push((
            "safe wal size",
            match s.safe_wal_size {
                Some(n) => bytes(n),
                None => "unlimited (max_slot_wal_keep_size = -1)".into(),
            },
        ));
        rows.push((
            "invalidated in",
            match (
                &s.invalidation_reason,
                s.invalidation_in_s,
                &s.invalidated_by,
            ) {
                (Some(r), _, _) => format!("already: {r}"),
                (None, Some(secs), Some(by)) => format!(
                    "about {} ({by}, at the WAL rate of the last second)",
                    crate::pg::slot_headroom::humanize(std::time::Duration::from_secs(secs))
                ),
                _ => "never (no limit applies, or no WAL is written)".into(),
            },
        ));
        rows.push((
            "failover",
            match (s.failover, s.synced) {
                (None, _) => "- (PostgreSQL 17+)".into(),
                (Some(false), _) => {
                    "no: a standby keeps no copy (outbox-relay setup --failover)".into()
                }
                (Some(true), Some(true)) => {
                    "yes, synced from the primary (this is a standby)".into()
                }
                (Some(true), _) => "yes".into(),
            },
        ));
    } else {
        rows.push((
            "slot exists",
            "no: run `outbox-relay setup` (check --slot and the database in the URL)".into(),
        ));
        rows.push(("current wal lsn", s.current_wal_lsn.clone()));
    }
    rows.push(("publication", s.publication.clone()));
    if s.publication_exists {
        rows.push(("publication exists", "yes".into()));
        rows.push((
            "publishes inserts",
            s.publishes_inserts.map_or("-", yes_no).into(),
        ));
        let tables = if s.publication_all_tables == Some(true) {
            "all tables".to_string()
        } else if s.publication_tables.is_empty() {
            "none".to_string()
        } else {
            s.publication_tables.join(", ")
        };
        rows.push(("publication tables", tables));
    } else {
        rows.push(("publication exists", "no".into()));
    }
    rows.push(("table", s.table.clone()));
    rows.push(("table published", yes_no(s.table_published).into()));
    rows.push(("database", s.database.clone()));
    rows.push(("server version", s.server_version.clone()));
    if let Some(p) = &s.progress {
        rows.push(("progress topic position", p.clone()));
    }
    for c in &s.standbys {
        rows.push((
            "standby copy",
            match &c.confirmed_flush_lsn {
                Some(l) => format!("{}: {} (confirmed up to {l})", c.server, c.copy),
                None => format!("{}: {}", c.server, c.copy),
            },
        ));
    }

    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        out.push_str(&format!("{label:<width$}  {value}\n"));
    }
    out
}

/// Why the relay could not stream from this slot, if it could not: the slot
/// is missing, or belongs to another database (slot names are per cluster).
pub fn slot_problem(s: &Status) -> Option<String> {
    if !s.slot_exists {
        return Some(format!(
            "replication slot {:?} does not exist (database {:?}): run `outbox-relay setup` first, or check --slot and the database in the URL",
            s.slot, s.database
        ));
    }
    match &s.slot_database {
        Some(db) if *db != s.database => Some(format!(
            "replication slot {:?} belongs to database {db:?}, not {:?}: choose another --slot, or put {db} in the URL",
            s.slot, s.database
        )),
        _ => None,
    }
}

/// Opens an ordinary SQL connection, giving up after 10 s unless the URL sets
/// `connect_timeout`.
pub async fn connect(cfg: &RelayConfig) -> Result<Client, StatusError> {
    Ok(crate::pg::sql::connect_within(&cfg.database, std::time::Duration::from_secs(10)).await?)
}

/// `outbox-relay status [--json]`: prints the status to stdout and returns
/// the exit code: 0, or 1 when the slot is missing or unusable, or Postgres
/// cannot be read.
pub async fn command(config: Option<&std::path::Path>, args: StatusOptions) -> u8 {
    super::Entry::new("status", super::Kafka::Optional)
        .with_config(config, args.options, |cfg| async move {
            report(&cfg, args.json).await
        })
        .await
}

/// The status of the configured slot and publication, printed; 1 if the
/// slot is missing.
pub async fn report(cfg: &RelayConfig, json: bool) -> u8 {
    let status = match connect(cfg).await {
        Ok(client) => match collect(&client, cfg).await {
            Ok(mut s) => {
                s.progress = progress_position(&client, cfg).await;
                s.standbys = crate::pg::standbys::standbys(
                    &cfg.database,
                    &cfg.slot,
                    std::time::Duration::from_secs(5),
                )
                .await
                .into_iter()
                .map(StandbyCopy::from_standby)
                .collect();
                Ok(s)
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outbox-relay status: {e}");
            return 1;
        }
    };
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("outbox-relay status: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", render_table(&status));
    }
    match slot_problem(&status) {
        None => 0,
        Some(problem) => {
            eprintln!("outbox-relay status: {problem}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            slot: "outbox_relay".into(),
            slot_exists: true,
            slot_type: Some("logical".into()),
            plugin: Some("pgoutput".into()),
            slot_database: Some("shop".into()),
            active: Some(false),
            active_pid: None,
            confirmed_flush_lsn: Some("0/1A2B3C4".into()),
            restart_lsn: Some("0/1A2B300".into()),
            retained_wal_bytes: Some(3 * 1024 * 1024),
            unconfirmed_bytes: Some(0),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            invalidation_in_s: None,
            invalidated_by: None,
            invalidation_reason: None,
            failover: None,
            synced: None,
            current_wal_lsn: "0/1A2B3C4".into(),
            publication: "outbox_pub".into(),
            publication_exists: true,
            publishes_inserts: Some(true),
            publication_all_tables: Some(false),
            publication_tables: vec!["public.outbox".into()],
            table: "public.outbox".into(),
            table_published: true,
            database: "shop".into(),
            server_version: "15.18".into(),
            server_version_num: 150018,
            progress: None,
            standbys: Vec::new(),
        }
    }

    #[test]
    fn table_is_aligned() {
        let t = render_table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "slot                 outbox_relay");
        assert!(lines.contains(&"unconfirmed bytes    0"), "{t}");
        assert!(
            lines.contains(&"retained wal bytes   3145728 (3.0 MiB)"),
            "{t}"
        );
        assert!(
            lines.contains(&"safe wal size        unlimited (max_slot_wal_keep_size = -1)"),
            "{t}"
        );
        assert!(
            lines.contains(&"active               no (no relay is connected)"),
            "{t}"
        );
    }

    #[test]
    fn json_keys_are_snake_case_and_stable() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["retained_wal_bytes"], 3145728);
        assert_eq!(v["unconfirmed_bytes"], 0);
        assert_eq!(v["safe_wal_size"], serde_json::Value::Null);
        assert_eq!(v["publication_tables"][0], "public.outbox");
    }
}
