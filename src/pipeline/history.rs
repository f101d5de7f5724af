//! Which WAL history a recorded position belongs to, and so which
//! transactions the stream sends are already in Kafka (issue 25).
//!
//! A WAL position names a transaction only on one history. A server
//! restored from a copy, or a standby promoted before it had everything,
//! goes on writing *new* transactions at positions the old history already
//! used; a relay that skipped every transaction at or before the position
//! its progress record holds would drop those new ones silently. So the
//! record says which history it was written on: the server's timeline, and
//! for the last transaction in Kafka (the anchor) its xid and commit time,
//! which no other history repeats at the same position.
//!
//! At a session's start the server tells its timeline, its ancestors'
//! switch points (TIMELINE_HISTORY) and how far its WAL goes. From them:
//! - a record on an ancestor timeline beyond that timeline's switch point
//!   is past the fork, which is at the switch point: only transactions
//!   before it are in Kafka;
//! - a record beyond the server's WAL was written on a history this server
//!   does not have: transactions committed no later than the anchor are the
//!   old history, the first one committed after it is new, and so is
//!   everything after that;
//! - otherwise the stream must show the anchor itself, with its xid and
//!   commit time, before any transaction is taken for one in Kafka for good.
//!   Until it does, the transactions before it are held back (not published,
//!   and the slot not confirmed past where it was found); if the anchor turns
//!   out to be missing or another transaction, any held transaction
//!   committed after the anchor's time is of the new history, and the
//!   session starts again from the slot publishing from it.
//!
//! The commit-time rule rests on this: a fork starts at a restore or a
//! promotion, which comes after everything the old history published, so a
//! new transaction commits after the anchor did. A clock set back between
//! the two hosts could defeat it; the timeline check covers promotions,
//! where hosts differ.
//!
//! Pure: no I/O. The driver feeds it the server's answers and each
//! transaction's begin; it answers whether that transaction is in Kafka.

use std::fmt;

use crate::lsn::Lsn;

/// A transaction as no other history has it: where its commit record is,
/// its xid and its commit time (microseconds since 2000-01-01). A
/// non-transactional logical message has neither: xid 0, commit time 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub commit_lsn: Lsn,
    pub xid: u32,
    pub commit_time: i64,
}

/// A Postgres transaction's start as the stream shows it: where it commits,
/// and its xid and commit time, which a non-transactional logical message
/// has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begins {
    pub commit_lsn: Lsn,
    pub xid: Option<u32>,
    pub commit_time: Option<i64>,
}

impl Begins {
    pub fn transaction(commit_lsn: Lsn, xid: u32, commit_time: i64) -> Begins {
        Begins {
            commit_lsn,
            xid: Some(xid),
            commit_time: Some(commit_time),
        }
    }

    /// A non-transactional message, ordered at `at`.
    pub fn message(at: Lsn) -> Begins {
        Begins {
            commit_lsn: at,
            xid: None,
            commit_time: None,
        }
    }

    /// The anchor a record names it by (a message's xid and time are 0).
    pub fn anchor(self) -> Anchor {
        Anchor {
            commit_lsn: self.commit_lsn,
            xid: self.xid.unwrap_or(0),
            commit_time: self.commit_time.unwrap_or(0),
        }
    }
}

/// What a progress record says about the history it was written on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The server's timeline when it was written; None in a record of a
    /// relay from before these checks.
    pub timeline: Option<u32>,
    /// The last transaction in Kafka: its commit position and, when the
    /// record has them, its xid and commit time.
    pub commit_lsn: Option<Lsn>,
    pub anchor: Option<Anchor>,
    /// The most a relay of ours may have confirmed.
    pub confirmed: Lsn,
}

/// The server's history as a session finds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerHistory {
    pub timeline: u32,
    /// How far its WAL goes (IDENTIFY_SYSTEM's xlogpos).
    pub xlogpos: Lsn,
    /// Each ancestor timeline and the position where it ended, from the
    /// current timeline's history file.
    pub ancestors: Vec<(u32, Lsn)>,
}

impl ServerHistory {
    /// The ancestors listed in a timeline history file: lines of `parent
    /// TLI`, `switch point` and a reason, separated by tabs; `#` comments.
    pub fn parse_ancestors(file: &str) -> Result<Vec<(u32, Lsn)>, String> {
        let mut out = Vec::new();
        for line in file.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(tli), Some(at)) = (fields.next(), fields.next()) else {
                return Err(format!(
                    "a line without a timeline and a position: {line:?}"
                ));
            };
            let tli = tli
                .parse()
                .map_err(|_| format!("not a timeline: {tli:?}"))?;
            let at = at.parse().map_err(|e| format!("{at:?}: {e}"))?;
            out.push((tli, at));
        }
        Ok(out)
    }

    /// Where timeline `tli` ends in this server's history: `Some(None)` for
    /// the current one, None when it is not in it at all.
    fn end_of(&self, tli: u32) -> Option<Option<Lsn>> {
        if tli == self.timeline {
            return Some(None);
        }
        self.ancestors
            .iter()
            .find(|(t, _)| *t == tli)
            .map(|(_, at)| Some(*at))
    }
}

/// A fork between the recorded history and the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// At a timeline's switch point: the WAL before it is shared.
    At(Lsn),
    /// Somewhere at or before this position.
    AtOrBefore(Lsn),
}

impl Fork {
    /// The most that both histories may share.
    pub fn position(self) -> Lsn {
        match self {
            Fork::At(l) | Fork::AtOrBefore(l) => l,
        }
    }
}

impl fmt::Display for Fork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fork::At(l) => write!(f, "at {l}"),
            Fork::AtOrBefore(l) => write!(f, "at or before {l}"),
        }
    }
}

/// A session that found its held transactions were of the new history
/// leaves this to the next one, which then does not verify the same anchor
/// again: transactions before `before` are the old history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forked {
    pub anchor: Anchor,
    pub before: Lsn,
}

/// Which transactions of the stream are in Kafka already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InKafka {
    /// None of them.
    Nothing,
    /// Those committed before this position.
    Before(Lsn),
    /// Those before the anchor, once the stream shows it. `newer`: the first
    /// held transaction committed after the anchor's time.
    Verifying { anchor: Anchor, newer: Option<Lsn> },
    /// Those committed before `until` and no later than `commit_time`,
    /// until the first that is not.
    Older { until: Lsn, commit_time: i64 },
}

/// What to do with a transaction that begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It is in Kafka: publish nothing of it.
    InKafka,
    Publish,
    /// Transactions held as in Kafka were of a new history: end the session
    /// and start again from the slot with this.
    StartAgain(Forked),
}

/// The outcome of judging a record against the server at a session's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub in_kafka: InKafka,
    /// A fork already certain.
    pub fork: Option<Fork>,
    /// The fork an earlier session of this process found (not counted again).
    pub again: bool,
}

/// Judges the record against the server. `found`: the slot's confirmed
/// position (the stream starts there); `forked`: what an earlier session of
/// this process learned about this record's anchor.
pub fn judge(
    record: Option<&Recorded>,
    server: &ServerHistory,
    found: Lsn,
    forked: Option<Forked>,
) -> Judged {
    let nothing = Judged {
        in_kafka: InKafka::Nothing,
        fork: None,
        again: false,
    };
    let Some(r) = record else {
        return nothing;
    };
    let fork = fork_by_position(r, server);
    let Some(commit_lsn) = r.commit_lsn else {
        return Judged { fork, ..nothing };
    };
    let Some(anchor) = r.anchor else {
        // A record of an older relay: only its position to go by.
        let in_kafka = match fork {
            None => InKafka::Before(Lsn(commit_lsn.0.saturating_add(1))),
            Some(f) if commit_lsn < f.position() => {
                InKafka::Before(Lsn(commit_lsn.0.saturating_add(1)))
            }
            Some(Fork::At(at)) => InKafka::Before(at),
            Some(Fork::AtOrBefore(_)) => InKafka::Nothing,
        };
        return Judged {
            in_kafka,
            fork,
            again: false,
        };
    };
    if let Some(f) = forked.filter(|f| f.anchor == anchor) {
        return Judged {
            in_kafka: InKafka::Before(f.before),
            fork: None,
            again: true,
        };
    }
    // The server never resends a transaction whose commit starts before
    // the slot's position: with the anchor behind it, nothing is skipped.
    if anchor.commit_lsn < found {
        return Judged { fork, ..nothing };
    }
    let in_kafka = match fork {
        Some(Fork::At(at)) if at <= anchor.commit_lsn => InKafka::Before(at),
        Some(Fork::AtOrBefore(limit)) if limit <= anchor.commit_lsn => InKafka::Older {
            until: limit,
            commit_time: anchor.commit_time,
        },
        // The anchor is in WAL this server may share: it must show.
        _ => InKafka::Verifying {
            anchor,
            newer: None,
        },
    };
    Judged {
        in_kafka,
        fork,
        again: false,
    }
}

/// A fork that positions alone prove: the record on a timeline that is no
/// ancestor of the server's, or past where its timeline ended, or past the
/// server's WAL.
fn fork_by_position(r: &Recorded, server: &ServerHistory) -> Option<Fork> {
    let furthest = r.commit_lsn.map_or(r.confirmed, |c| c.max(r.confirmed));
    if let Some(tli) = r.timeline {
        match server.end_of(tli) {
            None => return Some(Fork::AtOrBefore(server.xlogpos.min(furthest))),
            Some(Some(end)) if furthest > end => return Some(Fork::At(end)),
            _ => {}
        }
    }
    (furthest > server.xlogpos).then_some(Fork::AtOrBefore(server.xlogpos))
}

/// A fork seen in the stream: the anchor was not where the record said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub fork: Fork,
}

impl InKafka {
    /// A transaction (or a non-transactional message: no xid, no commit
    /// time) begins at `commit_lsn`.
    pub fn decide(&mut self, begins: Begins) -> (Decision, Option<Seen>) {
        let Begins {
            commit_lsn,
            commit_time,
            ..
        } = begins;
        match self {
            InKafka::Nothing => (Decision::Publish, None),
            InKafka::Before(bound) => {
                if commit_lsn < *bound {
                    (Decision::InKafka, None)
                } else {
                    *self = InKafka::Nothing;
                    (Decision::Publish, None)
                }
            }
            InKafka::Older {
                until,
                commit_time: limit,
            } => {
                let old = commit_lsn < *until && commit_time.is_some_and(|t| t <= *limit);
                if old {
                    (Decision::InKafka, None)
                } else {
                    *self = InKafka::Nothing;
                    (Decision::Publish, None)
                }
            }
            InKafka::Verifying { anchor, newer } => {
                let anchor = *anchor;
                if commit_lsn < anchor.commit_lsn {
                    if newer.is_none() && commit_time.is_none_or(|t| t > anchor.commit_time) {
                        *newer = Some(commit_lsn);
                    }
                    return (Decision::InKafka, None);
                }
                if begins.anchor() == anchor {
                    *self = InKafka::Before(Lsn(anchor.commit_lsn.0.saturating_add(1)));
                    return (Decision::InKafka, None);
                }
                let (decision, seen) = self.forked_at(commit_lsn);
                (decision.unwrap_or(Decision::Publish), Some(seen))
            }
        }
    }

    /// The server's WAL went past `wal_end` (a keepalive): an anchor
    /// before it that has not shown is not on this history.
    pub fn passed(&mut self, wal_end: Lsn) -> Option<(Option<Decision>, Seen)> {
        match self {
            InKafka::Verifying { anchor, .. } if wal_end > anchor.commit_lsn => {
                Some(self.forked_at(wal_end))
            }
            _ => None,
        }
    }

    /// The anchor is missing before `at`: held transactions committed after
    /// it make the session start again; otherwise nothing more is in Kafka.
    fn forked_at(&mut self, at: Lsn) -> (Option<Decision>, Seen) {
        let InKafka::Verifying { anchor, newer } = *self else {
            unreachable!("forked_at is only called while verifying");
        };
        let seen = Seen {
            fork: Fork::AtOrBefore(newer.unwrap_or(at)),
        };
        *self = InKafka::Nothing;
        let decision = newer.map(|before| Decision::StartAgain(Forked { anchor, before }));
        (decision, seen)
    }

    /// Whether the slot must stay where the session found it: while held
    /// transactions may still turn out to be of a new history.
    pub fn holds(&self) -> bool {
        matches!(self, InKafka::Verifying { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    fn anchor(at: &str) -> Anchor {
        Anchor {
            commit_lsn: lsn(at),
            xid: 900,
            commit_time: 5_000,
        }
    }

    fn record(tli: u32, at: &str) -> Recorded {
        Recorded {
            timeline: Some(tli),
            commit_lsn: Some(lsn(at)),
            anchor: Some(anchor(at)),
            confirmed: lsn(at),
        }
    }

    /// The record at 0/5000 on timeline 1, judged against a server of
    /// timeline 1 at `xlogpos` with the slot found at `found`.
    fn recorded_at_5000(xlogpos: &str, found: &str, forked: Option<Forked>) -> Judged {
        judge(
            Some(&record(1, "0/5000")),
            &server(1, xlogpos, &[]),
            lsn(found),
            forked,
        )
    }

    /// What `k` decides for a transaction committed at `at`.
    fn decided(k: &mut InKafka, at: &str, xid: u32, commit_time: i64) -> Decision {
        k.decide(Begins::transaction(lsn(at), xid, commit_time)).0
    }

    fn server(tli: u32, xlogpos: &str, ancestors: &[(u32, &str)]) -> ServerHistory {
        ServerHistory {
            timeline: tli,
            xlogpos: lsn(xlogpos),
            ancestors: ancestors.iter().map(|(t, l)| (*t, lsn(l))).collect(),
        }
    }

    #[test]
    fn the_same_history_skips_up_to_the_anchor_once_it_shows() {
        let j = recorded_at_5000("0/9000", "0/1000", None);
        assert_eq!(j.fork, None);
        let mut k = j.in_kafka;
        assert!(k.holds());
        // Held until the anchor shows, then for good.
        assert_eq!(decided(&mut k, "0/2000", 800, 4_000), Decision::InKafka);
        assert_eq!(
            k.decide(Begins::transaction(lsn("0/5000"), 900, 5_000)),
            (Decision::InKafka, None)
        );
        assert!(!k.holds());
        assert_eq!(decided(&mut k, "0/6000", 901, 6_000), Decision::Publish);
    }

    #[test]
    fn a_restore_whose_new_wal_passed_the_anchor_starts_again_from_the_first_new_transaction() {
        // The copy ends at 0/3000; the old history published up to 0/5000;
        // the restored server wrote past it.
        let mut k = recorded_at_5000("0/9000", "0/1000", None).in_kafka;
        assert_eq!(decided(&mut k, "0/2000", 800, 4_000), Decision::InKafka);
        assert_eq!(decided(&mut k, "0/3500", 801, 9_000), Decision::InKafka);
        let (d, seen) = k.decide(Begins::transaction(lsn("0/5000"), 802, 9_500));
        let again = Forked {
            anchor: anchor("0/5000"),
            before: lsn("0/3500"),
        };
        assert_eq!(d, Decision::StartAgain(again));
        assert_eq!(seen.unwrap().fork, Fork::AtOrBefore(lsn("0/3500")));
        // The next session skips only the old history, and counts no new fork.
        let j = recorded_at_5000("0/9000", "0/1000", Some(again));
        assert_eq!((j.fork, j.again), (None, true));
        let mut k = j.in_kafka;
        assert_eq!(decided(&mut k, "0/2000", 800, 4_000), Decision::InKafka);
        assert_eq!(decided(&mut k, "0/3500", 801, 9_000), Decision::Publish);
        assert_eq!(decided(&mut k, "0/4000", 700, 1_000), Decision::Publish);
    }

    #[test]
    fn an_anchor_passed_without_newer_transactions_publishes_from_there() {
        let mut k = recorded_at_5000("0/9000", "0/1000", None).in_kafka;
        assert_eq!(decided(&mut k, "0/2000", 800, 4_000), Decision::InKafka);
        let (d, seen) = k.passed(lsn("0/6000")).unwrap();
        assert_eq!(d, None);
        assert_eq!(seen.fork, Fork::AtOrBefore(lsn("0/6000")));
        assert_eq!(decided(&mut k, "0/7000", 1, 1), Decision::Publish);
        assert!(!k.holds());
    }

    #[test]
    fn a_record_past_the_servers_wal_is_a_fork_judged_by_commit_time() {
        let j = recorded_at_5000("0/3800", "0/1000", None);
        assert_eq!(j.fork, Some(Fork::AtOrBefore(lsn("0/3800"))));
        let mut k = j.in_kafka;
        assert!(!k.holds());
        assert_eq!(decided(&mut k, "0/2000", 800, 4_000), Decision::InKafka);
        assert_eq!(decided(&mut k, "0/3000", 801, 9_000), Decision::Publish);
        // Once one is new, all after it are.
        assert_eq!(decided(&mut k, "0/3100", 2, 10), Decision::Publish);
    }

    #[test]
    fn a_promotion_forks_at_the_switch_point() {
        // The record was written on timeline 1 past where the standby
        // switched to 2.
        let s = server(2, "0/9000", &[(1, "0/4000")]);
        let j = judge(Some(&record(1, "0/5000")), &s, lsn("0/1000"), None);
        assert_eq!(j.fork, Some(Fork::At(lsn("0/4000"))));
        let mut k = j.in_kafka;
        assert_eq!(decided(&mut k, "0/3000", 1, 9_999), Decision::InKafka);
        assert_eq!(decided(&mut k, "0/4000", 2, 1), Decision::Publish);
        // Before the switch point the histories are one: no fork.
        let j = judge(Some(&record(1, "0/3000")), &s, lsn("0/1000"), None);
        assert_eq!(j.fork, None);
        assert!(j.in_kafka.holds());
        // A timeline that is no ancestor: a fork somewhere.
        let j = judge(
            Some(&record(3, "0/5000")),
            &server(2, "0/4800", &[(1, "0/4000")]),
            lsn("0/1000"),
            None,
        );
        assert_eq!(j.fork, Some(Fork::AtOrBefore(lsn("0/4800"))));
    }

    #[test]
    fn records_without_history_keep_their_position_unless_it_is_past_the_wal() {
        let old = Recorded {
            timeline: None,
            commit_lsn: Some(lsn("0/5000")),
            anchor: None,
            confirmed: lsn("0/5000"),
        };
        let mut k = judge(Some(&old), &server(1, "0/9000", &[]), lsn("0/1000"), None).in_kafka;
        assert_eq!(decided(&mut k, "0/5000", 1, 1), Decision::InKafka);
        assert_eq!(decided(&mut k, "0/5001", 1, 1), Decision::Publish);
        let j = judge(Some(&old), &server(1, "0/3000", &[]), lsn("0/1000"), None);
        assert_eq!(j.in_kafka, InKafka::Nothing);
        assert!(j.fork.is_some());
    }

    #[test]
    fn an_anchor_behind_the_slot_skips_nothing() {
        let j = recorded_at_5000("0/9000", "0/6000", None);
        assert_eq!(j.in_kafka, InKafka::Nothing);
        assert_eq!(j.fork, None);
    }

    #[test]
    fn history_files_parse() {
        let file = "1\t0/3000060\tno recovery target specified\n\n# comment\n2\t0/5000A8\tat restore point\n";
        assert_eq!(
            ServerHistory::parse_ancestors(file).unwrap(),
            vec![(1, lsn("0/3000060")), (2, lsn("0/5000A8"))]
        );
        assert!(ServerHistory::parse_ancestors("x\t0/1\n").is_err());
    }
}
