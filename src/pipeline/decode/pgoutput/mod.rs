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

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch.
pub type PgTimestamp = i64;

/// Seconds between the Unix epoch and the Postgres epoch.
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// The highest protocol version whose layouts this module knows.
pub const MAX_PROTOCOL_VERSION: u32 = 4;

mod messages;
#[cfg(test)]
mod tests;
mod wire;

pub use messages::*;
use wire::*;

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
