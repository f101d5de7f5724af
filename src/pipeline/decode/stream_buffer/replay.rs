//! A committed streamed transaction handed back in arrival order: spilled
//! changes read from their file, then those still in memory.

use std::collections::{HashMap, VecDeque};
use std::io::{self};

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::pipeline::decode::pgoutput::Decoder;

use super::*;

/// The changes of a committed streamed transaction, in arrival order: first
/// those read back from its spill file, then those that were in memory.
/// Yields an error at most once, then ends. Deletes the spill file when the
/// file is exhausted or the replay dropped.
#[derive(Debug)]
pub struct Replay {
    pub(super) xid: u32,
    pub(super) spill: Option<SpillReader>,
    pub(super) aborted: HashMap<u32, u64>,
    pub(super) memory: VecDeque<(u64, BufferedChange)>,
    pub(super) failed: bool,
}

impl Replay {
    /// The top-level xid of the transaction.
    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// Reads the next kept record of the spill file, if any is left.
    fn next_spilled(&mut self) -> Option<Result<BufferedChange, StreamBufferError>> {
        let xid = self.xid;
        loop {
            let sp = self.spill.as_mut()?;
            if sp.records_left == 0 {
                let left = sp.bytes_left;
                let path = sp.path.0.clone();
                self.spill = None; // deletes the file
                if left != 0 {
                    return Some(Err(StreamBufferError::Corrupt {
                        xid,
                        path,
                        reason: format!("{left} bytes left after the last record"),
                    }));
                }
                return None;
            }
            let corrupt = |sp: &SpillReader, reason: String| StreamBufferError::Corrupt {
                xid,
                path: sp.path.0.clone(),
                reason,
            };
            let read_err = |sp: &SpillReader, e: io::Error| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt(
                        sp,
                        format!("truncated, {} records missing", sp.records_left),
                    )
                } else {
                    StreamBufferError::Io {
                        xid,
                        path: sp.path.0.clone(),
                        source: e,
                    }
                }
            };
            let mut header = [0u8; RECORD_HEADER];
            if let Err(e) = read_exact_off_task(&mut sp.reader, &mut header) {
                return Some(Err(read_err(sp, e)));
            }
            let word = |r: std::ops::Range<usize>| {
                header[r]
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
            };
            let subxid = word(0..4) as u32;
            let seq = word(4..12);
            let lsn = Lsn(word(12..20));
            let len = word(20..24);
            let need = RECORD_HEADER as u64 + len;
            if need > sp.bytes_left {
                let reason = format!(
                    "a record of {need} bytes with only {} bytes left",
                    sp.bytes_left
                );
                return Some(Err(corrupt(sp, reason)));
            }
            let mut data = vec![0u8; len as usize];
            if let Err(e) = read_exact_off_task(&mut sp.reader, &mut data) {
                return Some(Err(read_err(sp, e)));
            }
            sp.records_left -= 1;
            sp.bytes_left -= need;
            if self.aborted.get(&subxid).is_some_and(|&until| seq < until) {
                continue;
            }
            return Some(Ok(BufferedChange {
                subxid,
                lsn,
                data: Bytes::from(data),
            }));
        }
    }
}

impl Iterator for Replay {
    type Item = Result<BufferedChange, StreamBufferError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Some(r) = self.next_spilled() {
            if r.is_err() {
                self.failed = true;
                self.spill = None;
                self.memory.clear();
            }
            return Some(r);
        }
        self.memory.pop_front().map(|(_, c)| Ok(c))
    }
}

/// A decoder for re-decoding the buffered changes of streamed transaction
/// `xid`: in stream state, as when the changes arrived (so the xid prefix of
/// streamed Relation, Insert, … messages is expected). Use a fresh one per
/// replay, never the session's decoder.
pub fn replay_decoder(protocol_version: u32, xid: u32) -> Decoder {
    let mut d = Decoder::new(protocol_version);
    let mut start = Vec::with_capacity(6);
    start.push(b'S');
    start.extend_from_slice(&xid.to_be_bytes());
    start.push(1);
    // A well-formed Stream Start always decodes (tested below).
    let _ = d.decode(Bytes::from(start));
    d
}
