//! Spill files: where a streamed transaction's changes go past the memory
//! budget, private to the relay's user, written and read back off the
//! pipeline's task, and removed when their transaction ends.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read};
use std::path::PathBuf;

use super::*;

/// Bytes of a spill record before the message: subxid, seq, lsn, length.
pub(super) const RECORD_HEADER: usize = 4 + 8 + 8 + 4;

/// Deletes the file when dropped.
#[derive(Debug)]
pub(super) struct SpillPath(pub(super) PathBuf);

impl Drop for SpillPath {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove a spill file");
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Spill {
    // Declared before the path so the handle closes before the file is removed.
    pub(super) writer: BufWriter<File>,
    pub(super) path: SpillPath,
    /// Bytes written (and flushed) so far.
    pub(super) bytes: u64,
    pub(super) records: u64,
}

/// How much of a spill file a replay reads at a time: one read, off the
/// task, per this many bytes of buffered changes.
pub(super) const REPLAY_READ_CHUNK: usize = 256 * 1024;

/// Runs file I/O the pipeline must wait for without holding up other tasks
/// (review L8). The binary drives the pipeline from `block_on`, a thread of
/// its own, where this just runs `f`: the runtime's workers go on serving
/// HTTP, signals and the probe. Where the driver runs as a task on a worker
/// of a multi-thread runtime, the worker first hands the tasks queued on it
/// to another thread, so a spill of a whole budget's worth of changes stalls
/// none of them. On a current-thread runtime, or none (unit tests), there is
/// nothing to hand over and `f` runs in place.
pub(super) fn blocking_io<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `read_exact`, off the task only when the read buffer cannot serve it:
/// most records of a replay come from memory, one refill in
/// [`REPLAY_READ_CHUNK`] bytes reads the file.
pub(super) fn read_exact_off_task(reader: &mut BufReader<File>, buf: &mut [u8]) -> io::Result<()> {
    if reader.buffer().len() >= buf.len() {
        reader.read_exact(buf)
    } else {
        blocking_io(|| reader.read_exact(buf))
    }
}

/// Makes `dir` the private home of spill files, which hold event payloads
/// (personal data, often): created 0700 where missing, and refused when it,
/// or the directory it is in, belongs to another user (root excepted), who
/// could read the files or swap the directory for one of their own. A
/// directory of ours that others may enter is narrowed to 0700.
pub fn prepare_spill_dir(dir: &std::path::Path) -> Result<(), StreamBufferError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let fail = |source: io::Error| StreamBufferError::SpillDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(dir).map_err(fail)?;
    if !meta.is_dir() {
        return Err(fail(io::Error::other(
            "is not a directory (a symbolic link is refused): point --spill-dir at a directory of the relay's own",
        )));
    }
    if meta.uid() != me {
        return Err(fail(io::Error::other(format!(
            "belongs to user id {}, not to the relay (user id {me}): another user could read the spilled events. Remove it, or point --spill-dir at a directory of the relay's own",
            meta.uid()
        ))));
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let owner = std::fs::metadata(parent).map_err(fail)?.uid();
        if owner != me && owner != 0 {
            return Err(fail(io::Error::other(format!(
                "is inside {}, which belongs to user id {owner}, not to the relay (user id {me}) or root: that user could replace the directory. Point --spill-dir at a directory of the relay's own",
                parent.display()
            ))));
        }
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    }
    Ok(())
}

pub(super) fn create_spill_file(
    dir: &std::path::Path,
    instance: u64,
    xid: u32,
    counter: &mut u64,
) -> Result<Spill, (PathBuf, io::Error)> {
    use std::os::unix::fs::OpenOptionsExt;
    prepare_spill_dir(dir).map_err(|e| match e {
        StreamBufferError::SpillDir { path, source } => (path, source),
        other => (dir.to_path_buf(), io::Error::other(other.to_string())),
    })?;
    let pid = std::process::id();
    let mut attempts = 0;
    loop {
        *counter += 1;
        let path = dir.join(format!("stream-{pid}-{instance}-{xid}-{counter}.spill"));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                return Ok(Spill {
                    writer: BufWriter::new(file),
                    path: SpillPath(path),
                    bytes: 0,
                    records: 0,
                })
            }
            // A leftover of a killed process with the same pid: pick another name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => attempts += 1,
            Err(e) => return Err((path, e)),
        }
    }
}

#[derive(Debug)]
pub(super) struct SpillReader {
    pub(super) reader: BufReader<File>,
    pub(super) path: SpillPath,
    pub(super) records_left: u64,
    pub(super) bytes_left: u64,
}
