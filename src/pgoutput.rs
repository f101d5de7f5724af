//! Decoder for the `pgoutput` logical replication message format.
//!
//! Pure and I/O-free: it turns the payload of one XLogData message into a typed
//! value. Everything here comes from the network, so nothing may panic: every
//! read is bounds-checked and malformed input becomes a [`DecodeError`].
//!
//! Text column values are returned as [`Bytes`] slices of the input buffer, so a
//! payload travels from the socket to the producer without being copied.
//!
//! Protocol version 1 without streaming is decoded in full for the messages the
//! relay acts on (Begin, Commit, Relation, Insert). The other message kinds are
//! recognised and reported as [`LogicalMessage::Other`], so that a publication
//! which also publishes updates, deletes or truncates is not mistaken for a
//! corrupt stream.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch.
pub type PgTimestamp = i64;

/// Seconds between the Unix epoch and the Postgres epoch.
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Relation(Relation),
    Insert(Insert),
    /// A message kind the relay does not act on, identified by its tag.
    Other(OtherKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherKind {
    Origin,
    Type,
    Update,
    Delete,
    Truncate,
    Message,
    StreamStart,
    StreamStop,
    StreamCommit,
    StreamAbort,
    BeginPrepare,
    Prepare,
    CommitPrepared,
    RollbackPrepared,
    StreamPrepare,
}

impl OtherKind {
    fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            b'O' => Self::Origin,
            b'Y' => Self::Type,
            b'U' => Self::Update,
            b'D' => Self::Delete,
            b'T' => Self::Truncate,
            b'M' => Self::Message,
            b'S' => Self::StreamStart,
            b'E' => Self::StreamStop,
            b'c' => Self::StreamCommit,
            b'A' => Self::StreamAbort,
            b'b' => Self::BeginPrepare,
            b'P' => Self::Prepare,
            b'K' => Self::CommitPrepared,
            b'r' => Self::RollbackPrepared,
            b'p' => Self::StreamPrepare,
            _ => return None,
        })
    }
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_oid: u32,
    pub tuple: Vec<TupleValue>,
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
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("{what} has no NUL terminator")]
    UnterminatedString { what: &'static str },
    #[error("{left} unexpected bytes after a complete {tag:?} message")]
    Trailing { tag: char, left: usize },
    #[error("negative {what}: {value}")]
    NegativeLength { what: &'static str, value: i64 },
}

/// Decodes the payload of one XLogData message.
pub fn decode(mut buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    if !buf.has_remaining() {
        return Err(DecodeError::Empty);
    }
    let tag = buf.get_u8();
    let msg = decode_body(tag, &mut buf)?;
    // Bytes left over mean the message is not the shape we think it is (a
    // protocol version mismatch, say): refuse rather than guess.
    if !matches!(msg, LogicalMessage::Other(_)) && buf.has_remaining() {
        return Err(DecodeError::Trailing {
            tag: char::from(tag),
            left: buf.remaining(),
        });
    }
    Ok(msg)
}

fn decode_body(tag: u8, r: &mut Bytes) -> Result<LogicalMessage, DecodeError> {
    match tag {
        b'B' => Ok(LogicalMessage::Begin(Begin {
            final_lsn: Lsn(read_u64(r, "Begin final LSN")?),
            commit_time: read_i64(r, "Begin commit timestamp")?,
            xid: read_u32(r, "Begin xid")?,
        })),
        b'C' => Ok(LogicalMessage::Commit(Commit {
            flags: read_u8(r, "Commit flags")?,
            commit_lsn: Lsn(read_u64(r, "Commit LSN")?),
            end_lsn: Lsn(read_u64(r, "Commit end LSN")?),
            commit_time: read_i64(r, "Commit timestamp")?,
        })),
        b'R' => decode_relation(r).map(LogicalMessage::Relation),
        b'I' => {
            let relation_oid = read_u32(r, "Insert relation OID")?;
            let marker = read_u8(r, "Insert tuple marker")?;
            if marker != b'N' {
                return Err(DecodeError::UnexpectedTupleMarker(marker));
            }
            let tuple = decode_tuple(r)?;
            Ok(LogicalMessage::Insert(Insert {
                relation_oid,
                tuple,
            }))
        }
        other => match OtherKind::from_tag(other) {
            Some(kind) => Ok(LogicalMessage::Other(kind)),
            None => Err(DecodeError::UnknownMessage {
                tag: other,
                printable: char::from(other),
            }),
        },
    }
}

fn decode_relation(r: &mut Bytes) -> Result<Relation, DecodeError> {
    let oid = read_u32(r, "Relation OID")?;
    let namespace = read_cstr(r, "Relation namespace")?;
    let name = read_cstr(r, "Relation name")?;
    let replica_identity = read_u8(r, "Relation replica identity")?;
    let ncols = read_i16(r, "Relation column count")?;
    let ncols = usize::try_from(ncols).map_err(|_| DecodeError::NegativeLength {
        what: "Relation column count",
        value: i64::from(ncols),
    })?;
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

fn decode_tuple(r: &mut Bytes) -> Result<Vec<TupleValue>, DecodeError> {
    let ncols = read_i16(r, "tuple column count")?;
    let ncols = usize::try_from(ncols).map_err(|_| DecodeError::NegativeLength {
        what: "tuple column count",
        value: i64::from(ncols),
    })?;
    let mut values = Vec::with_capacity(ncols.min(r.remaining()));
    for column in 0..ncols {
        let kind = read_u8(r, "tuple data kind")?;
        values.push(match kind {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(read_len_prefixed(r)?),
            b'b' => TupleValue::Binary(read_len_prefixed(r)?),
            kind => return Err(DecodeError::UnknownTupleKind { kind, column }),
        });
    }
    Ok(values)
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

fn read_i64(r: &mut Bytes, what: &'static str) -> Result<i64, DecodeError> {
    need(r, 8, what)?;
    Ok(r.get_i64())
}

fn read_len_prefixed(r: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = read_i32(r, "column value length")?;
    let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength {
        what: "column value length",
        value: i64::from(len),
    })?;
    need(r, len, "column value")?;
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

    fn insert_bytes() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_i16(3);
        b.put_u8(b't');
        b.put_i32(2);
        b.put_slice(b"42");
        b.put_u8(b'n');
        b.put_u8(b'u');
        b.freeze()
    }

    #[test]
    fn decodes_a_synthetic_insert() {
        let msg = decode(insert_bytes()).unwrap();
        assert_eq!(
            msg,
            LogicalMessage::Insert(Insert {
                relation_oid: 16384,
                tuple: vec![
                    TupleValue::Text(Bytes::from_static(b"42")),
                    TupleValue::Null,
                    TupleValue::UnchangedToast
                ],
            })
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut b = BytesMut::from(&insert_bytes()[..]);
        b.put_u8(0);
        assert!(matches!(
            decode(b.freeze()),
            Err(DecodeError::Trailing { tag: 'I', left: 1 })
        ));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let full = insert_bytes();
        for n in 0..full.len() {
            assert!(decode(full.slice(..n)).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn unknown_tags_and_kinds_are_errors_not_panics() {
        assert!(matches!(
            decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownMessage { tag: b'Z', .. })
        ));
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b'x');
        assert!(matches!(
            decode(b.freeze()),
            Err(DecodeError::UnknownTupleKind {
                kind: b'x',
                column: 0
            })
        ));
    }

    #[test]
    fn negative_lengths_are_rejected() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(-5);
        assert!(matches!(
            decode(b.freeze()),
            Err(DecodeError::NegativeLength { .. })
        ));
    }

    #[test]
    fn other_kinds_are_recognised() {
        for tag in b"OYUDTMSEcAbPKrp" {
            assert!(matches!(
                decode(Bytes::copy_from_slice(&[*tag, 0, 0])),
                Ok(LogicalMessage::Other(_))
            ));
        }
    }
}
