//! Messages built field by field, and what they decode to: the vectors the
//! decoder's tests share.

use bytes::{BufMut, Bytes, BytesMut};

use super::super::*;
use crate::lsn::Lsn;

/// A builder method for each fixed-width field type, named after it:
/// written big-endian, as pgoutput writes them.
macro_rules! int_fields {
    ($($t:ident),*) => {$(
        pub(super) fn $t(self, v: $t) -> Self {
            self.raw(&v.to_be_bytes())
        }
    )*};
}

/// Builds synthetic messages field by field.
#[derive(Default)]
pub(super) struct W(pub(super) BytesMut);

impl W {
    pub(super) fn tag(t: u8) -> Self {
        let mut w = W::default();
        w.0.put_u8(t);
        w
    }
    int_fields!(u8, i16, u32, i32, u64, i64);
    pub(super) fn str(mut self, s: &str) -> Self {
        self.0.put_slice(s.as_bytes());
        self.0.put_u8(0);
        self
    }
    pub(super) fn raw(mut self, b: &[u8]) -> Self {
        self.0.put_slice(b);
        self
    }
    /// A tuple: one Text "42", one Null, one unchanged TOAST, one Binary.
    pub(super) fn tuple(self) -> Self {
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
    /// The fields Begin Prepare, Prepare, Commit Prepared and Stream Prepare
    /// share (after the flags, which Begin Prepare has not): two LSNs, a
    /// time, the xid and the gid.
    pub(super) fn prepared(self, lsn: u64, end_lsn: u64, time: i64, xid: u32, gid: &str) -> Self {
        self.u64(lsn).u64(end_lsn).i64(time).u32(xid).str(gid)
    }
    pub(super) fn bytes(self) -> Bytes {
        self.0.freeze()
    }
}

pub(super) fn tuple() -> TupleData {
    vec![
        TupleValue::Text(Bytes::from_static(b"42")),
        TupleValue::Null,
        TupleValue::UnchangedToast,
        TupleValue::Binary(Bytes::from_static(&[0xff])),
    ]
}

/// Opens a streamed block in `d` for top-level xid `xid`.
pub(super) fn open_stream(d: &mut Decoder, xid: u32) {
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
pub(super) fn plain_samples() -> Vec<(Bytes, LogicalMessage)> {
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
            W::tag(b'b').prepared(0x60, 0x68, 12, 901, "gid-1").bytes(),
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
                .prepared(0x60, 0x68, 12, 901, "gid-1")
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
                .prepared(0x70, 0x78, 13, 901, "gid-1")
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
                .prepared(0x90, 0x98, 15, 903, "gid-3")
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
pub(super) fn streamed_samples(xid: u32) -> Vec<(Bytes, LogicalMessage)> {
    plain_samples()
        .into_iter()
        .filter(|(b, _)| b"RYIUDTM".contains(&b[0]))
        .map(|(b, mut m)| {
            let mut s = BytesMut::new();
            s.put_u8(b[0]);
            s.put_u32(xid);
            s.put_slice(&b[1..]);
            if let LogicalMessage::Type(Type { xid: x, .. })
            | LogicalMessage::Update(Update { xid: x, .. })
            | LogicalMessage::Delete(Delete { xid: x, .. })
            | LogicalMessage::Truncate(Truncate { xid: x, .. })
            | LogicalMessage::Message(Message { xid: x, .. }) = &mut m
            {
                *x = Some(xid);
            }
            (s.freeze(), m)
        })
        .collect()
}
