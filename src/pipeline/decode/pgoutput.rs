//! Decoder for the `pgoutput` logical replication message format, protocol
//! versions 1 to 4.
//!
//! Pure and I/O-free: it turns the payload of one XLogData message into a typed
//! value. Everything here comes from the network, so nothing may panic: every
//! read is bounds-checked, malformed input becomes a [`DecodeError`], and every
//! message must be consumed exactly (left-over bytes are an error, because they
//! mean the message is not the shape we think it is).
//!
//! Text column values are returned as [`Bytes`] slices of the input buffer, so a
//! payload travels from the socket to the producer without being copied.
//!
//! # Versions and streaming
//!
//! The layout of a few messages depends on state the message itself does not
//! carry, so decoding a whole stream goes through a [`Decoder`]:
//!
//! - From protocol 2 on, messages sent inside a streamed block (between Stream
//!   Start and Stream Stop) start with the xid of the (sub)transaction they
//!   belong to: Relation, Type, Insert, Update, Delete, Truncate and Message.
//!   The new message structs carry it as `xid: Option<u32>`. [`Relation`] and
//!   [`Insert`] keep their historical shape (other modules construct them), so
//!   for them, and for every other kind alike, [`Decoder::last_xid`] returns the
//!   xid prefix of the message just decoded. Note that it is the xid of the
//!   *subtransaction* that made the change, which may differ from the top-level
//!   xid of the Stream Start ([`Decoder::stream_xid`]).
//! - Stream Abort carries an abort LSN and abort time only in protocol 4 with
//!   `streaming = parallel`. Both layouts end right after their last field, so a
//!   protocol-4 decoder accepts either, telling them apart by length; protocols
//!   1 to 3 accept only the short one.
//!
//! The relay requests the newest protocol the server speaks (1 before
//! PostgreSQL 14, up to 4 from 16; `--protocol-version` overrides it); the
//! free function [`decode`] decodes one message as protocol 1 outside any
//! streamed block, for tools and tests.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch.
pub type PgTimestamp = i64;

/// Seconds between the Unix epoch and the Postgres epoch.
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// The highest protocol version whose layouts this module knows.
pub const MAX_PROTOCOL_VERSION: u32 = 4;

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error(
        "pgoutput message truncated while reading {what} ({needed} bytes needed, {available} left)"
    )]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("unknown pgoutput message tag {tag:#04x} ({printable:?})")]
    UnknownMessage { tag: u8, printable: char },
    #[error("unknown tuple data kind {kind:#04x} in column {column}")]
    UnknownTupleKind { kind: u8, column: usize },
    #[error("expected tuple marker 'N' in an INSERT, got {0:#04x}")]
    UnexpectedTupleMarker(u8),
    #[error("expected tuple marker {expected} in {tag:?} message, got {got:#04x}")]
    BadTupleMarker {
        tag: char,
        expected: &'static str,
        got: u8,
    },
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("{what} has no NUL terminator")]
    UnterminatedString { what: &'static str },
    #[error("{left} unexpected bytes after a complete {tag:?} message")]
    Trailing { tag: char, left: usize },
    #[error("negative {what}: {value}")]
    NegativeLength { what: &'static str, value: i64 },
}

/// Decodes the payload of one XLogData message as protocol version 1, outside
/// any streamed block. Stateless: for protocol 2 and later use [`Decoder`].
pub fn decode(buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    Decoder::new(1).decode(buf)
}

/// Decodes a stream of pgoutput messages of one protocol version, tracking
/// whether a streamed block (Stream Start … Stream Stop) is open, since that
/// decides whether changes carry an xid.
///
/// The tracking is deliberately lenient: Stream Start opens a block and Stream
/// Stop closes it, whatever the state before, so a decoder never refuses a
/// well-formed message because of an earlier one. Checking that blocks nest
/// properly is the caller's business (the xid accessors make it easy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    protocol: u32,
    in_stream: bool,
    /// Top-level xid of the open streamed block.
    stream_xid: Option<u32>,
    /// The xid prefix of the message last decoded.
    last_xid: Option<u32>,
}

impl Decoder {
    /// A decoder for `protocol_version` (the `proto_version` option given to
    /// `START_REPLICATION`), outside any streamed block. Versions above
    /// [`MAX_PROTOCOL_VERSION`] are decoded with the version 4 layouts, and 0
    /// like 1.
    pub fn new(protocol_version: u32) -> Self {
        Self {
            protocol: protocol_version,
            in_stream: false,
            stream_xid: None,
            last_xid: None,
        }
    }

    pub fn protocol_version(&self) -> u32 {
        self.protocol
    }

    /// True between a Stream Start and the following Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// The top-level xid of the open streamed block, if any.
    pub fn stream_xid(&self) -> Option<u32> {
        self.stream_xid
    }

    /// The xid prefix carried by the message just decoded: `Some` only for a
    /// Relation, Type, Insert, Update, Delete, Truncate or Message decoded in
    /// a streamed block with protocol ≥ 2, `None` otherwise (and after an
    /// error). This is how a streamed [`Insert`] or [`Relation`] exposes its
    /// (sub)transaction.
    pub fn last_xid(&self) -> Option<u32> {
        self.last_xid
    }

    /// Decodes the payload of one XLogData message. On error the stream state
    /// is unchanged.
    pub fn decode(&mut self, mut buf: Bytes) -> Result<LogicalMessage, DecodeError> {
        self.last_xid = None;
        if !buf.has_remaining() {
            return Err(DecodeError::Empty);
        }
        let tag = buf.get_u8();
        let streamed = self.protocol >= 2 && self.in_stream;
        let (msg, xid) = decode_body(tag, &mut buf, streamed, self.protocol)?;
        // Bytes left over mean the message is not the shape we think it is (a
        // protocol version mismatch, say): refuse rather than guess.
        if buf.has_remaining() {
            return Err(DecodeError::Trailing {
                tag: char::from(tag),
                left: buf.remaining(),
            });
        }
        match &msg {
            LogicalMessage::StreamStart(s) => {
                self.in_stream = true;
                self.stream_xid = Some(s.xid);
            }
            LogicalMessage::StreamStop => {
                self.in_stream = false;
                self.stream_xid = None;
            }
            _ => {}
        }
        self.last_xid = xid;
        Ok(msg)
    }
}

/// Reads the leading xid of a message that has one in a streamed block.
fn stream_xid(
    r: &mut Bytes,
    streamed: bool,
    what: &'static str,
) -> Result<Option<u32>, DecodeError> {
    if streamed {
        read_u32(r, what).map(Some)
    } else {
        Ok(None)
    }
}

fn decode_body(
    tag: u8,
    r: &mut Bytes,
    streamed: bool,
    protocol: u32,
) -> Result<(LogicalMessage, Option<u32>), DecodeError> {
    use LogicalMessage as M;
    let mut xid = None;
    let msg = match tag {
        b'B' => M::Begin(Begin {
            final_lsn: read_lsn(r, "Begin final LSN")?,
            commit_time: read_i64(r, "Begin commit timestamp")?,
            xid: read_u32(r, "Begin xid")?,
        }),
        b'C' => M::Commit(Commit {
            flags: read_u8(r, "Commit flags")?,
            commit_lsn: read_lsn(r, "Commit LSN")?,
            end_lsn: read_lsn(r, "Commit end LSN")?,
            commit_time: read_i64(r, "Commit timestamp")?,
        }),
        b'O' => M::Origin(Origin {
            commit_lsn: read_lsn(r, "Origin commit LSN")?,
            name: read_cstr(r, "Origin name")?,
        }),
        b'R' => {
            xid = stream_xid(r, streamed, "Relation xid")?;
            M::Relation(decode_relation(r)?)
        }
        b'Y' => {
            xid = stream_xid(r, streamed, "Type xid")?;
            M::Type(Type {
                xid,
                oid: read_u32(r, "Type OID")?,
                namespace: read_cstr(r, "Type namespace")?,
                name: read_cstr(r, "Type name")?,
            })
        }
        b'I' => {
            xid = stream_xid(r, streamed, "Insert xid")?;
            let relation_oid = read_u32(r, "Insert relation OID")?;
            let marker = read_u8(r, "Insert tuple marker")?;
            if marker != b'N' {
                return Err(DecodeError::UnexpectedTupleMarker(marker));
            }
            let tuple = decode_tuple(r)?;
            M::Insert(Insert {
                relation_oid,
                tuple,
            })
        }
        b'U' => {
            xid = stream_xid(r, streamed, "Update xid")?;
            let relation_oid = read_u32(r, "Update relation OID")?;
            let mut marker = read_u8(r, "Update tuple marker")?;
            let old = match old_tuple_kind(marker) {
                Some(kind) => {
                    let tuple = decode_tuple(r)?;
                    marker = read_u8(r, "Update new tuple marker")?;
                    Some(OldTuple { kind, tuple })
                }
                None => None,
            };
            if marker != b'N' {
                return Err(DecodeError::BadTupleMarker {
                    tag: 'U',
                    expected: if old.is_some() {
                        "'N'"
                    } else {
                        "'K', 'O' or 'N'"
                    },
                    got: marker,
                });
            }
            let new = decode_tuple(r)?;
            M::Update(Update {
                xid,
                relation_oid,
                old,
                new,
            })
        }
        b'D' => {
            xid = stream_xid(r, streamed, "Delete xid")?;
            let relation_oid = read_u32(r, "Delete relation OID")?;
            let marker = read_u8(r, "Delete tuple marker")?;
            let kind = old_tuple_kind(marker).ok_or(DecodeError::BadTupleMarker {
                tag: 'D',
                expected: "'K' or 'O'",
                got: marker,
            })?;
            let tuple = decode_tuple(r)?;
            M::Delete(Delete {
                xid,
                relation_oid,
                old: OldTuple { kind, tuple },
            })
        }
        b'T' => {
            xid = stream_xid(r, streamed, "Truncate xid")?;
            let count = read_i32(r, "Truncate relation count")?;
            let count = non_negative(count, "Truncate relation count")?;
            let options = read_u8(r, "Truncate options")?;
            // Do not let a forged count reserve more than the message holds.
            let mut relation_oids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relation_oids.push(read_u32(r, "Truncate relation OID")?);
            }
            M::Truncate(Truncate {
                xid,
                options,
                relation_oids,
            })
        }
        b'M' => {
            xid = stream_xid(r, streamed, "Message xid")?;
            let flags = read_u8(r, "Message flags")?;
            let lsn = read_lsn(r, "Message LSN")?;
            let prefix = read_cstr(r, "Message prefix")?;
            let content = read_len_prefixed(r, "Message content")?;
            M::Message(Message {
                xid,
                flags,
                lsn,
                prefix,
                content,
            })
        }
        b'S' => M::StreamStart(StreamStart {
            xid: read_u32(r, "Stream Start xid")?,
            first_segment: read_u8(r, "Stream Start first-segment flag")? != 0,
        }),
        b'E' => M::StreamStop,
        b'c' => M::StreamCommit(StreamCommit {
            xid: read_u32(r, "Stream Commit xid")?,
            flags: read_u8(r, "Stream Commit flags")?,
            commit_lsn: read_lsn(r, "Stream Commit LSN")?,
            end_lsn: read_lsn(r, "Stream Commit end LSN")?,
            commit_time: read_i64(r, "Stream Commit timestamp")?,
        }),
        b'A' => {
            let xid = read_u32(r, "Stream Abort xid")?;
            let subxid = read_u32(r, "Stream Abort subxid")?;
            // Protocol 4 adds the abort LSN and time, but only with parallel
            // streaming; the message ends after its last field either way.
            let abort = if protocol >= 4 && r.has_remaining() {
                Some(AbortInfo {
                    abort_lsn: read_lsn(r, "Stream Abort LSN")?,
                    abort_time: read_i64(r, "Stream Abort timestamp")?,
                })
            } else {
                None
            };
            M::StreamAbort(StreamAbort { xid, subxid, abort })
        }
        b'b' => M::BeginPrepare(BeginPrepare {
            prepare_lsn: read_lsn(r, "Begin Prepare LSN")?,
            end_lsn: read_lsn(r, "Begin Prepare end LSN")?,
            prepare_time: read_i64(r, "Begin Prepare timestamp")?,
            xid: read_u32(r, "Begin Prepare xid")?,
            gid: read_cstr(r, "Begin Prepare GID")?,
        }),
        b'P' => M::Prepare(decode_prepare(r, false)?),
        b'p' => M::StreamPrepare(decode_prepare(r, true)?),
        b'K' => M::CommitPrepared(CommitPrepared {
            flags: read_u8(r, "Commit Prepared flags")?,
            commit_lsn: read_lsn(r, "Commit Prepared LSN")?,
            end_lsn: read_lsn(r, "Commit Prepared end LSN")?,
            commit_time: read_i64(r, "Commit Prepared timestamp")?,
            xid: read_u32(r, "Commit Prepared xid")?,
            gid: read_cstr(r, "Commit Prepared GID")?,
        }),
        b'r' => M::RollbackPrepared(RollbackPrepared {
            flags: read_u8(r, "Rollback Prepared flags")?,
            prepare_end_lsn: read_lsn(r, "Rollback Prepared prepare end LSN")?,
            rollback_end_lsn: read_lsn(r, "Rollback Prepared end LSN")?,
            prepare_time: read_i64(r, "Rollback Prepared prepare timestamp")?,
            rollback_time: read_i64(r, "Rollback Prepared timestamp")?,
            xid: read_u32(r, "Rollback Prepared xid")?,
            gid: read_cstr(r, "Rollback Prepared GID")?,
        }),
        other => {
            return Err(DecodeError::UnknownMessage {
                tag: other,
                printable: char::from(other),
            })
        }
    };
    Ok((msg, xid))
}

fn old_tuple_kind(marker: u8) -> Option<OldTupleKind> {
    match marker {
        b'K' => Some(OldTupleKind::Key),
        b'O' => Some(OldTupleKind::Full),
        _ => None,
    }
}

fn decode_prepare(r: &mut Bytes, stream: bool) -> Result<Prepare, DecodeError> {
    let name = |prepare, stream_prepare| if stream { stream_prepare } else { prepare };
    Ok(Prepare {
        flags: read_u8(r, name("Prepare flags", "Stream Prepare flags"))?,
        prepare_lsn: read_lsn(r, name("Prepare LSN", "Stream Prepare LSN"))?,
        end_lsn: read_lsn(r, name("Prepare end LSN", "Stream Prepare end LSN"))?,
        prepare_time: read_i64(r, name("Prepare timestamp", "Stream Prepare timestamp"))?,
        xid: read_u32(r, name("Prepare xid", "Stream Prepare xid"))?,
        gid: read_cstr(r, name("Prepare GID", "Stream Prepare GID"))?,
    })
}

fn decode_relation(r: &mut Bytes) -> Result<Relation, DecodeError> {
    let oid = read_u32(r, "Relation OID")?;
    let namespace = read_cstr(r, "Relation namespace")?;
    let name = read_cstr(r, "Relation name")?;
    let replica_identity = read_u8(r, "Relation replica identity")?;
    let ncols = read_i16(r, "Relation column count")?;
    let ncols = non_negative(ncols.into(), "Relation column count")?;
    // Each column takes at least 10 bytes; do not let a forged count reserve
    // more memory than the message could describe.
    let mut columns = Vec::with_capacity(ncols.min(r.remaining() / 10));
    for _ in 0..ncols {
        columns.push(Column {
            flags: read_u8(r, "Relation column flags")?,
            name: read_cstr(r, "Relation column name")?,
            type_oid: read_u32(r, "Relation column type OID")?,
            type_modifier: read_i32(r, "Relation column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn decode_tuple(r: &mut Bytes) -> Result<TupleData, DecodeError> {
    let ncols = read_i16(r, "tuple column count")?;
    let ncols = non_negative(ncols.into(), "tuple column count")?;
    let mut values = Vec::with_capacity(ncols.min(r.remaining()));
    for column in 0..ncols {
        let kind = read_u8(r, "tuple data kind")?;
        values.push(match kind {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(read_len_prefixed(r, "column value")?),
            b'b' => TupleValue::Binary(read_len_prefixed(r, "column value")?),
            kind => return Err(DecodeError::UnknownTupleKind { kind, column }),
        });
    }
    Ok(values)
}

fn non_negative(value: i32, what: &'static str) -> Result<usize, DecodeError> {
    usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
        what,
        value: i64::from(value),
    })
}

fn need(r: &Bytes, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if r.remaining() < n {
        Err(DecodeError::Truncated {
            what,
            needed: n,
            available: r.remaining(),
        })
    } else {
        Ok(())
    }
}

fn read_u8(r: &mut Bytes, what: &'static str) -> Result<u8, DecodeError> {
    need(r, 1, what)?;
    Ok(r.get_u8())
}

fn read_i16(r: &mut Bytes, what: &'static str) -> Result<i16, DecodeError> {
    need(r, 2, what)?;
    Ok(r.get_i16())
}

fn read_u32(r: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    need(r, 4, what)?;
    Ok(r.get_u32())
}

fn read_i32(r: &mut Bytes, what: &'static str) -> Result<i32, DecodeError> {
    need(r, 4, what)?;
    Ok(r.get_i32())
}

fn read_u64(r: &mut Bytes, what: &'static str) -> Result<u64, DecodeError> {
    need(r, 8, what)?;
    Ok(r.get_u64())
}

fn read_lsn(r: &mut Bytes, what: &'static str) -> Result<Lsn, DecodeError> {
    read_u64(r, what).map(Lsn)
}

fn read_i64(r: &mut Bytes, what: &'static str) -> Result<i64, DecodeError> {
    need(r, 8, what)?;
    Ok(r.get_i64())
}

fn read_len_prefixed(r: &mut Bytes, what: &'static str) -> Result<Bytes, DecodeError> {
    let len = read_i32(r, "value length")?;
    let len = non_negative(len, "value length")?;
    need(r, len, what)?;
    Ok(r.split_to(len))
}

fn read_cstr(r: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    let end = r
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::UnterminatedString { what })?;
    let s = r.split_to(end);
    r.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { what })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    /// Builds synthetic messages field by field.
    #[derive(Default)]
    struct W(BytesMut);

    impl W {
        fn tag(t: u8) -> Self {
            let mut w = W::default();
            w.0.put_u8(t);
            w
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.put_u8(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.put_i16(v);
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.put_u32(v);
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.put_i32(v);
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.put_u64(v);
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.put_i64(v);
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.put_slice(s.as_bytes());
            self.0.put_u8(0);
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.put_slice(b);
            self
        }
        /// A tuple: one Text "42", one Null, one unchanged TOAST, one Binary.
        fn tuple(self) -> Self {
            self.i16(4)
                .u8(b't')
                .i32(2)
                .raw(b"42")
                .u8(b'n')
                .u8(b'u')
                .u8(b'b')
                .i32(1)
                .raw(&[0xff])
        }
        fn bytes(self) -> Bytes {
            self.0.freeze()
        }
    }

    fn tuple() -> TupleData {
        vec![
            TupleValue::Text(Bytes::from_static(b"42")),
            TupleValue::Null,
            TupleValue::UnchangedToast,
            TupleValue::Binary(Bytes::from_static(&[0xff])),
        ]
    }

    /// Opens a streamed block in `d` for top-level xid `xid`.
    fn open_stream(d: &mut Decoder, xid: u32) {
        let m = d
            .decode(W::tag(b'S').u32(xid).u8(1).bytes())
            .expect("Stream Start");
        assert_eq!(
            m,
            LogicalMessage::StreamStart(StreamStart {
                xid,
                first_segment: true
            })
        );
    }

    /// Every message kind in its plain (non-streamed, protocol 1) layout, with
    /// its expected decoding.
    fn plain_samples() -> Vec<(Bytes, LogicalMessage)> {
        use LogicalMessage as M;
        vec![
            (
                W::tag(b'B').u64(0x10).i64(-7).u32(700).bytes(),
                M::Begin(Begin {
                    final_lsn: Lsn(0x10),
                    commit_time: -7,
                    xid: 700,
                }),
            ),
            (
                W::tag(b'C').u8(0).u64(0x10).u64(0x18).i64(9).bytes(),
                M::Commit(Commit {
                    flags: 0,
                    commit_lsn: Lsn(0x10),
                    end_lsn: Lsn(0x18),
                    commit_time: 9,
                }),
            ),
            (
                W::tag(b'O').u64(0x99).str("node_a").bytes(),
                M::Origin(Origin {
                    commit_lsn: Lsn(0x99),
                    name: "node_a".into(),
                }),
            ),
            (
                W::tag(b'R')
                    .u32(16384)
                    .str("public")
                    .str("outbox")
                    .u8(b'd')
                    .i16(2)
                    .u8(1)
                    .str("id")
                    .u32(20)
                    .i32(-1)
                    .u8(0)
                    .str("note")
                    .u32(1043)
                    .i32(259)
                    .bytes(),
                M::Relation(Relation {
                    oid: 16384,
                    namespace: "public".into(),
                    name: "outbox".into(),
                    replica_identity: b'd',
                    columns: vec![
                        Column {
                            flags: 1,
                            name: "id".into(),
                            type_oid: 20,
                            type_modifier: -1,
                        },
                        Column {
                            flags: 0,
                            name: "note".into(),
                            type_oid: 1043,
                            type_modifier: 259,
                        },
                    ],
                }),
            ),
            (
                W::tag(b'Y').u32(16400).str("public").str("mood").bytes(),
                M::Type(Type {
                    xid: None,
                    oid: 16400,
                    namespace: "public".into(),
                    name: "mood".into(),
                }),
            ),
            (
                W::tag(b'I').u32(16384).u8(b'N').tuple().bytes(),
                M::Insert(Insert {
                    relation_oid: 16384,
                    tuple: tuple(),
                }),
            ),
            (
                W::tag(b'U').u32(16384).u8(b'N').tuple().bytes(),
                M::Update(Update {
                    xid: None,
                    relation_oid: 16384,
                    old: None,
                    new: tuple(),
                }),
            ),
            (
                W::tag(b'U')
                    .u32(16384)
                    .u8(b'K')
                    .i16(1)
                    .u8(b't')
                    .i32(1)
                    .raw(b"7")
                    .u8(b'N')
                    .tuple()
                    .bytes(),
                M::Update(Update {
                    xid: None,
                    relation_oid: 16384,
                    old: Some(OldTuple {
                        kind: OldTupleKind::Key,
                        tuple: vec![TupleValue::Text(Bytes::from_static(b"7"))],
                    }),
                    new: tuple(),
                }),
            ),
            (
                W::tag(b'U')
                    .u32(16384)
                    .u8(b'O')
                    .tuple()
                    .u8(b'N')
                    .i16(0)
                    .bytes(),
                M::Update(Update {
                    xid: None,
                    relation_oid: 16384,
                    old: Some(OldTuple {
                        kind: OldTupleKind::Full,
                        tuple: tuple(),
                    }),
                    new: vec![],
                }),
            ),
            (
                W::tag(b'D').u32(16384).u8(b'K').tuple().bytes(),
                M::Delete(Delete {
                    xid: None,
                    relation_oid: 16384,
                    old: OldTuple {
                        kind: OldTupleKind::Key,
                        tuple: tuple(),
                    },
                }),
            ),
            (
                W::tag(b'D').u32(16384).u8(b'O').tuple().bytes(),
                M::Delete(Delete {
                    xid: None,
                    relation_oid: 16384,
                    old: OldTuple {
                        kind: OldTupleKind::Full,
                        tuple: tuple(),
                    },
                }),
            ),
            (
                W::tag(b'T').i32(2).u8(3).u32(16384).u32(16390).bytes(),
                M::Truncate(Truncate {
                    xid: None,
                    options: 3,
                    relation_oids: vec![16384, 16390],
                }),
            ),
            (
                W::tag(b'M')
                    .u8(1)
                    .u64(0x42)
                    .str("p")
                    .i32(5)
                    .raw(b"hello")
                    .bytes(),
                M::Message(Message {
                    xid: None,
                    flags: 1,
                    lsn: Lsn(0x42),
                    prefix: "p".into(),
                    content: Bytes::from_static(b"hello"),
                }),
            ),
            (
                W::tag(b'S').u32(900).u8(0).bytes(),
                M::StreamStart(StreamStart {
                    xid: 900,
                    first_segment: false,
                }),
            ),
            (W::tag(b'E').bytes(), M::StreamStop),
            (
                W::tag(b'c')
                    .u32(900)
                    .u8(0)
                    .u64(0x50)
                    .u64(0x58)
                    .i64(11)
                    .bytes(),
                M::StreamCommit(StreamCommit {
                    xid: 900,
                    flags: 0,
                    commit_lsn: Lsn(0x50),
                    end_lsn: Lsn(0x58),
                    commit_time: 11,
                }),
            ),
            (
                W::tag(b'A').u32(900).u32(901).bytes(),
                M::StreamAbort(StreamAbort {
                    xid: 900,
                    subxid: 901,
                    abort: None,
                }),
            ),
            (
                W::tag(b'b')
                    .u64(0x60)
                    .u64(0x68)
                    .i64(12)
                    .u32(901)
                    .str("gid-1")
                    .bytes(),
                M::BeginPrepare(BeginPrepare {
                    prepare_lsn: Lsn(0x60),
                    end_lsn: Lsn(0x68),
                    prepare_time: 12,
                    xid: 901,
                    gid: "gid-1".into(),
                }),
            ),
            (
                W::tag(b'P')
                    .u8(0)
                    .u64(0x60)
                    .u64(0x68)
                    .i64(12)
                    .u32(901)
                    .str("gid-1")
                    .bytes(),
                M::Prepare(Prepare {
                    flags: 0,
                    prepare_lsn: Lsn(0x60),
                    end_lsn: Lsn(0x68),
                    prepare_time: 12,
                    xid: 901,
                    gid: "gid-1".into(),
                }),
            ),
            (
                W::tag(b'K')
                    .u8(0)
                    .u64(0x70)
                    .u64(0x78)
                    .i64(13)
                    .u32(901)
                    .str("gid-1")
                    .bytes(),
                M::CommitPrepared(CommitPrepared {
                    flags: 0,
                    commit_lsn: Lsn(0x70),
                    end_lsn: Lsn(0x78),
                    commit_time: 13,
                    xid: 901,
                    gid: "gid-1".into(),
                }),
            ),
            (
                W::tag(b'r')
                    .u8(0)
                    .u64(0x68)
                    .u64(0x80)
                    .i64(12)
                    .i64(14)
                    .u32(902)
                    .str("gid-2")
                    .bytes(),
                M::RollbackPrepared(RollbackPrepared {
                    flags: 0,
                    prepare_end_lsn: Lsn(0x68),
                    rollback_end_lsn: Lsn(0x80),
                    prepare_time: 12,
                    rollback_time: 14,
                    xid: 902,
                    gid: "gid-2".into(),
                }),
            ),
            (
                W::tag(b'p')
                    .u8(0)
                    .u64(0x90)
                    .u64(0x98)
                    .i64(15)
                    .u32(903)
                    .str("gid-3")
                    .bytes(),
                M::StreamPrepare(Prepare {
                    flags: 0,
                    prepare_lsn: Lsn(0x90),
                    end_lsn: Lsn(0x98),
                    prepare_time: 15,
                    xid: 903,
                    gid: "gid-3".into(),
                }),
            ),
        ]
    }

    /// The messages that take an xid prefix in a streamed block (protocol ≥ 2),
    /// built with `xid` prefixed, and their decoding.
    fn streamed_samples(xid: u32) -> Vec<(Bytes, LogicalMessage)> {
        plain_samples()
            .into_iter()
            .filter(|(b, _)| b"RYIUDTM".contains(&b[0]))
            .map(|(b, m)| {
                let mut s = BytesMut::new();
                s.put_u8(b[0]);
                s.put_u32(xid);
                s.put_slice(&b[1..]);
                let m = match m {
                    LogicalMessage::Type(t) => LogicalMessage::Type(Type {
                        xid: Some(xid),
                        ..t
                    }),
                    LogicalMessage::Update(u) => LogicalMessage::Update(Update {
                        xid: Some(xid),
                        ..u
                    }),
                    LogicalMessage::Delete(d) => LogicalMessage::Delete(Delete {
                        xid: Some(xid),
                        ..d
                    }),
                    LogicalMessage::Truncate(t) => LogicalMessage::Truncate(Truncate {
                        xid: Some(xid),
                        ..t
                    }),
                    LogicalMessage::Message(m) => LogicalMessage::Message(Message {
                        xid: Some(xid),
                        ..m
                    }),
                    other => other,
                };
                (s.freeze(), m)
            })
            .collect()
    }

    #[test]
    fn every_kind_decodes_in_every_version_outside_a_stream() {
        let samples = plain_samples();
        let tags: Vec<u8> = samples.iter().map(|(b, _)| b[0]).collect();
        for t in b"BCORYIUDTMSEcAbPKrp" {
            assert!(tags.contains(t), "no sample for {:?}", char::from(*t));
        }
        for v in 1..=4 {
            for (bytes, expected) in &samples {
                let mut d = Decoder::new(v);
                assert_eq!(
                    d.decode(bytes.clone()).as_ref(),
                    Ok(expected),
                    "protocol {v}"
                );
                assert_eq!(d.last_xid(), None);
            }
        }
        // The free function is protocol 1.
        for (bytes, expected) in samples {
            assert_eq!(decode(bytes), Ok(expected));
        }
    }

    #[test]
    fn streamed_changes_carry_an_xid_from_protocol_2() {
        for v in 2..=4 {
            let mut d = Decoder::new(v);
            open_stream(&mut d, 900);
            assert!(d.in_stream());
            assert_eq!(d.stream_xid(), Some(900));
            for (bytes, expected) in streamed_samples(901) {
                assert_eq!(d.decode(bytes).as_ref(), Ok(&expected), "protocol {v}");
                assert_eq!(d.last_xid(), Some(901), "{}", expected.kind());
                assert!(d.in_stream());
            }
            // Messages without an xid prefix decode as usual inside a block.
            let origin = W::tag(b'O').u64(1).str("x").bytes();
            assert!(matches!(d.decode(origin), Ok(LogicalMessage::Origin(_))));
            assert_eq!(d.last_xid(), None);

            assert_eq!(
                d.decode(W::tag(b'E').bytes()),
                Ok(LogicalMessage::StreamStop)
            );
            assert!(!d.in_stream());
            assert_eq!(d.stream_xid(), None);
            // After Stream Stop the plain layout applies again.
            for (bytes, expected) in plain_samples() {
                if bytes[0] == b'S' {
                    continue;
                }
                assert_eq!(d.decode(bytes), Ok(expected));
            }
        }
    }

    #[test]
    fn streamed_layout_is_wrong_outside_a_stream_and_vice_versa() {
        // With the xid prefix but no open block, and without it inside one,
        // each message either fails or decodes to something else: never the
        // same value.
        for ((streamed, s_expected), (plain, p_expected)) in streamed_samples(901).into_iter().zip(
            plain_samples()
                .into_iter()
                .filter(|(b, _)| b"RYIUDTM".contains(&b[0])),
        ) {
            let mut d = Decoder::new(2);
            assert_ne!(d.decode(streamed).as_ref(), Ok(&s_expected));
            open_stream(&mut d, 900);
            assert_ne!(d.decode(plain).as_ref(), Ok(&p_expected));
        }
    }

    #[test]
    fn protocol_1_has_no_xid_prefix_even_after_stream_start() {
        let mut d = Decoder::new(1);
        open_stream(&mut d, 900);
        for (bytes, expected) in plain_samples() {
            if bytes[0] == b'S' || bytes[0] == b'E' {
                continue;
            }
            assert_eq!(d.decode(bytes), Ok(expected));
            assert_eq!(d.last_xid(), None);
        }
    }

    #[test]
    fn stream_abort_info_only_in_protocol_4() {
        let long = W::tag(b'A').u32(900).u32(901).u64(0x77).i64(123).bytes();
        let mut d = Decoder::new(4);
        assert_eq!(
            d.decode(long.clone()),
            Ok(LogicalMessage::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 901,
                abort: Some(AbortInfo {
                    abort_lsn: Lsn(0x77),
                    abort_time: 123
                }),
            }))
        );
        // Protocol 4 without parallel streaming: the short form.
        assert_eq!(
            d.decode(W::tag(b'A').u32(900).u32(900).bytes()),
            Ok(LogicalMessage::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 900,
                abort: None,
            }))
        );
        for v in 1..=3 {
            assert_eq!(
                Decoder::new(v).decode(long.clone()),
                Err(DecodeError::Trailing { tag: 'A', left: 16 })
            );
        }
        // A partial abort info is truncated, not silently dropped.
        for n in 10..long.len() {
            assert!(matches!(
                Decoder::new(4).decode(long.slice(..n)),
                Err(DecodeError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn stream_state_changes_only_on_success() {
        let mut d = Decoder::new(2);
        assert!(d.decode(W::tag(b'S').u32(5).bytes()).is_err());
        assert!(!d.in_stream());
        open_stream(&mut d, 5);
        assert!(d.decode(W::tag(b'E').u8(0).bytes()).is_err());
        assert!(d.in_stream());
        assert_eq!(d.stream_xid(), Some(5));
        // A failed decode clears last_xid.
        d.decode(W::tag(b'I').u32(6).u32(1).u8(b'N').i16(0).bytes())
            .unwrap();
        assert_eq!(d.last_xid(), Some(6));
        assert!(d.decode(Bytes::new()).is_err());
        assert_eq!(d.last_xid(), None);
        // A new block replaces the xid.
        open_stream(&mut d, 7);
        assert_eq!(d.stream_xid(), Some(7));
    }

    #[test]
    fn trailing_bytes_are_an_error_for_every_kind() {
        let mut all: Vec<(u32, bool, Bytes)> = Vec::new();
        for (b, _) in plain_samples() {
            all.push((1, false, b));
        }
        for (b, _) in streamed_samples(3) {
            all.push((2, true, b));
        }
        for (v, streamed, b) in all {
            let mut extended = BytesMut::from(&b[..]);
            extended.put_u8(0);
            let mut d = Decoder::new(v);
            if streamed {
                open_stream(&mut d, 3);
            }
            assert_eq!(
                d.decode(extended.freeze()),
                Err(DecodeError::Trailing {
                    tag: char::from(b[0]),
                    left: 1
                })
            );
        }
    }

    #[test]
    fn every_strict_prefix_is_an_error() {
        for v in 1..=4 {
            for streamed in [false, true] {
                let samples = if streamed && v >= 2 {
                    streamed_samples(3)
                } else {
                    plain_samples()
                };
                for (full, expected) in samples {
                    for n in 0..full.len() {
                        let mut d = Decoder::new(v);
                        if streamed {
                            open_stream(&mut d, 3);
                        }
                        let r = d.decode(full.slice(..n));
                        assert!(
                            r.is_err(),
                            "proto {v}, {} prefix {n}/{}: {r:?}",
                            expected.kind(),
                            full.len()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_tags_and_kinds_are_errors_not_panics() {
        assert!(matches!(
            decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownMessage { tag: b'Z', .. })
        ));
        assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
        assert!(matches!(
            decode(W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').bytes()),
            Err(DecodeError::UnknownTupleKind {
                kind: b'x',
                column: 0
            })
        ));
    }

    #[test]
    fn tuple_markers_are_checked() {
        assert_eq!(
            decode(W::tag(b'I').u32(1).u8(b'K').i16(0).bytes()),
            Err(DecodeError::UnexpectedTupleMarker(b'K'))
        );
        assert!(matches!(
            decode(W::tag(b'U').u32(1).u8(b'X').i16(0).bytes()),
            Err(DecodeError::BadTupleMarker {
                tag: 'U',
                got: b'X',
                ..
            })
        ));
        // Old tuple followed by something other than 'N'.
        assert!(matches!(
            decode(W::tag(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0).bytes()),
            Err(DecodeError::BadTupleMarker {
                tag: 'U',
                expected: "'N'",
                got: b'K'
            })
        ));
        assert!(matches!(
            decode(W::tag(b'D').u32(1).u8(b'N').i16(0).bytes()),
            Err(DecodeError::BadTupleMarker {
                tag: 'D',
                got: b'N',
                ..
            })
        ));
    }

    #[test]
    fn negative_and_forged_lengths_are_rejected() {
        assert!(matches!(
            decode(W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-5).bytes()),
            Err(DecodeError::NegativeLength { .. })
        ));
        assert!(matches!(
            decode(W::tag(b'I').u32(1).u8(b'N').i16(-1).bytes()),
            Err(DecodeError::NegativeLength { .. })
        ));
        assert!(matches!(
            decode(W::tag(b'T').i32(-1).u8(0).bytes()),
            Err(DecodeError::NegativeLength { .. })
        ));
        assert!(matches!(
            decode(W::tag(b'M').u8(1).u64(0).str("p").i32(-1).bytes()),
            Err(DecodeError::NegativeLength { .. })
        ));
        // Huge counts with no data behind them fail without a huge allocation.
        assert!(matches!(
            decode(W::tag(b'T').i32(i32::MAX).u8(0).u32(1).bytes()),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(W::tag(b'M').u8(1).u64(0).str("p").i32(i32::MAX).bytes()),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn strings_must_be_terminated_utf8() {
        assert_eq!(
            decode(W::tag(b'O').u64(1).raw(b"abc").bytes()),
            Err(DecodeError::UnterminatedString {
                what: "Origin name"
            })
        );
        assert_eq!(
            decode(W::tag(b'O').u64(1).raw(&[0xc3, 0x28, 0]).bytes()),
            Err(DecodeError::InvalidUtf8 {
                what: "Origin name"
            })
        );
    }

    #[test]
    fn truncate_and_message_flags() {
        let Ok(LogicalMessage::Truncate(t)) = decode(W::tag(b'T').i32(0).u8(2).bytes()) else {
            panic!()
        };
        assert!(!t.cascade() && t.restart_identity() && t.relation_oids.is_empty());
        let Ok(LogicalMessage::Message(m)) =
            decode(W::tag(b'M').u8(0).u64(0).str("").i32(0).bytes())
        else {
            panic!()
        };
        assert!(!m.transactional() && m.content.is_empty() && m.prefix.is_empty());
    }

    #[test]
    fn text_values_share_the_input_buffer() {
        let buf = W::tag(b'I').u32(1).u8(b'N').tuple().bytes();
        let Ok(LogicalMessage::Insert(i)) = decode(buf.clone()) else {
            panic!()
        };
        let TupleValue::Text(v) = &i.tuple[0] else {
            panic!()
        };
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        assert!(range.contains(&(v.as_ptr() as usize)));
    }
}
