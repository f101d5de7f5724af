//! Arbitrary bytes into `Decoder::decode`, for every protocol version 1..=4,
//! outside and inside a streamed block. The decoder must never panic; on
//! success its stream state must follow the message, on failure it must not
//! change.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use outbox_relay_fuzz::pgoutput::{Decoder, LogicalMessage};

/// Stream Start for top-level xid 7, first segment.
const STREAM_START: &[u8] = &[b'S', 0, 0, 0, 7, 1];

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    for version in 1..=4 {
        for in_stream in [false, true] {
            let mut d = Decoder::new(version);
            if in_stream {
                d.decode(Bytes::from_static(STREAM_START)).expect("Stream Start");
            }
            let before = d.clone();
            match d.decode(buf.clone()) {
                Ok(LogicalMessage::StreamStart(s)) => {
                    assert!(d.in_stream());
                    assert_eq!(d.stream_xid(), Some(s.xid));
                }
                Ok(LogicalMessage::StreamStop) => assert!(!d.in_stream()),
                Ok(_) => {
                    assert_eq!(d.in_stream(), before.in_stream());
                    assert_eq!(d.stream_xid(), before.stream_xid());
                    if d.last_xid().is_some() {
                        assert!(version >= 2 && in_stream);
                    }
                }
                Err(_) => {
                    assert_eq!(d.in_stream(), before.in_stream());
                    assert_eq!(d.last_xid(), None);
                }
            }
        }
    }
    // The free function (protocol 1) agrees with a fresh protocol-1 decoder.
    assert_eq!(
        outbox_relay_fuzz::pgoutput::decode(buf.clone()),
        Decoder::new(1).decode(buf)
    );
});
