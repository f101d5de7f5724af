mod props;
mod samples;

use super::*;
use bytes::{BufMut, BytesMut};
use samples::*;

use crate::lsn::Lsn;

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
    let Ok(LogicalMessage::Message(m)) = decode(W::tag(b'M').u8(0).u64(0).str("").i32(0).bytes())
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
