//! Whether a Postgres failover would keep the relay's slot (PostgreSQL 17+):
//! the slot's failover flag, `synchronized_standby_slots` on the primary, and
//! each standby of the URL holding a synchronised copy.
//!
//! Lines appear only where failover is in play: a failover slot, or a URL
//! with several hosts. A single-server set-up sees nothing new.

use tokio_postgres::Client;

use crate::config::RelayConfig;
use crate::pg::standbys::{absent_standby_slots, standbys, StandbyState};

use super::*;

pub(super) async fn failover_checks(
    client: &Client,
    cfg: &RelayConfig,
    version_num: i32,
) -> Vec<CheckResult> {
    let several_hosts = cfg.database.get_hosts().len() > 1;
    let slot = &cfg.slot;
    if version_num < 170000 {
        if several_hosts {
            return vec![CheckResult::warn(
                "slot failover",
                "the database URL names several hosts, but before PostgreSQL 17 a standby keeps no copy of the slot: after a failover the relay finds none on the new primary",
                Some("after a failover create the slot on the new primary (outbox-relay setup) and republish what it missed with outbox-relay backfill; or upgrade to PostgreSQL 17+ and use setup --failover".into()),
            )];
        }
        return Vec::new();
    }
    let failover = match client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
    {
        Ok(Some(r)) => r.get::<_, bool>(0),
        // The slot check says what is wrong with a missing slot.
        Ok(None) => return Vec::new(),
        Err(e) => return vec![CheckResult::unknown("slot failover", e)],
    };
    if !failover {
        if !several_hosts {
            return Vec::new();
        }
        return vec![CheckResult::warn(
            "slot failover",
            format!("the database URL names several hosts, but slot {slot} has failover = false: a promoted standby has no copy of it"),
            Some(format!("while no relay runs, over a replication connection: ALTER_REPLICATION_SLOT {slot} (FAILOVER true); or recreate it with outbox-relay setup --failover")),
        )];
    }
    let mut out = vec![CheckResult::pass(
        "slot failover",
        format!("slot {slot} has failover = true: standbys with sync_replication_slots = on keep a copy"),
    )];
    out.push(synchronized_standby_slots(client).await);
    let confirmed: Option<String> = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get(0));
    for s in standbys(&cfg.database, slot, Duration::from_secs(5)).await {
        out.push(standby_line(slot, &s.server, s.state, confirmed.as_deref()));
    }
    out
}

/// Without it the relay can receive, and publish, changes a standby has
/// not received yet; promoted, that standby lacks events Kafka holds.
async fn synchronized_standby_slots(client: &Client) -> CheckResult {
    const NAME: &str = "synchronized_standby_slots";
    let value: String = match client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return CheckResult::unknown(NAME, e),
    };
    let physical: Vec<String> = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY 1",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    if value.trim().is_empty() {
        let list = if physical.is_empty() {
            "<the standbys' physical slots>".to_string()
        } else {
            physical.join(",")
        };
        return CheckResult::warn(
            NAME,
            "empty: the relay may publish changes a standby has not received, and a standby promoted then lacks events that are in Kafka",
            Some(format!("ALTER SYSTEM SET synchronized_standby_slots = '{list}'; SELECT pg_reload_conf();")),
        );
    }
    let absent = absent_standby_slots(&value, &physical);
    if !absent.is_empty() {
        return CheckResult::warn(
            NAME,
            format!(
                "names {} that is not a physical slot here: logical walsenders of failover slots wait for it, so the relay receives nothing",
                absent.join(", ")
            ),
            Some("create the standby's physical slot (primary_slot_name on the standby), or remove the name from synchronized_standby_slots".into()),
        );
    }
    CheckResult::pass(
        NAME,
        format!("{value}: the relay receives only what those standbys have flushed"),
    )
}

fn standby_line(
    slot: &str,
    server: &str,
    state: StandbyState,
    primary_confirmed: Option<&str>,
) -> CheckResult {
    const NAME: &str = "standby slot copy";
    let copy = match state {
        StandbyState::Unreachable(e) => {
            return CheckResult::warn(
                NAME,
                format!("standby {server}: could not ask it: {e}"),
                None,
            )
        }
        StandbyState::TooOld { version } => {
            return CheckResult::warn(
                NAME,
                format!(
                "standby {server} runs PostgreSQL {version}, which keeps no copy of slot {slot}"
            ),
                Some("upgrade the standby to the primary's version (17+)".into()),
            )
        }
        StandbyState::Standby { copy, settings } => {
            let missing = settings.missing();
            match copy {
                None => {
                    let fix = if missing.is_empty() {
                        "the slot sync worker copies it within seconds of the primary's slot moving: look for \"slot sync\" lines in the standby's log".to_string()
                    } else {
                        format!("on the standby: {}", missing.join(", "))
                    };
                    return CheckResult::warn(
                        NAME,
                        format!("standby {server} has no copy of slot {slot}: promoted now, the relay would find no slot"),
                        Some(fix),
                    );
                }
                Some(c) => (c, missing),
            }
        }
    };
    let (c, missing) = copy;
    if let Some(reason) = &c.invalidation_reason {
        return CheckResult::warn(
            NAME,
            format!("standby {server}'s copy of slot {slot} is invalidated ({reason}): promoted now, the relay could not resume from it"),
            Some("see the standby's log; the copy is made again once the primary's slot moves (drop the invalidated copy on the standby if it stays)".into()),
        );
    }
    if !c.usable() {
        return CheckResult::warn(
            NAME,
            format!("standby {server}'s copy of slot {slot} is not yet persisted (the primary's slot has not moved past where the copy started): promoted now, it would be dropped"),
            Some(if missing.is_empty() {
                "wait until the relay confirms more; check again".to_string()
            } else {
                format!("on the standby: {}", missing.join(", "))
            }),
        );
    }
    CheckResult::pass(
        NAME,
        format!(
            "standby {server} holds a synchronised copy of slot {slot}, confirmed up to {} (the primary's: {}): promoted, the relay resumes from it and repeats what lies between",
            c.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            primary_confirmed.unwrap_or("-")
        ),
    )
}
