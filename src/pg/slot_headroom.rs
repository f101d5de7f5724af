//! How long the replication slot has before the server invalidates it
//! (issue 25, "see it coming"): `max_slot_wal_keep_size` invalidates a slot
//! whose retained WAL outgrows it (`safe_wal_size` says how many bytes are
//! left), and PostgreSQL 18's `idle_replication_slot_timeout` one that no
//! connection used for that long. A lost slot means events the relay can no
//! longer stream: `status`, `check` and the running relay's metrics say how
//! far off that is, while there is time to act.
//!
//! The columns and settings that say so differ between major versions, so
//! the slot's row is read as JSON and a missing field reads as "no limit".

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::lsn::Lsn;

/// What the server says about how close the slot is to being invalidated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headroom {
    /// `reserved`, `extended`, `unreserved` (invalidated at the next
    /// checkpoint unless the relay catches up) or `lost`.
    pub wal_status: Option<String>,
    /// PostgreSQL 17+: why it was invalidated.
    pub invalidation_reason: Option<String>,
    /// Bytes of WAL the server may still write before the slot is
    /// invalidated; None without `max_slot_wal_keep_size`.
    pub safe_wal_size: Option<i64>,
    /// PostgreSQL 18's `idle_replication_slot_timeout` (None when off or
    /// absent), and how long the slot has been unused (None while active).
    pub idle_timeout: Option<Duration>,
    pub inactive_for: Option<Duration>,
}

/// What invalidates the slot first, and when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeLeft {
    pub left: Duration,
    /// The setting that does it.
    pub by: &'static str,
}

impl Headroom {
    /// The slot's headroom; None when it does not exist.
    pub async fn read(
        client: &Client,
        slot: &str,
    ) -> Result<Option<Headroom>, tokio_postgres::Error> {
        let row = client
            .query_opt(
                "SELECT to_jsonb(s)::text,
                        CASE WHEN NOT s.active THEN
                          extract(epoch FROM now() - (to_jsonb(s)->>'inactive_since')::timestamptz)::float8
                        END,
                        (SELECT setting::float8 * CASE unit WHEN 'ms' THEN 0.001 WHEN 'min' THEN 60
                                                            WHEN 'h' THEN 3600 WHEN 'd' THEN 86400 ELSE 1 END
                           FROM pg_settings WHERE name = 'idle_replication_slot_timeout')
                   FROM pg_replication_slots s WHERE s.slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok(row.map(|r| {
            let json: serde_json::Value =
                serde_json::from_str(&r.get::<_, String>(0)).unwrap_or_default();
            let text = |k: &str| json[k].as_str().map(str::to_string);
            let seconds = |v: Option<f64>| {
                v.filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
            };
            Headroom {
                wal_status: text("wal_status"),
                invalidation_reason: text("invalidation_reason"),
                safe_wal_size: json["safe_wal_size"].as_i64(),
                inactive_for: seconds(r.get(1)),
                idle_timeout: seconds(r.get(2)),
            }
        }))
    }

    /// The slot was invalidated, or will be at the next checkpoint.
    pub fn lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }

    /// When the slot is invalidated at `wal_rate` bytes of WAL a second,
    /// by whichever limit comes first; None when no limit applies (or the
    /// WAL does not grow).
    pub fn time_left(&self, wal_rate: Option<f64>) -> Option<TimeLeft> {
        let by_wal = self.safe_wal_size.and_then(|safe| {
            if safe <= 0 {
                return Some(Duration::ZERO);
            }
            let rate = wal_rate.filter(|r| *r > 0.0)?;
            Some(Duration::from_secs_f64(safe as f64 / rate))
        });
        let by_idle = match (self.idle_timeout, self.inactive_for) {
            (Some(t), Some(idle)) => Some(t.saturating_sub(idle)),
            _ => None,
        };
        match (by_wal, by_idle) {
            (Some(w), Some(i)) if i < w => Some(TimeLeft {
                left: i,
                by: "idle_replication_slot_timeout",
            }),
            (Some(w), _) => Some(TimeLeft {
                left: w,
                by: "max_slot_wal_keep_size",
            }),
            (None, Some(i)) => Some(TimeLeft {
                left: i,
                by: "idle_replication_slot_timeout",
            }),
            (None, None) => None,
        }
    }
}

/// The server's WAL position over SQL (None on a standby).
pub async fn current_wal(client: &Client) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END",
            &[],
        )
        .await?;
    Ok(row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()))
}

/// Bytes of WAL written per second, sampled over `over`.
pub async fn wal_rate(
    client: &Client,
    over: Duration,
) -> Result<Option<f64>, tokio_postgres::Error> {
    let Some(a) = current_wal(client).await? else {
        return Ok(None);
    };
    let started = Instant::now();
    tokio::time::sleep(over).await;
    let Some(b) = current_wal(client).await? else {
        return Ok(None);
    };
    Ok(Some(
        b.0.saturating_sub(a.0) as f64 / started.elapsed().as_secs_f64(),
    ))
}

/// A duration as an operator reads it: `3 h 20 min`, `45 min`, `12 s`.
pub fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `secs` left until the limit `by` invalidates the slot.
    fn left(secs: u64, by: &'static str) -> Option<TimeLeft> {
        Some(TimeLeft {
            left: Duration::from_secs(secs),
            by,
        })
    }

    #[test]
    fn the_first_limit_decides() {
        let h = Headroom {
            safe_wal_size: Some(1_000_000),
            ..Headroom::default()
        };
        assert_eq!(h.time_left(None), None, "no WAL rate, no time");
        assert_eq!(
            h.time_left(Some(1000.0)),
            left(1000, "max_slot_wal_keep_size")
        );
        let idle = Headroom {
            idle_timeout: Some(Duration::from_secs(600)),
            inactive_for: Some(Duration::from_secs(500)),
            ..h.clone()
        };
        assert_eq!(
            idle.time_left(Some(1000.0)),
            left(100, "idle_replication_slot_timeout")
        );
        let spent = Headroom {
            safe_wal_size: Some(-5),
            ..Headroom::default()
        };
        assert_eq!(spent.time_left(None).map(|t| t.left), Some(Duration::ZERO));
        assert_eq!(Headroom::default().time_left(Some(1e6)), None);
        assert!(!h.lost());
        let lost = Headroom {
            wal_status: Some("lost".into()),
            ..Headroom::default()
        };
        assert!(lost.lost());
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(humanize(Duration::from_secs(45)), "45 s");
        assert_eq!(humanize(Duration::from_secs(45 * 60)), "45 min");
        assert_eq!(
            humanize(Duration::from_secs(3 * 3600 + 20 * 60)),
            "3 h 20 min"
        );
        assert_eq!(humanize(Duration::from_secs(3 * 86_400)), "3 d 0 h");
    }
}
