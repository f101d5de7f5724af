mod props;

use std::fs::OpenOptions;

use super::*;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::pipeline::decode::pgoutput::LogicalMessage;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "outbox-relay-sb-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }

    fn files(&self) -> usize {
        std::fs::read_dir(&self.0).map_or(0, |d| d.count())
    }

    /// (file count, total size).
    fn usage(&self) -> (usize, u64) {
        let Ok(rd) = std::fs::read_dir(&self.0) else {
            return (0, 0);
        };
        rd.map(|e| e.unwrap().metadata().unwrap().len())
            .fold((0, 0), |(n, s), len| (n + 1, s + len))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A buffer holding `memory` bytes in memory, spilling into a fresh
/// directory (removed when the `TempDir` is dropped).
fn buffer(tag: &str, memory: usize) -> (TempDir, StreamBuffer) {
    let dir = TempDir::new(tag);
    let b = StreamBuffer::new(memory, dir.0.clone());
    (dir, b)
}

fn msg(tag: &str, size: usize) -> Bytes {
    let mut v = tag.as_bytes().to_vec();
    v.resize(size.max(v.len()), b'.');
    Bytes::from(v)
}

fn drain(r: Replay) -> Vec<Bytes> {
    r.map(|c| c.expect("replay").data).collect()
}

fn tags(v: &[Bytes]) -> Vec<String> {
    v.iter()
        .map(|b| String::from_utf8_lossy(b).trim_end_matches('.').to_string())
        .collect()
}

#[test]
fn interleaved_transactions_stay_apart_and_in_order() {
    let (dir, mut b) = buffer("interleave", 1 << 20);
    b.start(10, true).unwrap();
    b.push(10, 10, Lsn(1), &msg("a1", 4)).unwrap();
    b.start(20, true).unwrap();
    b.push(20, 20, Lsn(2), &msg("b1", 4)).unwrap();
    b.start(10, false).unwrap();
    b.push(10, 11, Lsn(3), &msg("a2", 4)).unwrap();
    b.push(10, 10, Lsn(4), &msg("a3", 4)).unwrap();
    b.start(20, false).unwrap();
    b.push(20, 20, Lsn(5), &msg("b2", 4)).unwrap();
    assert_eq!(b.open_transactions(), 2);
    assert_eq!(b.memory_bytes(), 20);

    let r = b.commit(20).unwrap();
    assert_eq!(r.xid(), 20);
    let changes: Vec<_> = r.map(Result::unwrap).collect();
    assert_eq!(
        tags(&changes.iter().map(|c| c.data.clone()).collect::<Vec<_>>()),
        ["b1", "b2"]
    );
    assert_eq!(changes[1].lsn, Lsn(5));
    assert_eq!(b.memory_bytes(), 12);
    assert_eq!(tags(&drain(b.commit(10).unwrap())), ["a1", "a2", "a3"]);
    assert_eq!((b.open_transactions(), b.memory_bytes()), (0, 0));
    assert_eq!(dir.files(), 0, "nothing spilled");
}

#[test]
fn subtransaction_abort_drops_only_its_changes() {
    let (_dir, mut b) = buffer("subabort", 1 << 20);
    b.start(100, true).unwrap();
    b.push(100, 100, Lsn(1), &msg("kept", 4)).unwrap();
    b.push(100, 101, Lsn(2), &msg("sub1", 4)).unwrap();
    b.push(100, 102, Lsn(3), &msg("sub2", 4)).unwrap();
    b.push(100, 101, Lsn(4), &msg("sub1b", 5)).unwrap();
    b.abort(100, 101).unwrap();
    assert_eq!(b.memory_bytes(), 8);
    // A subxid that never made a change: nothing to do.
    b.abort(100, 999).unwrap();
    b.push(100, 100, Lsn(5), &msg("after", 5)).unwrap();
    assert_eq!(
        tags(&drain(b.commit(100).unwrap())),
        ["kept", "sub2", "after"]
    );
}

#[test]
fn whole_abort_drops_the_transaction_and_its_file() {
    let (dir, mut b) = buffer("abort", 10);
    b.start(7, true).unwrap();
    b.start(8, true).unwrap();
    for i in 0..5 {
        b.push(7, 7, Lsn(i), &msg("x", 8)).unwrap();
    }
    b.push(8, 8, Lsn(9), &msg("y", 3)).unwrap();
    assert!(b.spilled_bytes() > 0);
    assert_eq!(dir.files(), 1);
    b.abort(7, 7).unwrap();
    assert_eq!(dir.files(), 0);
    assert_eq!(b.spilled_bytes(), 0);
    assert!(!b.is_open(7));
    assert!(matches!(
        b.commit(7),
        Err(StreamBufferError::UnknownTransaction { xid: 7 })
    ));
    assert_eq!(tags(&drain(b.commit(8).unwrap())), ["y"]);
    assert_eq!(b.memory_bytes(), 0);
}

#[test]
fn spill_and_read_back_in_order_within_a_tiny_budget() {
    spill_round_trip("spill");
}

/// The relay's runtime: the spill and replay I/O leave the task's worker
/// (block_in_place), which must also work with one worker only.
#[test]
fn spill_and_read_back_on_a_multi_thread_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(async { tokio::spawn(async { spill_round_trip("spill-mt") }).await })
        .unwrap();
}

/// A current-thread runtime has no worker to hand to: the I/O runs in
/// place instead of panicking in block_in_place.
#[test]
fn spill_and_read_back_on_a_current_thread_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async { spill_round_trip("spill-ct") });
}

/// L8 of the December 2026 review: while the pipeline's task waits on
/// spill I/O, a task queued behind it on the same (only) worker runs.
/// Without the hand-off the worker is blocked and the flag never set.
#[test]
fn file_io_lets_a_task_queued_on_the_same_worker_run() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let ran = rt
        .block_on(async {
            tokio::spawn(async {
                let flag = Arc::new(AtomicBool::new(false));
                let set = flag.clone();
                tokio::spawn(async move { set.store(true, Ordering::SeqCst) });
                blocking_io(|| {
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                    while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    flag.load(Ordering::SeqCst)
                })
            })
            .await
        })
        .unwrap();
    assert!(ran, "the queued task did not run during the file I/O");
}

/// A record larger than the replay's read chunk is read straight from
/// the file.
#[test]
fn a_record_larger_than_the_read_chunk_reads_back_whole() {
    let (_dir, mut b) = buffer("bigrec", 1024);
    b.start(1, true).unwrap();
    let big = msg("big", REPLAY_READ_CHUNK * 2 + 7);
    b.push(1, 1, Lsn(1), &msg("small", 10)).unwrap();
    b.push(1, 1, Lsn(2), &big).unwrap();
    b.push(1, 1, Lsn(3), &msg("after", 10)).unwrap();
    assert!(b.spilled_bytes() > 0);
    let got = drain(b.commit(1).unwrap());
    assert_eq!(tags(&got), ["small", "big", "after"]);
    assert_eq!(got[1], big);
}

fn spill_round_trip(tag: &str) {
    let (dir, mut b) = buffer(tag, 1024);
    b.start(1, true).unwrap();
    b.start(2, true).unwrap();
    for i in 0..100u64 {
        let xid = if i % 3 == 0 { 2 } else { 1 };
        // Subtransaction 5 of xid 1 makes every tenth change.
        let sub = if xid == 1 && i % 10 == 1 { 5 } else { xid };
        b.push(xid, sub, Lsn(i), &msg(&format!("{xid}-{i}"), 100))
            .unwrap();
        assert!(
            b.memory_bytes() <= 1024,
            "after push {i}: {}",
            b.memory_bytes()
        );
    }
    assert!(b.spilled_bytes() > 0);
    assert_eq!(b.spilled_bytes_total(), b.spilled_bytes());
    assert_eq!(dir.files(), 2);
    // Abort the subtransaction: some of its changes are on disk, some may
    // be in memory.
    b.abort(1, 5).unwrap();
    let expect = |xid: u32| -> Vec<String> {
        (0..100u64)
            .filter(|i| (if i % 3 == 0 { 2 } else { 1 }) == xid)
            .filter(|i| !(xid == 1 && i % 10 == 1))
            .map(|i| format!("{xid}-{i}"))
            .collect()
    };
    let r1 = b.commit(1).unwrap();
    assert_eq!(dir.files(), 2, "the replay owns the file until done");
    let got: Vec<_> = r1.map(Result::unwrap).collect();
    let lsns: Vec<u64> = got.iter().map(|c| c.lsn.0).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        tags(&got.into_iter().map(|c| c.data).collect::<Vec<_>>()),
        expect(1)
    );
    assert_eq!(dir.files(), 1);
    assert_eq!(tags(&drain(b.commit(2).unwrap())), expect(2));
    assert_eq!(dir.files(), 0);
    assert_eq!((b.memory_bytes(), b.spilled_bytes()), (0, 0));
}

/// M6 of the December 2026 review: spilled payloads are private.
#[test]
fn spill_files_are_private_and_a_foreign_directory_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("modes");
    let spill = dir.0.join("slot");
    let mut b = StreamBuffer::new(10, spill.clone());
    b.start(1, true).unwrap();
    b.push(1, 1, Lsn(1), &msg("spilled", 20)).unwrap();
    assert!(b.spilled_bytes() > 0);
    for d in [&dir.0, &spill] {
        let mode = std::fs::metadata(d).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
    }
    let file = std::fs::read_dir(&spill)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mode = std::fs::metadata(&file).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    drop(b);

    // A directory of ours left open to others is narrowed.
    std::fs::set_permissions(&spill, std::fs::Permissions::from_mode(0o755)).unwrap();
    prepare_spill_dir(&spill).unwrap();
    assert_eq!(std::fs::metadata(&spill).unwrap().mode() & 0o777, 0o700);
    // A symbolic link is refused.
    let link = dir.0.join("link");
    std::os::unix::fs::symlink(&spill, &link).unwrap();
    let err = prepare_spill_dir(&link).unwrap_err().to_string();
    assert!(err.contains("is not a directory"), "{err}");
    // Another user's directory (only root can make one here).
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = dir.0.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = prepare_spill_dir(&theirs).unwrap_err().to_string();
        assert!(err.contains("belongs to user id 65534"), "{err}");
        let inside = theirs.join("slot");
        std::fs::create_dir(&inside).unwrap();
        let err = prepare_spill_dir(&inside).unwrap_err().to_string();
        assert!(err.contains("which belongs to user id 65534"), "{err}");
    }
}

#[test]
fn budget_is_respected_and_the_largest_spills_first() {
    let (dir, mut b) = buffer("budget", 300);
    b.start(1, true).unwrap();
    b.start(2, true).unwrap();
    b.push(1, 1, Lsn(1), &msg("big", 200)).unwrap();
    b.push(2, 2, Lsn(2), &msg("small", 50)).unwrap();
    assert_eq!(b.spilled_bytes(), 0);
    b.push(2, 2, Lsn(3), &msg("small2", 60)).unwrap();
    // 310 > 300: xid 1 (200 bytes) is the largest and goes to disk.
    assert_eq!(b.memory_bytes(), 110);
    assert_eq!(b.spilled_bytes(), (RECORD_HEADER + 200) as u64);
    // A change bigger than the whole budget goes straight to disk.
    b.push(2, 2, Lsn(4), &msg("huge", 1000)).unwrap();
    assert_eq!(b.memory_bytes(), 0);
    assert_eq!(dir.files(), 2);
    // Zero budget: everything spills, order still holds.
    let mut z = StreamBuffer::new(0, dir.0.clone());
    z.start(3, true).unwrap();
    for i in 0..5 {
        z.push(3, 3, Lsn(i), &msg(&format!("z{i}"), 2)).unwrap();
        assert_eq!(z.memory_bytes(), 0);
    }
    assert_eq!(
        tags(&drain(z.commit(3).unwrap())),
        ["z0", "z1", "z2", "z3", "z4"]
    );
    drop(b);
    assert_eq!(dir.files(), 0, "drop removes the spill files");
}

#[test]
fn a_dropped_replay_removes_its_file() {
    let (dir, mut b) = buffer("dropreplay", 0);
    b.start(1, true).unwrap();
    b.push(1, 1, Lsn(1), &msg("a", 10)).unwrap();
    b.push(1, 1, Lsn(2), &msg("b", 10)).unwrap();
    let mut r = b.commit(1).unwrap();
    assert_eq!(tags(&[r.next().unwrap().unwrap().data]), ["a"]);
    assert_eq!(dir.files(), 1);
    drop(r);
    assert_eq!(dir.files(), 0);
}

#[test]
fn odd_sequences_are_errors_not_panics() {
    let (_dir, mut b) = buffer("odd", 100);
    assert!(matches!(
        b.push(1, 1, Lsn(0), &msg("x", 1)),
        Err(StreamBufferError::UnknownTransaction { xid: 1 })
    ));
    assert!(matches!(
        b.abort(1, 1),
        Err(StreamBufferError::UnknownTransaction { .. })
    ));
    assert!(matches!(
        b.abort(1, 2),
        Err(StreamBufferError::UnknownTransaction { .. })
    ));
    assert!(matches!(
        b.commit(1),
        Err(StreamBufferError::UnknownTransaction { .. })
    ));
    assert!(matches!(
        b.start(1, false),
        Err(StreamBufferError::MissedFirstSegment { xid: 1 })
    ));
    b.start(1, true).unwrap();
    assert!(matches!(
        b.start(1, true),
        Err(StreamBufferError::AlreadyOpen { xid: 1 })
    ));
    b.start(1, false).unwrap();
    // An empty transaction commits to nothing.
    assert_eq!(b.commit(1).unwrap().count(), 0);
    assert!(matches!(
        b.commit(1),
        Err(StreamBufferError::UnknownTransaction { .. })
    ));
    assert_eq!(b.open_transactions(), 0);
}

#[test]
fn an_unusable_spill_dir_poisons_the_transaction_only() {
    let dir = TempDir::new("baddir");
    std::fs::create_dir_all(&dir.0).unwrap();
    // A file where the directory should be.
    let not_a_dir = dir.0.join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let mut b = StreamBuffer::new(10, not_a_dir.join("spill"));
    b.start(1, true).unwrap();
    b.start(2, true).unwrap();
    b.push(2, 2, Lsn(0), &msg("ok", 2)).unwrap();
    assert!(matches!(
        b.push(1, 1, Lsn(1), &msg("too big", 20)),
        Err(StreamBufferError::Io { xid: 1, .. })
    ));
    assert_eq!(b.memory_bytes(), 2);
    assert!(matches!(
        b.push(1, 1, Lsn(2), &msg("x", 1)),
        Err(StreamBufferError::Poisoned { xid: 1 })
    ));
    assert!(matches!(
        b.commit(1),
        Err(StreamBufferError::Poisoned { xid: 1 })
    ));
    assert_eq!(tags(&drain(b.commit(2).unwrap())), ["ok"]);
}

#[test]
fn a_corrupt_spill_file_is_an_error() {
    let dir = TempDir::new("corrupt");
    // Cut 0: a forged length instead; 3 and 26: the second record is cut;
    // 40: the first one is.
    for cut in [0u64, 3, RECORD_HEADER as u64 + 2, 40] {
        let mut b = StreamBuffer::new(0, dir.0.clone());
        b.start(1, true).unwrap();
        b.push(1, 1, Lsn(1), &msg("a", 10)).unwrap();
        b.push(1, 1, Lsn(2), &msg("b", 10)).unwrap();
        let path = std::fs::read_dir(&dir.0)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let full = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(full - cut)
            .unwrap();
        if cut == 0 {
            // Intact: a forged length in the second header instead.
            let mut bytes = std::fs::read(&path).unwrap();
            let at = RECORD_HEADER + 10 + 20;
            bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
            std::fs::write(&path, bytes).unwrap();
        }
        let mut r = b.commit(1).unwrap();
        let first = r.next().unwrap();
        if cut < RECORD_HEADER as u64 + 10 {
            assert!(first.is_ok(), "cut {cut}");
            assert!(matches!(
                r.next(),
                Some(Err(StreamBufferError::Corrupt { .. }))
            ));
        } else {
            assert!(matches!(first, Err(StreamBufferError::Corrupt { .. })));
        }
        assert!(r.next().is_none(), "ends after an error");
        assert_eq!(dir.files(), 0);
    }
}

#[test]
fn replay_decoder_is_in_stream_state() {
    for v in 2..=4 {
        let mut d = replay_decoder(v, 0x2e8);
        assert!(d.in_stream());
        assert_eq!(d.stream_xid(), Some(0x2e8));
        // A streamed Insert: 'I', xid, relation oid, 'N', zero columns.
        let mut raw = vec![b'I'];
        raw.extend_from_slice(&0x2e9u32.to_be_bytes());
        raw.extend_from_slice(&16390u32.to_be_bytes());
        raw.extend_from_slice(&[b'N', 0, 0]);
        assert!(matches!(
            d.decode(Bytes::from(raw)),
            Ok(LogicalMessage::Insert(_))
        ));
        assert_eq!(d.last_xid(), Some(0x2e9));
    }
}
