//! The session's place in the stream: where it resumed, how far the
//! server's WAL is, and the commit time of the transaction being decoded.

use crate::lsn::Lsn;

pub(super) struct Position {
    /// The slot's confirmed position when this session started.
    pub(super) resumed_from: Lsn,
    /// Whether the first transaction not already in Kafka was seen.
    first_begin_seen: bool,
    /// Commit timestamp of the open transaction (from Begin).
    pub(super) commit_time: i64,
    /// The newest server WAL position the walsender reported.
    pub(super) server_wal: Lsn,
}

impl Position {
    pub(super) fn new(confirmed: Lsn) -> Position {
        Position {
            resumed_from: confirmed,
            first_begin_seen: false,
            commit_time: 0,
            server_wal: confirmed,
        }
    }

    /// The server said its WAL reached `wal_end`.
    pub(super) fn heard(&mut self, wal_end: Lsn) {
        self.server_wal = self.server_wal.max(wal_end);
    }

    /// A transaction to publish begins. The server resumes after the slot's
    /// confirmed position; a first transaction at or before it means the
    /// server is resending confirmed work (duplicates, not loss): say so.
    pub(super) fn first_begin(&mut self, final_lsn: Lsn) {
        if self.first_begin_seen {
            return;
        }
        self.first_begin_seen = true;
        if final_lsn <= self.resumed_from {
            tracing::warn!(
                first_commit = %final_lsn,
                resumed_from = %self.resumed_from,
                "the server sent a transaction at or before the resume position; it will be published again"
            );
        }
    }
}
