//! Property test for the pgoutput decoder, deterministic and dependency-free
//! (the coverage-guided fuzz target lives in `fuzz/`, which needs nightly):
//! 200,000 inputs, half random bytes, half mutations of the captured messages
//! in `tests/fixtures/pgoutput_*.txt`, each decoded with protocol versions 1 to
//! 4, outside and inside a streamed block. Nothing may panic, and the stream
//! state must follow exactly the messages that decoded.

use bytes::Bytes;

use crate::pipeline::decode::pgoutput::{decode, Decoder, LogicalMessage};
use crate::testing::{captured, Rng};

const FIXTURES: [&str; 4] = [
    include_str!("../../../../../tests/fixtures/pgoutput_pg15_proto1.txt"),
    include_str!("../../../../../tests/fixtures/pgoutput_pg17_proto2.txt"),
    include_str!("../../../../../tests/fixtures/pgoutput_pg17_proto3.txt"),
    include_str!("../../../../../tests/fixtures/pgoutput_pg17_proto4.txt"),
];

const INPUTS: usize = 200_000;

fn seeds() -> Vec<Vec<u8>> {
    FIXTURES
        .iter()
        .flat_map(|f| captured(f))
        .map(|m| m.to_vec())
        .collect()
}

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";
const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'N', b'K', b't'];

fn random_input(rng: &mut Rng) -> Vec<u8> {
    let len = rng.index(64);
    let mut v: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
    // Mostly start with a valid tag, or nearly everything is UnknownMessage.
    if !v.is_empty() && rng.index(4) != 0 {
        v[0] = TAGS[rng.index(TAGS.len())];
    }
    v
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.index(4) {
        match rng.index(6) {
            0 if !v.is_empty() => {
                let i = rng.index(v.len());
                v[i] = rng.byte();
            }
            1 if !v.is_empty() => {
                let i = rng.index(v.len());
                v[i] = INTERESTING[rng.index(INTERESTING.len())];
            }
            2 if !v.is_empty() => {
                let n = rng.index(v.len() + 1);
                v.truncate(n);
            }
            3 => {
                let i = rng.index(v.len() + 1);
                v.insert(i, rng.byte());
            }
            4 if v.len() > 1 => {
                let i = rng.index(v.len());
                v.remove(i);
            }
            5 if !v.is_empty() => {
                // Swap the tag: the body of one kind under another's tag.
                v[0] = TAGS[rng.index(TAGS.len())];
            }
            _ => v.push(rng.byte()),
        }
    }
    v
}

const STREAM_START: &[u8] = &[b'S', 0, 0, 0, 7, 1];

#[test]
fn decoder_never_panics_and_tracks_streams() {
    let seeds = seeds();
    assert!(seeds.len() > 100);
    let mut rng = Rng::seeded(0x9E37_79B9_7F4A_7C15);
    let (mut decodes, mut ok) = (0u64, 0u64);
    for n in 0..INPUTS {
        let input = if n % 2 == 0 {
            random_input(&mut rng)
        } else {
            let seed = &seeds[rng.index(seeds.len())];
            mutate(&mut rng, seed)
        };
        let buf = Bytes::from(input);
        for version in 1..=4 {
            for in_stream in [false, true] {
                let mut d = Decoder::new(version);
                if in_stream {
                    d.decode(Bytes::from_static(STREAM_START)).unwrap();
                }
                let before = d.clone();
                let result = d.decode(buf.clone());
                decodes += 1;
                match &result {
                    Ok(LogicalMessage::StreamStart(s)) => {
                        assert_eq!(d.stream_xid(), Some(s.xid))
                    }
                    Ok(LogicalMessage::StreamStop) => assert!(!d.in_stream()),
                    Ok(_) => {
                        assert_eq!(d.stream_xid(), before.stream_xid());
                        assert!(d.last_xid().is_none() || (version >= 2 && in_stream));
                    }
                    Err(_) => {
                        assert_eq!((d.in_stream(), d.last_xid()), (before.in_stream(), None))
                    }
                }
                ok += u64::from(result.is_ok());
            }
        }
        assert_eq!(decode(buf.clone()), Decoder::new(1).decode(buf));
    }
    // The generator must reach the decoders' success paths, not only errors.
    assert!(ok > decodes / 50, "{ok} of {decodes} decodes succeeded");
    eprintln!("{INPUTS} inputs, {decodes} decodes, {ok} succeeded");
}
