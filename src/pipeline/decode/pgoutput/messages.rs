//! The messages pgoutput sends, as values: what the decoder produces.

use bytes::Bytes;

use super::PgTimestamp;
use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(Message),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(StreamPrepare),
}

impl LogicalMessage {
    /// The message kind's name, as the protocol documentation spells it (for
    /// logs and test diagnostics).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Begin(_) => "Begin",
            Self::Commit(_) => "Commit",
            Self::Origin(_) => "Origin",
            Self::Relation(_) => "Relation",
            Self::Type(_) => "Type",
            Self::Insert(_) => "Insert",
            Self::Update(_) => "Update",
            Self::Delete(_) => "Delete",
            Self::Truncate(_) => "Truncate",
            Self::Message(_) => "Message",
            Self::StreamStart(_) => "StreamStart",
            Self::StreamStop => "StreamStop",
            Self::StreamCommit(_) => "StreamCommit",
            Self::StreamAbort(_) => "StreamAbort",
            Self::BeginPrepare(_) => "BeginPrepare",
            Self::Prepare(_) => "Prepare",
            Self::CommitPrepared(_) => "CommitPrepared",
            Self::RollbackPrepared(_) => "RollbackPrepared",
            Self::StreamPrepare(_) => "StreamPrepare",
        }
    }
}

/// The column values of one row, in the relation's column order.
pub type TupleData = Vec<TupleValue>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the transaction in the WAL: the position to confirm once every
    /// event of this transaction (and all before it) is delivered.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// The transaction came from another node (replication origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// Describes a relation before its first change in a session (and again after
/// it changes). Inside a streamed block (protocol ≥ 2) the message also
/// carries an xid: see [`Decoder::last_xid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Empty for `pg_catalog`, as the server sends it.
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 1 marks a column that is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Describes a non-built-in data type used by a following Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// Present inside a streamed block (protocol ≥ 2).
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// A new row. Inside a streamed block (protocol ≥ 2) the message also carries
/// an xid: see [`Decoder::last_xid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_oid: u32,
    pub tuple: Vec<TupleValue>,
}

/// Which old values an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTupleKind {
    /// 'K': the replica identity key columns (other columns are null).
    Key,
    /// 'O': the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    pub kind: OldTupleKind,
    pub tuple: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Present inside a streamed block (protocol ≥ 2).
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// Sent only when the key changed ('K') or with `REPLICA IDENTITY FULL` ('O').
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Present inside a streamed block (protocol ≥ 2).
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Present inside a streamed block (protocol ≥ 2).
    pub xid: Option<u32>,
    /// Bit flags: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    pub relation_oids: Vec<u32>,
}

impl Truncate {
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// A `pg_logical_emit_message` record (sent when `messages = true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Present inside a streamed block (protocol ≥ 2); the server streams only
    /// transactional messages.
    pub xid: Option<u32>,
    /// Bit 1: the message is transactional.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

impl Message {
    pub fn transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// Top-level transaction xid.
    pub xid: u32,
    /// True for the first block of this transaction.
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction xid.
    pub xid: u32,
    /// The aborted subtransaction; equal to `xid` when the whole transaction
    /// aborted.
    pub subxid: u32,
    /// Abort LSN and time: only in protocol 4 with `streaming = parallel`.
    pub abort: Option<AbortInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortInfo {
    pub abort_lsn: Lsn,
    pub abort_time: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

/// Prepare ('P') and Stream Prepare ('p') share this layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

pub type StreamPrepare = Prepare;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    /// End LSN of the PREPARE TRANSACTION being rolled back.
    pub prepare_end_lsn: Lsn,
    /// End LSN of the ROLLBACK PREPARED.
    pub rollback_end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub rollback_time: PgTimestamp,
    pub xid: u32,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value that did not change; never sent for an INSERT.
    UnchangedToast,
    /// The value in the type's text output format.
    Text(Bytes),
    /// The value in the type's binary send format (binary mode only).
    Binary(Bytes),
}
