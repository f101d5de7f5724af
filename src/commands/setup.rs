//! `outbox-relay setup`: creates the publication and the slot if missing.
//!
//! Idempotent, over an ordinary SQL connection. It checks what the relay
//! needs (wal_level, the table and every configured column) and reports each
//! thing it found or did, so that a DBA can see exactly what changed.

use tokio_postgres::Client;

use crate::config::RelayConfig;
use crate::pg::sql::sql;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Sql(#[from] crate::pg::sql::SqlError),
    #[error("replication slot {slot} exists but uses plugin {plugin:?}; the relay needs pgoutput: drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another --slot")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot {slot} belongs to database {other:?}, not {ours:?}: choose another --slot")]
    WrongDatabase {
        slot: String,
        other: String,
        ours: String,
    },
    #[error("replication slot {slot} is physical; the relay needs a logical slot: choose another --slot")]
    PhysicalSlot { slot: String },
    #[error("--failover needs PostgreSQL 17 or later, which copies failover slots to a physical standby (sync_replication_slots); this server is {version}. Without it a promoted standby has no slot: after a failover run `outbox-relay backfill` on the new primary, or upgrade")]
    FailoverUnsupported { version: String },
    #[error("replication slot {slot} exists without failover, and --failover asks for it: a standby will not keep a copy. Recreate it while no relay runs and nothing is pending (SELECT pg_drop_replication_slot('{slot}'), then setup --failover), or over a replication connection: ALTER_REPLICATION_SLOT {slot} (FAILOVER true)")]
    NotFailover { slot: String },
    #[error(transparent)]
    Objects(#[from] crate::pg::objects::ObjectsError),
}

/// `outbox-relay setup` arguments: the relay's options and how to make the
/// slot.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub options: crate::config::Options,
    /// Create the slot with failover = true (PostgreSQL 17+), so that a physical
    /// standby with sync_replication_slots = on keeps a copy the relay resumes from
    /// after a promotion.
    #[arg(long)]
    pub failover: bool,
}

/// `outbox-relay setup`: says what it found and did, one line each; logs
/// as `--log-format` says.
pub async fn command(config: Option<&std::path::Path>, args: SetupArgs) -> u8 {
    let kind = SlotKind {
        failover: args.failover,
    };
    super::Entry::new("setup", super::Kafka::Optional)
        .with_config(config, args.options, |cfg| async move {
            crate::observe::logging::init(cfg.log_format, "info");
            match run(&cfg, kind).await {
                Ok(lines) => {
                    lines.iter().for_each(|l| println!("{l}"));
                    0
                }
                Err(e) => {
                    tracing::error!("setup failed: {}", super::one_line(&e));
                    1
                }
            }
        })
        .await
}

/// How `setup` creates the slot.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotKind {
    /// `failover = true` (PostgreSQL 17+): synchronised to physical standbys.
    pub failover: bool,
}

/// Opens an ordinary SQL connection (the relay's own, not replication),
/// with the configured TLS.
pub async fn connect(cfg: &RelayConfig) -> Result<Client, SetupError> {
    Ok(crate::pg::sql::connect(&cfg.database).await?.0)
}

/// Runs the setup and returns the lines that explain what it did.
pub async fn run(cfg: &RelayConfig, kind: SlotKind) -> Result<Vec<String>, SetupError> {
    let client = connect(cfg).await?;
    let mut report = Vec::new();

    crate::pg::objects::check_wal_level(&client).await?;
    report.push("wal_level is logical".to_string());

    let tables = crate::pipeline::tables::expand(&client, &cfg.tables)
        .await
        .map_err(sql("finding the tables of the schema patterns"))?;
    for t in &tables {
        crate::pg::objects::check_table(&client, &t.table, &t.referenced_columns()).await?;
        report.push(format!("table {} has every configured column", t.table));
    }
    report.extend(
        crate::pipeline::tables::publish(&client, &cfg.publication, &cfg.tables, &tables).await?,
    );

    report.push(slot(&client, &cfg.slot, kind).await?);
    Ok(report)
}

/// The slot: created, or the existing one checked. The line that says which.
async fn slot(client: &Client, slot: &String, kind: SlotKind) -> Result<String, SetupError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql("reading server_version_num"))?
        .get(0);
    if kind.failover && version < 170000 {
        let v: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(sql("reading server_version"))?
            .get(0);
        return Err(SetupError::FailoverUnsupported { version: v });
    }
    // The failover column exists from PostgreSQL 17.
    let failover_col = if version >= 170000 {
        "failover::text"
    } else {
        "'false'"
    };
    let slot_row = client
        .query_opt(
            &format!(
                "SELECT slot_type, coalesce(plugin, ''), coalesce(database, ''), current_database(),
                        coalesce(confirmed_flush_lsn::text, ''), {failover_col}
                   FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?;
    match slot_row {
        None => {
            let create = if kind.failover {
                // (name, plugin, temporary, two_phase, failover)
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
            } else {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
            };
            let row = client
                .query_one(create, &[slot])
                .await
                .map_err(sql(format!("creating replication slot {slot}")))?;
            let lsn: String = row.get(0);
            Ok(format!(
                "created logical replication slot {slot} (pgoutput{}) at {lsn}: events committed from now on will be published",
                if kind.failover { ", failover" } else { "" }
            ))
        }
        Some(row) => existing(slot, kind, &row),
    }
}

/// A slot of that name exists: it must be a pgoutput slot of this database
/// (and a failover slot when one was asked for).
fn existing(slot: &str, kind: SlotKind, row: &tokio_postgres::Row) -> Result<String, SetupError> {
    let col = |i: usize| -> String { row.get(i) };
    let (slot_type, plugin, db, ours, lsn) = (col(0), col(1), col(2), col(3), col(4));
    let failover = col(5) == "true";
    let slot = slot.to_string();
    if slot_type != "logical" {
        return Err(SetupError::PhysicalSlot { slot });
    }
    if plugin != "pgoutput" {
        return Err(SetupError::WrongPlugin { slot, plugin });
    }
    if db != ours {
        return Err(SetupError::WrongDatabase {
            slot,
            other: db,
            ours,
        });
    }
    if kind.failover && !failover {
        return Err(SetupError::NotFailover { slot });
    }
    Ok(format!(
        "replication slot {slot} exists (pgoutput{}), confirmed up to {lsn}",
        if failover { ", failover" } else { "" }
    ))
}
