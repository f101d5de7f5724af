//! Postgres of the stack: connections, the per-scenario databases, replication slots
//! and WAL positions, and the `pg_recvlogical` baseline command. Nothing here knows
//! about Kafka or the relay, so the scenarios can pair the two however they measure.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_postgres::{Client, NoTls};

use super::Cfg;

const CLASSIC_TABLE: &str = include_str!("../../sql/01_outbox_classic.sql");

pub(crate) fn parse_lsn(s: &str) -> Result<u64> {
    let (hi, lo) = s.split_once('/').ok_or_else(|| anyhow!("bad LSN {s}"))?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

pub(crate) fn fmt_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

pub(crate) fn db_url(admin: &str, db: &str) -> String {
    match admin.rfind('/') {
        Some(i) => format!("{}/{db}", &admin[..i]),
        None => panic!("database URL must end in /dbname: {admin}"),
    }
}

/// tokio-postgres errors print as "db error"; keep the server's message.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> anyhow::Error {
    match e.as_db_error() {
        Some(db) => anyhow!("{}: {}", db.severity(), db.message()),
        None => anyhow!(e),
    }
}

pub(crate) async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A fresh database with the classic outbox table; returns its URL.
pub(crate) async fn fresh_db(cfg: &Cfg, name: &str) -> Result<String> {
    let admin = connect(&cfg.a.database_url).await?;
    for sql in [
        format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{name}' AND NOT active"),
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).await.map_err(pg_err).with_context(|| sql.clone())?;
    }
    let url = db_url(&cfg.a.database_url, name);
    connect(&url).await?.batch_execute(CLASSIC_TABLE).await?;
    Ok(url)
}

pub(crate) async fn drop_slots(url: &str) -> Result<()> {
    let c = connect(url).await?;
    c.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.batch_execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = current_database()",
    )
    .await?;
    Ok(())
}

pub(crate) async fn current_wal(c: &Client) -> Result<u64> {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    parse_lsn(&s)
}

pub(crate) async fn confirmed(c: &Client, slot: &str) -> Result<u64> {
    let s: String = c
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?
        .get(0);
    parse_lsn(&s)
}

/// `pg_recvlogical` streaming slot `bench_recvlogical` of the database at `url` with
/// pgoutput over `outbox_pub`, as the relay would; callers add where it stops and
/// where its output goes.
pub(crate) fn recvlogical(cfg: &Cfg, url: &str) -> Command {
    let mut c = Command::new(cfg.a.pg_bin_dir.join("pg_recvlogical"));
    c.args([
        "-d",
        &conninfo(url),
        "-S",
        "bench_recvlogical",
        "--start",
        "-P",
        "pgoutput",
    ])
    .args([
        "-o",
        "proto_version=1",
        "-o",
        "publication_names=outbox_pub",
    ])
    .stdout(Stdio::null());
    c
}

/// A libpq keyword/value string for pg_recvlogical from the stack's URL.
pub(crate) fn conninfo(url: &str) -> String {
    match conninfo_parts(url) {
        Ok((user, host, port, db)) => format!("host={host} port={port} user={user} dbname={db}"),
        Err(e) => panic!("{e}"),
    }
}

/// (user, host, port, database) of the stack's `postgres://user@host:port/db` URL.
pub(crate) fn conninfo_parts(url: &str) -> Result<(String, String, String, String)> {
    let u = url
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let bad = || anyhow!("expected postgres://user@host:port/db, got {url}");
    let (userhost, db) = u.split_once('/').ok_or_else(bad)?;
    let (user, hostport) = userhost.split_once('@').ok_or_else(bad)?;
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    Ok((user.into(), host.into(), port.into(), db.into()))
}

/// The pid of the walsender serving `slot` in the database `c` is connected to, once
/// its reader is connected.
pub(crate) async fn walsender_pid(c: &Client, slot: &str) -> Result<Option<u32>> {
    let row = c
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database() UNION ALL SELECT NULL LIMIT 1",
            &[&slot],
        )
        .await?;
    Ok(row.get::<_, Option<i32>>(0).map(|p| p as u32))
}
