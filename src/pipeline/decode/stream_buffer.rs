//! Bounded buffering of streamed, still uncommitted transactions
//! (`streaming 'on'`, pgoutput protocol ≥ 2).
//!
//! With streaming on, the walsender sends a large transaction in chunks
//! *before* it commits: blocks of changes between Stream Start (top-level xid)
//! and Stream Stop, interleaved with other streamed transactions' blocks and
//! with ordinary committed transactions (Begin … Commit). Later a Stream Commit
//! or a Stream Abort settles it. Nothing of a streamed transaction may be
//! published before its Stream Commit, so its changes are kept here until
//! then; aborted transactions and aborted subtransactions are discarded.
//!
//! Memory is bounded by a byte budget over the payloads of every buffered
//! change. Whenever a [`StreamBuffer::push`] takes the total over it, the
//! transaction holding the most bytes in memory (the oldest on a tie) moves all
//! its in-memory changes to the end of its spill file, until the total is back
//! within the budget. A transaction's spill file therefore always holds a
//! *prefix* of its changes and memory the rest, so reading the file and then
//! memory gives arrival order. A spill file is a sequence of records:
//!
//! ```text
//! subxid u32 | seq u64 | lsn u64 | len u32 | len bytes of the raw pgoutput message   (big-endian)
//! ```
//!
//! `seq` numbers the transaction's changes in arrival order. An aborted
//! subtransaction's changes are removed from memory at once; spilled ones stay
//! on disk and are skipped when the file is read back (a change is dropped if
//! its subxid was aborted after the change arrived).
//!
//! Spill files are named `stream-{pid}-{n}-{xid}-{m}.spill` inside the
//! configured directory (created on first use) and are deleted when their
//! transaction aborts, when its [`Replay`] is exhausted or dropped, and when
//! the buffer is dropped. Only a killed process leaves files behind; give each
//! relay its own directory if that matters. I/O happens only when a push
//! spills, and while a [`Replay`] reads a spill file back.
//!
//! # How the pipeline uses it (`pipeline::State::on_xlog`)
//!
//! - **Stream Start** registers the transaction (also one whose blocks carry
//!   nothing for us, so that its Stream Commit is known).
//! - **Inside a block**, Relation, Insert and Message are pushed with the
//!   subtransaction's xid; the rest never makes events and is dropped. Nothing
//!   is routed or counted yet: a streamed Relation may describe a schema the
//!   uncommitted transaction itself changed, while concurrent committed
//!   transactions are still routed with the old plan.
//! - **Stream Abort** drops the (sub)transaction; the server sends a dropped
//!   subtransaction's Relation again before the next change.
//! - **Stream Commit** turns the transaction into a [`Replay`], decoded with
//!   [`replay_decoder`] and applied in slices like an ordinary transaction,
//!   in commit order, under the same backpressure; nothing after it in the
//!   WAL is read until the replay is done.
//!
//! An open streamed transaction has no place in the checkpoint: it commits
//! after the committed transactions around it, so after a restart the server
//! sends it again in full; while one is open the keepalive shortcut is not
//! taken. The buffer lives and dies with its session.
//!
//! Memory: [`StreamBuffer::memory_bytes`] counts message payload bytes only
//! (about 50 bytes of bookkeeping per change come on top). After every
//! successful push it is at most the budget; during one it exceeds it by at
//! most that one message. A committed transaction's remaining in-memory
//! changes move into its [`Replay`] and no longer count.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::lsn::Lsn;

mod replay;
mod spill;

pub use replay::{replay_decoder, Replay};
pub use spill::prepare_spill_dir;
use spill::*;

/// Distinguishes the buffers of one process in spill file names.
static INSTANCE: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum StreamBufferError {
    #[error("streamed transaction {xid} is not open (no Stream Start for it in this session)")]
    UnknownTransaction { xid: u32 },
    #[error(
        "Stream Start for transaction {xid} is marked as its first segment, but it is already open"
    )]
    AlreadyOpen { xid: u32 },
    #[error("Stream Start for transaction {xid} is not its first segment, but no earlier segment was seen: its first changes were missed")]
    MissedFirstSegment { xid: u32 },
    #[error(
        "a change of streamed transaction {xid} is {len} bytes, more than a spill record can hold"
    )]
    TooLarge { xid: u32, len: usize },
    #[error("spill file {} of streamed transaction {xid}: {source}", path.display())]
    Io {
        xid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spill file {} of streamed transaction {xid} is corrupt: {reason}", path.display())]
    Corrupt {
        xid: u32,
        path: PathBuf,
        reason: String,
    },
    #[error("streamed transaction {xid} lost changes when spilling them failed earlier")]
    Poisoned { xid: u32 },
    #[error("spill directory {}: {source}", path.display())]
    SpillDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One buffered change, as pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferedChange {
    /// The (sub)transaction that made the change ([`Decoder::last_xid`]).
    pub subxid: u32,
    /// Position of the change (the XLogData `wal_start`), for diagnostics.
    pub lsn: Lsn,
    /// The raw pgoutput message, streamed layout (with its xid prefix).
    pub data: Bytes,
}

/// Buffers the changes of streamed transactions until Stream Commit or Stream
/// Abort, within a memory budget, spilling to files beyond it.
#[derive(Debug)]
pub struct StreamBuffer {
    budget: usize,
    spill_dir: PathBuf,
    txns: HashMap<u32, Txn>,
    /// Payload bytes in memory, over all open transactions.
    memory: usize,
    /// Bytes in the spill files of open transactions.
    spilled: u64,
    /// Bytes ever written to spill files.
    spilled_total: u64,
    /// Order of Stream Start, for "oldest"; also numbers spill files.
    counter: u64,
    instance: u64,
}

#[derive(Debug)]
struct Txn {
    /// When its first segment arrived (smaller is older).
    order: u64,
    /// Sequence number of the next change.
    next_seq: u64,
    /// The changes after those in the spill file, oldest first.
    memory: VecDeque<(u64, BufferedChange)>,
    mem_bytes: usize,
    spill: Option<Spill>,
    /// Aborted subxid → the `seq` of the next change when it aborted: its
    /// spilled changes numbered below are skipped on read-back.
    aborted: HashMap<u32, u64>,
    /// A spill failed: changes were lost, the transaction cannot commit.
    poisoned: bool,
}

impl StreamBuffer {
    /// A buffer keeping at most `memory_budget` payload bytes in memory and
    /// spilling into `spill_dir` (created when first needed). No I/O here.
    pub fn new(memory_budget: usize, spill_dir: PathBuf) -> Self {
        Self {
            budget: memory_budget,
            spill_dir,
            txns: HashMap::new(),
            memory: 0,
            spilled: 0,
            spilled_total: 0,
            counter: 0,
            instance: INSTANCE.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Stream Start of top-level transaction `xid`. The first segment opens
    /// it; later segments must find it open.
    pub fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), StreamBufferError> {
        match (first_segment, self.txns.contains_key(&xid)) {
            (true, true) => Err(StreamBufferError::AlreadyOpen { xid }),
            (false, false) => Err(StreamBufferError::MissedFirstSegment { xid }),
            (false, true) => Ok(()),
            (true, false) => {
                self.counter += 1;
                self.txns.insert(
                    xid,
                    Txn {
                        order: self.counter,
                        next_seq: 0,
                        memory: VecDeque::new(),
                        mem_bytes: 0,
                        spill: None,
                        aborted: HashMap::new(),
                        poisoned: false,
                    },
                );
                Ok(())
            }
        }
    }

    /// One change of the open streamed transaction `xid` (top-level, from
    /// Stream Start), made by `subxid` (its xid prefix, [`Decoder::last_xid`]).
    /// May spill to stay within the budget.
    ///
    /// The change is copied: a slice of the connection's read buffer would
    /// keep that whole buffer (64 KiB or more) alive for as long as the change
    /// is held, and the budget, which counts the change's own bytes, would no
    /// longer bound resident memory.
    pub fn push(
        &mut self,
        xid: u32,
        subxid: u32,
        lsn: Lsn,
        raw_message: &[u8],
    ) -> Result<(), StreamBufferError> {
        let txn = self
            .txns
            .get_mut(&xid)
            .ok_or(StreamBufferError::UnknownTransaction { xid })?;
        if txn.poisoned {
            return Err(StreamBufferError::Poisoned { xid });
        }
        let len = raw_message.len();
        if u32::try_from(len).is_err() {
            return Err(StreamBufferError::TooLarge { xid, len });
        }
        let seq = txn.next_seq;
        txn.next_seq += 1;
        txn.memory.push_back((
            seq,
            BufferedChange {
                subxid,
                lsn,
                data: Bytes::copy_from_slice(raw_message),
            },
        ));
        txn.mem_bytes += len;
        self.memory += len;
        self.enforce_budget()
    }

    /// Stream Abort: drops `subxid`'s changes so far, or the whole
    /// transaction (and its spill file) when `subxid == xid`. A subxid with no
    /// buffered changes is fine; an unknown `xid` is an error (nothing done).
    pub fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), StreamBufferError> {
        if subxid == xid {
            let txn = self
                .txns
                .remove(&xid)
                .ok_or(StreamBufferError::UnknownTransaction { xid })?;
            self.forget(&txn);
            return Ok(()); // dropping `txn` deletes its file
        }
        let txn = self
            .txns
            .get_mut(&xid)
            .ok_or(StreamBufferError::UnknownTransaction { xid })?;
        let mut freed = 0;
        txn.memory.retain(|(_, c)| {
            let keep = c.subxid != subxid;
            if !keep {
                freed += c.data.len();
            }
            keep
        });
        txn.mem_bytes -= freed;
        self.memory -= freed;
        if txn.spill.is_some() {
            txn.aborted.insert(subxid, txn.next_seq);
        }
        Ok(())
    }

    /// Stream Commit: closes `xid` and hands back its changes in arrival
    /// order, minus those of aborted subtransactions. Spilled changes are read
    /// back lazily by the [`Replay`], which deletes the file when done or
    /// dropped.
    pub fn commit(&mut self, xid: u32) -> Result<Replay, StreamBufferError> {
        let mut txn = self
            .txns
            .remove(&xid)
            .ok_or(StreamBufferError::UnknownTransaction { xid })?;
        self.forget(&txn);
        if txn.poisoned {
            return Err(StreamBufferError::Poisoned { xid });
        }
        let spill = match txn.spill.take() {
            None => None,
            Some(Spill {
                writer,
                path,
                bytes,
                records,
            }) => {
                let io_err = |source: io::Error, path: &SpillPath| StreamBufferError::Io {
                    xid,
                    path: path.0.clone(),
                    source,
                };
                let file = blocking_io(|| {
                    let mut file = writer
                        .into_inner()
                        .map_err(|e| io_err(e.into_error(), &path))?;
                    file.seek(SeekFrom::Start(0))
                        .map_err(|e| io_err(e, &path))?;
                    Ok::<_, StreamBufferError>(file)
                })?;
                Some(SpillReader {
                    reader: BufReader::with_capacity(REPLAY_READ_CHUNK, file),
                    path,
                    records_left: records,
                    bytes_left: bytes,
                })
            }
        };
        Ok(Replay {
            xid,
            spill,
            aborted: std::mem::take(&mut txn.aborted),
            memory: std::mem::take(&mut txn.memory),
            failed: false,
        })
    }

    /// True if `xid` is an open streamed transaction.
    pub fn is_open(&self, xid: u32) -> bool {
        self.txns.contains_key(&xid)
    }

    /// Payload bytes of the changes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    /// Bytes in the spill files of open transactions (including spilled
    /// changes of aborted subtransactions, skipped only on read-back).
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled
    }

    /// Bytes ever written to spill files by this buffer (for a counter metric).
    pub fn spilled_bytes_total(&self) -> u64 {
        self.spilled_total
    }

    /// Streamed transactions started and not yet committed or aborted.
    pub fn open_transactions(&self) -> usize {
        self.txns.len()
    }

    /// The memory budget given to [`StreamBuffer::new`].
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Removes a closed transaction's bytes from the totals.
    fn forget(&mut self, txn: &Txn) {
        self.memory -= txn.mem_bytes;
        if let Some(s) = &txn.spill {
            self.spilled -= s.bytes;
        }
    }

    fn enforce_budget(&mut self) -> Result<(), StreamBufferError> {
        while self.memory > self.budget {
            let victim = self
                .txns
                .iter()
                .filter(|(_, t)| t.mem_bytes > 0)
                .max_by(|(_, a), (_, b)| a.mem_bytes.cmp(&b.mem_bytes).then(b.order.cmp(&a.order)))
                .map(|(xid, _)| *xid);
            let Some(xid) = victim else {
                // Unreachable: memory > 0 means some transaction holds bytes.
                break;
            };
            self.spill(xid)?;
        }
        Ok(())
    }

    /// Appends all in-memory changes of `xid` to its spill file.
    fn spill(&mut self, xid: u32) -> Result<(), StreamBufferError> {
        let Some(txn) = self.txns.get_mut(&xid) else {
            return Ok(());
        };
        if txn.spill.is_none() {
            match create_spill_file(&self.spill_dir, self.instance, xid, &mut self.counter) {
                Ok(s) => txn.spill = Some(s),
                Err((path, source)) => {
                    self.memory -= txn.mem_bytes;
                    poison(txn);
                    return Err(StreamBufferError::Io { xid, path, source });
                }
            }
        }
        let Some(spill) = txn.spill.as_mut() else {
            return Ok(());
        };
        let written: io::Result<u64> = blocking_io(|| {
            let mut n = 0u64;
            for (seq, c) in &txn.memory {
                let mut header = [0u8; RECORD_HEADER];
                header[0..4].copy_from_slice(&c.subxid.to_be_bytes());
                header[4..12].copy_from_slice(&seq.to_be_bytes());
                header[12..20].copy_from_slice(&c.lsn.0.to_be_bytes());
                // push() refused anything longer than u32::MAX.
                header[20..24].copy_from_slice(&(c.data.len() as u32).to_be_bytes());
                spill.writer.write_all(&header)?;
                spill.writer.write_all(&c.data)?;
                n += (RECORD_HEADER + c.data.len()) as u64;
            }
            spill.writer.flush()?;
            Ok(n)
        });
        match written {
            Ok(n) => {
                spill.bytes += n;
                spill.records += txn.memory.len() as u64;
                self.spilled += n;
                self.spilled_total += n;
                self.memory -= txn.mem_bytes;
                txn.mem_bytes = 0;
                txn.memory.clear();
                Ok(())
            }
            Err(source) => {
                let path = spill.path.0.clone();
                self.spilled -= spill.bytes;
                self.memory -= txn.mem_bytes;
                poison(txn);
                Err(StreamBufferError::Io { xid, path, source })
            }
        }
    }
}

/// Frees what a transaction whose spill failed holds; its file goes too.
fn poison(txn: &mut Txn) {
    txn.poisoned = true;
    txn.memory = VecDeque::new();
    txn.mem_bytes = 0;
    txn.spill = None;
    txn.aborted.clear();
}

#[cfg(test)]
mod tests;
