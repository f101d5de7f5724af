//! The LSN checkpoint: which position may be confirmed to the server.
//!
//! Deliveries complete out of order across partitions, so the confirmable
//! position is the end LSN of the newest transaction that — together with
//! every transaction before it — has no unacknowledged event: a contiguous
//! prefix. Confirming past an earlier unacknowledged event would lose it on a
//! crash, because the server never resends anything at or before the
//! confirmed position.
//!
//! Pure bookkeeping, no I/O: the pipeline feeds it Begin/event/Commit/ack
//! calls and reads [`Checkpoint::confirmed`].

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies a transaction for the lifetime of its events in flight. Carried
/// through the producer as each record's delivery opaque.
pub type TxnSeq = u64;

#[derive(Debug)]
struct Txn {
    /// Commit LSN from Begin, for error messages.
    final_lsn: Lsn,
    /// Set once Commit arrived.
    end_lsn: Option<Lsn>,
    outstanding: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("Begin for a new transaction while transaction {0} is still open")]
    NestedBegin(TxnSeq),
    #[error("event or Commit outside a transaction")]
    NoOpenTransaction,
    #[error("acknowledgement for unknown transaction {0}")]
    UnknownTransaction(TxnSeq),
    #[error("more acknowledgements than events for transaction {0}")]
    ExtraAck(TxnSeq),
}

/// What, besides the broker's acknowledgements, holds the confirmed position
/// back; each part is set by the one who knows it, and the checkpoint alone
/// combines them ([`Checkpoint::confirmable`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holds {
    /// The progress topic records every position before it is confirmed
    /// (`driver::record`): not past the last recorded one.
    pub recorded: Option<Lsn>,
    /// Exactly-once: not past the start of a Kafka transaction that is
    /// still open (its events are not visible yet).
    pub open_transaction: Option<Lsn>,
    /// Exactly-once: transactions taken for ones already in Kafka until the
    /// stream proves the history (`pipeline::history`) may yet be new: not
    /// past where the session resumed.
    pub unproven_from: Option<Lsn>,
}

/// Tracks transactions from Begin until all their events are acknowledged.
#[derive(Debug)]
pub struct Checkpoint {
    /// Transactions not yet confirmable, oldest first; `txns[i]` has
    /// sequence number `base + i`.
    txns: VecDeque<Txn>,
    base: TxnSeq,
    open: Option<TxnSeq>,
    confirmed: Lsn,
    inflight: u64,
}

impl Checkpoint {
    /// Starts from the position the slot was confirmed at.
    pub fn new(confirmed: Lsn) -> Self {
        Checkpoint {
            txns: VecDeque::new(),
            base: 0,
            open: None,
            confirmed,
            inflight: 0,
        }
    }

    /// The newest position whose every event is acknowledged.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// The position that may be told to the server now: the newest one
    /// with every event before it acknowledged, and not past any hold.
    pub fn confirmable(&self, holds: Holds) -> Lsn {
        [holds.recorded, holds.open_transaction, holds.unproven_from]
            .into_iter()
            .flatten()
            .fold(self.confirmed, Lsn::min)
    }

    /// Events handed to the producer and not yet acknowledged.
    pub fn inflight(&self) -> u64 {
        self.inflight
    }

    /// Transactions (and standalone units) tracked: from the oldest not yet
    /// confirmable to the newest, empty ones included.
    pub fn tracked(&self) -> u64 {
        self.txns.len() as u64
    }

    /// True while a transaction's Begin arrived without its Commit.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub fn begin(&mut self, final_lsn: Lsn) -> Result<TxnSeq, CheckpointError> {
        if let Some(open) = self.open {
            return Err(CheckpointError::NestedBegin(open));
        }
        let seq = self.base + self.txns.len() as u64;
        self.txns.push_back(Txn {
            final_lsn,
            end_lsn: None,
            outstanding: 0,
        });
        self.open = Some(seq);
        Ok(seq)
    }

    /// Registers one event of the open transaction as handed to the producer.
    pub fn event(&mut self) -> Result<TxnSeq, CheckpointError> {
        let seq = self.open.ok_or(CheckpointError::NoOpenTransaction)?;
        let idx = (seq - self.base) as usize;
        self.txns[idx].outstanding += 1;
        self.inflight += 1;
        Ok(seq)
    }

    /// Adds one event to a transaction still tracked (open, or committed with
    /// events in flight): the dead-letter record that replaces a failed one.
    pub fn add_event(&mut self, seq: TxnSeq) -> Result<(), CheckpointError> {
        let txn = seq
            .checked_sub(self.base)
            .and_then(|i| self.txns.get_mut(i as usize))
            .ok_or(CheckpointError::UnknownTransaction(seq))?;
        txn.outstanding += 1;
        self.inflight += 1;
        Ok(())
    }

    /// Opens the unit of a non-transactional logical message at `lsn`, the
    /// position the server reported for it. That position is the *end* of
    /// the message's WAL record, which is often exactly where the next
    /// record (a commit) starts; see [`Checkpoint::commit_standalone`].
    pub fn begin_standalone(&mut self, lsn: Lsn) -> Result<TxnSeq, CheckpointError> {
        self.begin(lsn)
    }

    /// Closes the unit opened by [`Checkpoint::begin_standalone`], to be
    /// confirmed at the message's own LSN and never past it. On restart the
    /// server skips a message whose record starts before the confirmed
    /// position (so the message's end suffices to not see it again) and a
    /// transaction whose commit record starts before it: one byte more would
    /// skip the transaction committed right after the message.
    pub fn commit_standalone(&mut self) -> Result<(), CheckpointError> {
        let seq = self.open.ok_or(CheckpointError::NoOpenTransaction)?;
        let lsn = self.txns[(seq - self.base) as usize].final_lsn;
        self.commit(lsn)
    }

    pub fn commit(&mut self, end_lsn: Lsn) -> Result<(), CheckpointError> {
        let seq = self.open.take().ok_or(CheckpointError::NoOpenTransaction)?;
        let idx = (seq - self.base) as usize;
        self.txns[idx].end_lsn = Some(end_lsn);
        self.advance();
        Ok(())
    }

    /// Records the broker's acknowledgement of one event of `seq`.
    pub fn ack(&mut self, seq: TxnSeq) -> Result<(), CheckpointError> {
        let idx = seq
            .checked_sub(self.base)
            .filter(|i| (*i as usize) < self.txns.len())
            .ok_or(CheckpointError::UnknownTransaction(seq))? as usize;
        let txn = &mut self.txns[idx];
        if txn.outstanding == 0 {
            return Err(CheckpointError::ExtraAck(seq));
        }
        txn.outstanding -= 1;
        self.inflight -= 1;
        if idx == 0 {
            self.advance();
        }
        Ok(())
    }

    /// The commit LSN of a tracked transaction, for diagnostics.
    pub fn commit_lsn_of(&self, seq: TxnSeq) -> Option<Lsn> {
        seq.checked_sub(self.base)
            .and_then(|i| self.txns.get(i as usize))
            .map(|t| t.final_lsn)
    }

    /// A keepalive reported `wal_end` as sent. With nothing in flight and no
    /// open transaction, everything before it was delivered or was not ours,
    /// so it may be confirmed: this keeps an idle outbox from retaining WAL.
    pub fn idle(&mut self, wal_end: Lsn) {
        if self.txns.is_empty() && self.open.is_none() && wal_end > self.confirmed {
            self.confirmed = wal_end;
        }
    }

    fn advance(&mut self) {
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    if end > self.confirmed {
                        self.confirmed = end;
                    }
                    self.txns.pop_front();
                    self.base += 1;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn confirms_only_a_contiguous_prefix() {
        let mut c = Checkpoint::new(Lsn(10));
        let t1 = c.begin(Lsn(100)).unwrap();
        assert_eq!(c.event().unwrap(), t1);
        c.commit(Lsn(110)).unwrap();
        let t2 = c.begin(Lsn(200)).unwrap();
        c.event().unwrap();
        c.event().unwrap();
        c.commit(Lsn(210)).unwrap();
        // The later transaction is fully acknowledged first: nothing moves.
        c.ack(t2).unwrap();
        c.ack(t2).unwrap();
        assert_eq!(c.confirmed(), Lsn(10));
        c.idle(Lsn(500));
        assert_eq!(
            c.confirmed(),
            Lsn(10),
            "idle must not skip in-flight events"
        );
        c.ack(t1).unwrap();
        assert_eq!(c.confirmed(), Lsn(210));
        assert_eq!(c.inflight(), 0);
        c.idle(Lsn(500));
        assert_eq!(c.confirmed(), Lsn(500));
    }

    #[test]
    fn open_transaction_blocks_confirmation() {
        let mut c = Checkpoint::new(Lsn(0));
        let t = c.begin(Lsn(100)).unwrap();
        c.event().unwrap();
        c.ack(t).unwrap();
        assert_eq!(c.confirmed(), Lsn(0), "acked but not committed");
        c.idle(Lsn(90));
        assert_eq!(c.confirmed(), Lsn(0));
        c.commit(Lsn(120)).unwrap();
        assert_eq!(c.confirmed(), Lsn(120));
    }

    #[test]
    fn holds_keep_the_confirmable_position_back() {
        let mut c = Checkpoint::new(Lsn(0));
        c.begin(Lsn(5)).unwrap();
        c.commit(Lsn(100)).unwrap();
        assert_eq!(c.confirmable(Holds::default()), Lsn(100));
        let recorded = Holds {
            recorded: Some(Lsn(80)),
            ..Holds::default()
        };
        assert_eq!(c.confirmable(recorded), Lsn(80));
        let all = Holds {
            recorded: Some(Lsn(80)),
            open_transaction: Some(Lsn(60)),
            unproven_from: Some(Lsn(70)),
        };
        assert_eq!(c.confirmable(all), Lsn(60));
        // A hold beyond what is acknowledged changes nothing.
        let far = Holds {
            recorded: Some(Lsn(900)),
            ..Holds::default()
        };
        assert_eq!(c.confirmable(far), Lsn(100));
    }

    #[test]
    fn empty_transactions_confirm_at_commit() {
        let mut c = Checkpoint::new(Lsn(0));
        c.begin(Lsn(5)).unwrap();
        c.commit(Lsn(8)).unwrap();
        assert_eq!(c.confirmed(), Lsn(8));
    }

    #[test]
    fn misuse_is_an_error() {
        let mut c = Checkpoint::new(Lsn(0));
        assert_eq!(c.event(), Err(CheckpointError::NoOpenTransaction));
        assert_eq!(c.commit(Lsn(1)), Err(CheckpointError::NoOpenTransaction));
        assert_eq!(c.ack(7), Err(CheckpointError::UnknownTransaction(7)));
        let t = c.begin(Lsn(1)).unwrap();
        assert_eq!(c.begin(Lsn(2)), Err(CheckpointError::NestedBegin(t)));
        assert_eq!(c.ack(t), Err(CheckpointError::ExtraAck(t)));
    }

    /// Random interleavings against a model: the confirmed position never
    /// passes a transaction with an unacknowledged event.
    #[test]
    fn never_confirms_past_an_unacknowledged_event() {
        let mut rng = Rng::seeded(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200 {
            let mut c = Checkpoint::new(Lsn(0));
            // (seq, end_lsn) of every event not yet acknowledged.
            let mut pending: Vec<(TxnSeq, u64)> = Vec::new();
            let mut lsn = 0u64;
            for _ in 0..50 {
                lsn += 10;
                let t = c.begin(Lsn(lsn)).unwrap();
                let n = rng.below(4);
                for _ in 0..n {
                    c.event().unwrap();
                }
                lsn += 5;
                c.commit(Lsn(lsn)).unwrap();
                for _ in 0..n {
                    pending.push((t, lsn));
                }
                // Acknowledge a random subset, in random order.
                for _ in 0..rng.below(4) {
                    if pending.is_empty() {
                        break;
                    }
                    let i = rng.index(pending.len());
                    let (seq, _) = pending.swap_remove(i);
                    c.ack(seq).unwrap();
                }
                if let Some(oldest) = pending.iter().map(|p| p.1).min() {
                    assert!(c.confirmed().0 < oldest, "confirmed past a pending event");
                }
            }
            while let Some((seq, _)) = pending.pop() {
                c.ack(seq).unwrap();
            }
            assert_eq!(c.confirmed(), Lsn(lsn));
        }
    }

    /// The rule that loses data when broken, against a model of the WAL. The
    /// stream is laid out as contiguous records: a transaction is known by its
    /// commit record `[final_lsn, end_lsn)`, a non-transactional message by
    /// its record `[start, lsn)` (the server reports its end). After a
    /// restart at the confirmed position the server resends every unit whose
    /// record starts at or after it, so for every unit not yet fully
    /// acknowledged the confirmed position must not pass the start of its
    /// record. Confirmation never passes the last unit reported (or the
    /// keepalive's `wal_end` when nothing is outstanding) either.
    #[test]
    fn confirmed_never_passes_the_record_of_an_unacknowledged_unit() {
        let mut rng = Rng::seeded(0x2545_F491_4F6C_DD1D);
        struct Unit {
            seq: TxnSeq,
            /// Where the unit's record starts: a restart at or before it
            /// sends the unit again.
            start: u64,
            outstanding: u64,
        }
        for _ in 0..300 {
            let mut c = Checkpoint::new(Lsn(16));
            let mut wal = 16u64; // where the next record starts
            let mut units: Vec<Unit> = Vec::new();
            let mut highest_end = 16u64; // newest position the server reported
            for _ in 0..60 {
                // Sometimes records of other tables or databases in between.
                if rng.below(3) == 0 {
                    wal += 8 * (1 + rng.below(4));
                }
                match rng.below(10) {
                    // A non-transactional message, published at once.
                    0..=2 => {
                        let start = wal;
                        let lsn = start + 40;
                        wal = lsn;
                        let seq = c.begin_standalone(Lsn(lsn)).unwrap();
                        c.event().unwrap();
                        c.commit_standalone().unwrap();
                        highest_end = highest_end.max(lsn);
                        units.push(Unit {
                            seq,
                            start,
                            outstanding: 1,
                        });
                    }
                    // A keepalive: the walsender sent everything up to here.
                    3 => {
                        c.idle(Lsn(highest_end));
                    }
                    // A transaction with 0..3 events, its commit record next.
                    _ => {
                        let final_lsn = wal;
                        let end = final_lsn + 32;
                        wal = end;
                        let seq = c.begin(Lsn(final_lsn)).unwrap();
                        let n = rng.below(4);
                        for _ in 0..n {
                            c.event().unwrap();
                        }
                        c.commit(Lsn(end)).unwrap();
                        highest_end = highest_end.max(end);
                        units.push(Unit {
                            seq,
                            start: final_lsn,
                            outstanding: n,
                        });
                    }
                }
                // Acknowledge a random subset, in random order.
                for _ in 0..rng.below(4) {
                    let open: Vec<usize> = (0..units.len())
                        .filter(|&i| units[i].outstanding > 0)
                        .collect();
                    if open.is_empty() {
                        break;
                    }
                    let i = open[rng.index(open.len())];
                    c.ack(units[i].seq).unwrap();
                    units[i].outstanding -= 1;
                }
                let confirmed = c.confirmed().0;
                for u in units.iter().filter(|u| u.outstanding > 0) {
                    assert!(
                        confirmed <= u.start,
                        "confirmed {confirmed} passes the record at {} of a unit still in flight",
                        u.start
                    );
                }
                assert!(
                    confirmed <= highest_end,
                    "confirmed past what the server sent"
                );
            }
        }
    }

    /// C1 of the December 2026 review: a message acknowledged before the
    /// transaction whose commit record starts at the message's LSN.
    #[test]
    fn a_message_is_confirmed_at_its_own_lsn_not_past_it() {
        let mut c = Checkpoint::new(Lsn(0));
        let m = c.begin_standalone(Lsn(0x15076C8)).unwrap();
        c.event().unwrap();
        c.commit_standalone().unwrap();
        let t = c.begin(Lsn(0x15076C8)).unwrap();
        c.event().unwrap();
        c.commit(Lsn(0x15076F8)).unwrap();
        c.ack(m).unwrap();
        assert_eq!(c.confirmed(), Lsn(0x15076C8));
        c.ack(t).unwrap();
        assert_eq!(c.confirmed(), Lsn(0x15076F8));
    }
}
