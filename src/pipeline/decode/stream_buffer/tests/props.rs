//! `StreamBuffer` against a plain in-memory model under random interleavings
//! of Stream Start / change / Stream Abort (sub and whole) / Stream Commit,
//! with budgets from "spill everything" to "never spill"; and the captured
//! PostgreSQL 17 streaming session replayed through it the way the pipeline
//! is meant to.

use std::collections::HashMap;

use bytes::Bytes;

use super::TempDir;
use crate::lsn::Lsn;
use crate::pipeline::decode::pgoutput::{Decoder, LogicalMessage, TupleValue};
use crate::pipeline::decode::stream_buffer::{replay_decoder, StreamBuffer, StreamBufferError};
use crate::testing::{captured, Rng};

/// The model: per open xid, its surviving changes as (subxid, data).
type Model = HashMap<u32, Vec<(u32, Bytes)>>;

fn run(seed: u64, budget: usize, ops: usize) {
    let dir = TempDir::new(&format!("{seed}-{budget}"));
    let mut rng = Rng::seeded(seed);
    let mut buf = StreamBuffer::new(budget, dir.0.clone());
    let mut model: Model = HashMap::new();
    let mut next_xid = 1000u32;
    let mut counter = 0u64;
    let mut committed = 0;

    for op in 0..ops {
        let open: Vec<u32> = {
            let mut v: Vec<u32> = model.keys().copied().collect();
            v.sort_unstable();
            v
        };
        let pick = |rng: &mut Rng| open[rng.below(open.len() as u64) as usize];
        let ctx = format!("seed {seed} budget {budget} op {op}");
        match rng.below(100) {
            // New transaction (xids of subtransactions: xid+1..=xid+4).
            0..=7 if open.len() < 8 => {
                next_xid += 10;
                buf.start(next_xid, true).unwrap();
                model.insert(next_xid, Vec::new());
            }
            // Next block of an open one.
            8..=11 if !open.is_empty() => buf.start(pick(&mut rng), false).unwrap(),
            // A change; sizes 0..300 bytes, tagged for diagnostics.
            12..=79 if !open.is_empty() => {
                let xid = pick(&mut rng);
                let sub = xid + rng.below(5) as u32;
                counter += 1;
                let mut data = format!("{xid}/{sub}/{counter}/").into_bytes();
                data.resize(data.len().max(rng.below(300) as usize), b'#');
                if rng.below(20) == 0 {
                    data.clear();
                }
                let data = Bytes::from(data);
                buf.push(xid, sub, Lsn(counter), &data).unwrap();
                model.get_mut(&xid).unwrap().push((sub, data));
            }
            // Subtransaction abort (possibly of a subxid with no changes).
            80..=87 if !open.is_empty() => {
                let xid = pick(&mut rng);
                let sub = xid + 1 + rng.below(4) as u32;
                buf.abort(xid, sub).unwrap();
                model.get_mut(&xid).unwrap().retain(|(s, _)| *s != sub);
                // PostgreSQL never reuses the subxid, but if a change came,
                // only those before the abort are dropped.
                if rng.below(2) == 0 {
                    counter += 1;
                    let data = Bytes::from(format!("{xid}/{sub}/{counter}/after-abort"));
                    buf.push(xid, sub, Lsn(counter), &data).unwrap();
                    model.get_mut(&xid).unwrap().push((sub, data));
                }
            }
            // Whole abort.
            88..=90 if !open.is_empty() => {
                let xid = pick(&mut rng);
                buf.abort(xid, xid).unwrap();
                model.remove(&xid);
            }
            // Commit: everything comes back in order.
            91..=97 if !open.is_empty() => {
                let xid = pick(&mut rng);
                let expected = model.remove(&xid).unwrap();
                let replay = buf.commit(xid).unwrap();
                if rng.below(10) == 0 {
                    // Stop half-way: the replay must still clean up.
                    let half = expected.len() / 2;
                    let got: Vec<_> = replay.take(half).map(|c| c.unwrap()).collect();
                    for (g, (s, d)) in got.iter().zip(&expected) {
                        assert_eq!((&g.subxid, &g.data), (s, d), "{ctx}");
                    }
                } else {
                    let got: Vec<(u32, Bytes)> = replay
                        .map(|c| c.map(|c| (c.subxid, c.data)).unwrap())
                        .collect();
                    assert_eq!(got, expected, "{ctx}: transaction {xid}");
                }
                committed += 1;
            }
            // Protocol errors: unknown xids are error values.
            _ => {
                let ghost = 7;
                assert!(matches!(
                    buf.commit(ghost),
                    Err(StreamBufferError::UnknownTransaction { xid: 7 })
                ));
                assert!(buf.abort(ghost, ghost + 1).is_err());
                assert!(buf.push(ghost, ghost, Lsn(0), &[]).is_err());
                assert!(buf.start(ghost, false).is_err());
                if let Some(&xid) = open.first() {
                    assert!(matches!(
                        buf.start(xid, true),
                        Err(StreamBufferError::AlreadyOpen { .. })
                    ));
                }
            }
        }
        assert!(
            buf.memory_bytes() <= budget,
            "{ctx}: {}",
            buf.memory_bytes()
        );
        assert_eq!(buf.open_transactions(), model.len(), "{ctx}");
        let (files, size) = dir.usage();
        assert!(files <= model.len(), "{ctx}: {files} spill files");
        assert_eq!(size, buf.spilled_bytes(), "{ctx}: spilled bytes");
        if buf.spilled_bytes() == 0 {
            let in_model: usize = model.values().flatten().map(|(_, d)| d.len()).sum();
            assert_eq!(buf.memory_bytes(), in_model, "{ctx}");
        }
    }
    assert!(committed > 100, "seed {seed}: only {committed} commits");
    drop(buf);
    assert_eq!(dir.usage(), (0, 0), "seed {seed}: files left after drop");
}

#[test]
fn random_interleavings_match_the_model() {
    for (seed, budget) in [
        (0x9E37_79B9_7F4A_7C15, 0),
        (0xD1B5_4A32_D192_ED03, 1024),
        (0x8CB9_2BA7_2F3D_8DD7, 1024),
        (0x2545_F491_4F6C_DD1D, 8192),
        (0x0123_4567_89AB_CDEF, 1 << 30),
    ] {
        run(seed, budget, 10_000);
    }
}

const FIXTURE: &str = include_str!("../../../../../tests/fixtures/pgoutput_pg17_proto2.txt");

fn text(v: &TupleValue) -> String {
    match v {
        TupleValue::Text(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

/// What the pipeline would publish, in order, handling the captured stream as
/// the module documentation describes: `relation:second column` per insert,
/// `message:prefix` per logical decoding message.
fn publish(budget: usize) -> (Vec<String>, usize) {
    let dir = TempDir::new(&format!("fixture-{budget}"));
    let mut buf = StreamBuffer::new(budget, dir.0.clone());
    let mut decoder = Decoder::new(2);
    let mut relations: HashMap<u32, String> = HashMap::new();
    let mut out = Vec::new();
    let mut max_files = 0;

    // Relation, Insert, Message: what the pipeline acts on.
    fn act(m: LogicalMessage, relations: &mut HashMap<u32, String>, out: &mut Vec<String>) {
        match m {
            LogicalMessage::Relation(r) => {
                relations.insert(r.oid, r.name);
            }
            LogicalMessage::Insert(i) => out.push(format!(
                "{}:{}",
                relations.get(&i.relation_oid).expect("relation sent first"),
                text(&i.tuple[1])
            )),
            LogicalMessage::Message(m) => out.push(format!("message:{}", m.prefix)),
            _ => {}
        }
    }

    for (i, raw) in captured(FIXTURE).into_iter().enumerate() {
        let msg = decoder.decode(raw.clone()).expect("decodes");
        match msg {
            LogicalMessage::StreamStart(s) => buf.start(s.xid, s.first_segment).unwrap(),
            LogicalMessage::StreamStop => {}
            LogicalMessage::StreamAbort(a) => buf.abort(a.xid, a.subxid).unwrap(),
            LogicalMessage::StreamCommit(c) => {
                let mut d = replay_decoder(2, c.xid);
                for change in buf.commit(c.xid).unwrap() {
                    let change = change.unwrap();
                    act(d.decode(change.data).unwrap(), &mut relations, &mut out);
                }
            }
            m @ (LogicalMessage::Relation(_)
            | LogicalMessage::Insert(_)
            | LogicalMessage::Message(_))
                if decoder.in_stream() =>
            {
                let top = decoder.stream_xid().unwrap();
                let sub = decoder.last_xid().unwrap_or(top);
                let _ = m;
                buf.push(top, sub, Lsn(i as u64), &raw).unwrap();
            }
            m => act(m, &mut relations, &mut out),
        }
        max_files = max_files.max(dir.usage().0);
        assert!(buf.memory_bytes() <= budget);
    }
    assert_eq!(buf.open_transactions(), 0);
    assert_eq!(dir.usage(), (0, 0));
    (out, max_files)
}

#[test]
fn captured_streaming_session_publishes_only_committed_changes() {
    let expected = [
        "outbox:Small",
        "outbox:Big",
        "typed:ok",
        "message:p",
        "outbox:Kept",
        "outbox:AfterSavepoint",
        "message:nt",
        "outbox:FromOrigin",
    ];
    for budget in [0, 200, 1 << 20] {
        let (out, max_files) = publish(budget);
        assert_eq!(out, expected, "budget {budget}");
        assert_eq!(max_files > 0, budget < 1 << 20, "budget {budget}: spilled?");
    }
}
