//! How bad events go: the error policy, records kept so that a failed
//! delivery can be dead-lettered, dead letters waiting to be enqueued, the
//! broker's too-large refusals until their verdict, and exactly-once's
//! refused records (`refused`) with the place of the last record enqueued.

use crate::lsn::Lsn;
use crate::pipeline::checkpoint::TxnSeq;
use crate::pipeline::policy::{self, ErrorKind, ErrorPolicy, Failed, Policy};
use crate::pipeline::route::router::OutboxRecord;
use crate::pipeline::settings::RelayConfig;

use super::refused::{Place, Refused};
use super::window::TooLarge;

pub(super) struct DeadLetters {
    policy: ErrorPolicy,
    /// Keep records in flight, because a delivery failure may be dead-lettered.
    pub(super) keep_records: bool,
    /// Dead-letter records waiting to be enqueued (from delivery reports).
    redo: Vec<(OutboxRecord, TxnSeq, Lsn)>,
    /// Records the broker refused as too large, until the reports that came
    /// with them are in (see `settle_too_large`).
    pub(super) too_large: TooLarge,
    /// Exactly-once: records Kafka refused in an earlier session's
    /// transaction, dead-lettered when they come again.
    pub(super) refused: Refused,
    /// Where the last record enqueued was (`refused::Place`).
    pub(super) at: Place,
}

impl DeadLetters {
    pub(super) fn new(cfg: &RelayConfig, refused: Refused) -> DeadLetters {
        DeadLetters {
            policy: cfg.error_policy.clone(),
            // Exactly-once does not keep them: a refused record is dead-lettered
            // when the next session streams it again (`refused`).
            keep_records: cfg.error_policy.may_dead_letter_deliveries()
                && cfg.exactly_once.is_none(),
            redo: Vec::new(),
            too_large: TooLarge::new(),
            refused,
            at: (Lsn(0), Lsn(0), 0),
        }
    }

    /// Whether the policy dead-letters errors of this kind.
    pub(super) fn wants(&self, kind: ErrorKind) -> bool {
        self.policy.for_kind(kind) == Policy::DeadLetter
    }

    /// The dead letter that replaces `failed`.
    pub(super) fn letter(
        &self,
        failed: Failed,
        kind: ErrorKind,
        reason: &str,
        lsn: Lsn,
    ) -> OutboxRecord {
        policy::dead_letter(failed, kind, reason, lsn, &self.policy.dead_letter_topic)
    }

    /// A dead letter for a failed delivery, enqueued by `flush_redo`.
    pub(super) fn queue(&mut self, letter: OutboxRecord, txn: TxnSeq, lsn: Lsn) {
        self.redo.push((letter, txn, lsn));
    }

    /// The dead letters queued, in the order the failures were reported.
    pub(super) fn take_queued(&mut self) -> Vec<(OutboxRecord, TxnSeq, Lsn)> {
        std::mem::take(&mut self.redo)
    }
}
