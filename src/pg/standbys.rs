//! The physical standbys named in a multi-host database URL, and the copy
//! each keeps of the relay's slot (PostgreSQL 17+ failover slots).
//!
//! A copy is what the relay resumes from after the standby is promoted. The
//! primary cannot say whether a standby has one: only the standby knows
//! (`pg_replication_slots.synced`), so each other host of the URL is asked in
//! turn over an ordinary SQL connection of its own. `check` and `status` read
//! this; nothing here changes a server.

use std::time::Duration;

use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::config::DatabaseConfig;
use super::sql::connect_within;

/// One host of the URL that is a standby, or could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standby {
    /// `host:port` as the URL names it.
    pub server: String,
    pub state: StandbyState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyState {
    Unreachable(String),
    /// Before PostgreSQL 17 a standby keeps no copies of logical slots.
    TooOld {
        version: String,
    },
    Standby {
        copy: Option<SlotCopy>,
        settings: SyncSettings,
    },
}

/// The standby's copy of the slot, from its `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCopy {
    pub synced: bool,
    /// Still temporary: created, but not yet caught up with the primary's
    /// slot, so a promotion now would drop it.
    pub temporary: bool,
    pub invalidation_reason: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
}

impl SlotCopy {
    /// Whether a promotion now would leave the slot to resume from.
    pub fn usable(&self) -> bool {
        self.synced && !self.temporary && self.invalidation_reason.is_none()
    }
}

/// The standby's settings slot synchronisation depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    pub sync_replication_slots: bool,
    pub hot_standby_feedback: bool,
    pub primary_slot_name: bool,
    /// primary_conninfo names a database (the sync worker connects to one).
    pub conninfo_has_dbname: bool,
}

impl SyncSettings {
    /// What is missing for the standby to synchronise failover slots, as
    /// settings to make; empty when nothing is.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.sync_replication_slots {
            m.push("sync_replication_slots = on");
        }
        if !self.hot_standby_feedback {
            m.push("hot_standby_feedback = on");
        }
        if !self.primary_slot_name {
            m.push("primary_slot_name = '<its physical slot on the primary>'");
        }
        if !self.conninfo_has_dbname {
            m.push("dbname=<a database> in primary_conninfo");
        }
        m
    }
}

/// The URL's hosts one by one, each as a URL of its own (same user,
/// password, TLS and timeouts; `target_session_attrs=any`), labelled `host:port`.
pub fn each_host(db: &DatabaseConfig) -> Vec<(String, DatabaseConfig)> {
    let pg = &db.pg;
    let ports = pg.get_ports();
    let addrs = pg.get_hostaddrs();
    let mut out = Vec::new();
    for (i, host) in pg.get_hosts().iter().enumerate() {
        let port = match ports.len() {
            0 => 5432,
            1 => ports[0],
            _ => match ports.get(i) {
                Some(p) => *p,
                None => continue,
            },
        };
        let mut one = tokio_postgres::Config::new();
        let label = match host {
            Host::Tcp(h) => {
                one.host(h);
                format!("{h}:{port}")
            }
            #[cfg(unix)]
            Host::Unix(p) => {
                one.host_path(p);
                format!("{}:{port}", p.display())
            }
        };
        if let Some(a) = addrs.get(i).filter(|_| addrs.len() == pg.get_hosts().len()) {
            one.hostaddr(*a);
        }
        one.port(port);
        if let Some(u) = pg.get_user() {
            one.user(u);
        }
        if let Some(p) = pg.get_password() {
            one.password(p);
        }
        if let Some(d) = pg.get_dbname() {
            one.dbname(d);
        }
        if let Some(o) = pg.get_options() {
            one.options(o);
        }
        if let Some(a) = pg.get_application_name() {
            one.application_name(a);
        }
        if let Some(t) = pg.get_connect_timeout() {
            one.connect_timeout(*t);
        }
        one.ssl_mode(pg.get_ssl_mode())
            .channel_binding(pg.get_channel_binding())
            .target_session_attrs(TargetSessionAttrs::Any);
        out.push((
            label,
            DatabaseConfig {
                pg: one,
                tls: db.tls.clone(),
            },
        ));
    }
    out
}

/// The names in a `synchronized_standby_slots` value that are not among
/// `physical`, the server's physical slots. A logical walsender of a
/// failover slot waits for every name the setting lists, so one that is
/// absent (a promoted standby that inherited the setting) holds the relay
/// back for good.
pub fn absent_standby_slots(setting: &str, physical: &[String]) -> Vec<String> {
    setting
        .split(',')
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(
            |n| match n.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => n.to_lowercase(),
            },
        )
        .filter(|n| !physical.iter().any(|p| p == n))
        .collect()
}

/// Every host of the URL that is a standby (or did not answer within
/// `limit`), with its copy of `slot`. Read-write hosts (the primary) are
/// left out; a URL with one host gives nothing.
pub async fn standbys(db: &DatabaseConfig, slot: &str, limit: Duration) -> Vec<Standby> {
    let hosts = each_host(db);
    if hosts.len() < 2 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (server, one) in hosts {
        let state = match ask(&one, slot, limit).await {
            Ok(Some(state)) => state,
            Ok(None) => continue,
            Err(e) => StandbyState::Unreachable(e),
        };
        out.push(Standby { server, state });
    }
    out
}

/// None for a server that is not in recovery.
async fn ask(
    db: &DatabaseConfig,
    slot: &str,
    limit: Duration,
) -> Result<Option<StandbyState>, String> {
    let client = connect_within(db, limit).await.map_err(|e| e.to_string())?;
    let text = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    };
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int,
                    current_setting('server_version')",
            &[],
        )
        .await
        .map_err(text)?;
    let (in_recovery, version_num, version): (bool, i32, String) =
        (row.get(0), row.get(1), row.get(2));
    if !in_recovery {
        return Ok(None);
    }
    if version_num < 170000 {
        return Ok(Some(StandbyState::TooOld { version }));
    }
    // primary_conninfo may hold a password: only whether it names a
    // database leaves the server.
    let row = client
        .query_one(
            "SELECT current_setting('sync_replication_slots')::bool,
                    current_setting('hot_standby_feedback')::bool,
                    current_setting('primary_slot_name') <> '',
                    current_setting('primary_conninfo') ~ '(^|\\s)dbname\\s*='",
            &[],
        )
        .await
        .map_err(text)?;
    let settings = SyncSettings {
        sync_replication_slots: row.get(0),
        hot_standby_feedback: row.get(1),
        primary_slot_name: row.get(2),
        conninfo_has_dbname: row.get(3),
    };
    let copy = client
        .query_opt(
            "SELECT synced, temporary, invalidation_reason, confirmed_flush_lsn::text
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(text)?
        .map(|r| SlotCopy {
            synced: r.get(0),
            temporary: r.get(1),
            invalidation_reason: r.get(2),
            confirmed_flush_lsn: r.get(3),
        });
    Ok(Some(StandbyState::Standby { copy, settings }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(url: &str) -> DatabaseConfig {
        DatabaseConfig {
            pg: url.parse().unwrap(),
            tls: Default::default(),
        }
    }

    #[test]
    fn each_host_keeps_the_credentials_and_takes_its_own_port() {
        let hosts = each_host(&db(
            "postgres://relay:pw@a:5432,b:5433/app?target_session_attrs=read-write&connect_timeout=3",
        ));
        let labels: Vec<&str> = hosts.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["a:5432", "b:5433"]);
        let b = &hosts[1].1.pg;
        assert_eq!(b.get_ports(), [5433]);
        assert_eq!(b.get_user(), Some("relay"));
        assert_eq!(b.get_password(), Some(&b"pw"[..]));
        assert_eq!(b.get_dbname(), Some("app"));
        assert_eq!(b.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(b.get_target_session_attrs(), TargetSessionAttrs::Any);
        // One port for all hosts.
        let hosts = each_host(&db("host=a,b port=6000 user=u"));
        let labels: Vec<&str> = hosts.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["a:6000", "b:6000"]);
    }

    #[test]
    fn absent_standby_slots_are_named_as_the_server_folds_them() {
        let physical = vec!["standby1".to_string(), "Mixed".to_string()];
        assert!(absent_standby_slots("", &physical).is_empty());
        assert!(absent_standby_slots("standby1, \"Mixed\"", &physical).is_empty());
        assert_eq!(
            absent_standby_slots("STANDBY1,standby2,Mixed", &physical),
            ["standby2", "mixed"]
        );
    }

    #[test]
    fn what_a_standby_misses_is_named_as_settings() {
        let s = SyncSettings {
            sync_replication_slots: false,
            hot_standby_feedback: true,
            primary_slot_name: false,
            conninfo_has_dbname: true,
        };
        assert_eq!(
            s.missing(),
            [
                "sync_replication_slots = on",
                "primary_slot_name = '<its physical slot on the primary>'"
            ]
        );
    }
}
