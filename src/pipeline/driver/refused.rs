//! Exactly-once: records Kafka refused inside a Kafka transaction, kept
//! from one session to the next so that they are dead-lettered when the
//! stream brings them again.
//!
//! At-least-once replaces a refused record with its dead letter on the
//! spot. Inside a Kafka transaction it cannot: a failed produce makes the
//! whole transaction abortable, and what was acknowledged of it is thrown
//! away with it. So the session notes the record (by its transaction's
//! commit LSN, the WAL position of its change, and its place among the
//! records of that transaction at that position: a COPY's multi-insert puts
//! several rows at one position), ends, and the next session
//! streams the same Postgres transactions again from the slot (held before
//! the open Kafka transaction) and writes the dead letter where the record
//! was, in the same Kafka transaction as its neighbours. A record only
//! lands here under a dead-letter policy for its kind; under halt the relay
//! stops as before.

use std::collections::BTreeMap;

use crate::lsn::Lsn;
use crate::pipeline::policy::ErrorKind;

/// What to write instead of a refused record: why, in the dead letter's
/// words.
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    pub(super) kind: ErrorKind,
    pub(super) reason: String,
}

/// Where a record is in the stream: its transaction's commit LSN, its
/// change's position, and how many records of that transaction came at
/// that position before it. The same every time the stream is read.
pub(super) type Place = (Lsn, Lsn, u32);

#[derive(Debug, Default)]
pub struct Refused {
    by_place: BTreeMap<Place, Refusal>,
}

impl Refused {
    pub(super) fn note(&mut self, at: Place, kind: ErrorKind, reason: String) {
        self.by_place.insert(at, Refusal { kind, reason });
    }

    pub(super) fn get(&self, at: Place) -> Option<&Refusal> {
        self.by_place.get(&at)
    }

    /// Forgets the records of transactions the slot is past (their commit
    /// starts before the confirmed position, so the server never sends them
    /// again). Not by the change's own position: changes of a transaction
    /// that commits later often lie before the confirmed position.
    pub(super) fn forget_before(&mut self, confirmed: Lsn) {
        self.by_place = self.by_place.split_off(&(confirmed, Lsn(0), 0));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_place.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_forgotten_once_the_slot_is_past_their_transaction() {
        let mut r = Refused::default();
        // A change at 100 of a transaction committed at 500, one at 300 of
        // one committed at 400.
        r.note(
            (Lsn(500), Lsn(100), 1),
            ErrorKind::TooLarge,
            "too large".into(),
        );
        r.note(
            (Lsn(400), Lsn(300), 0),
            ErrorKind::TopicMissing,
            "no topic".into(),
        );
        assert_eq!(
            r.get((Lsn(500), Lsn(100), 1)).map(|f| f.kind),
            Some(ErrorKind::TooLarge)
        );
        assert!(
            r.get((Lsn(500), Lsn(100), 0)).is_none(),
            "another row of a COPY"
        );
        assert!(
            r.get((Lsn(600), Lsn(100), 1)).is_none(),
            "another transaction"
        );
        // The slot past the change at 100, not past its commit: kept.
        r.forget_before(Lsn(450));
        assert!(r.get((Lsn(400), Lsn(300), 0)).is_none());
        assert!(
            r.get((Lsn(500), Lsn(100), 1)).is_some(),
            "its commit is ahead"
        );
        r.forget_before(Lsn(501));
        assert!(r.is_empty());
    }
}
