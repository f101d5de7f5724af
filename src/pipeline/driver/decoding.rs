//! The session's decoding part: the pgoutput decoder and, with
//! `--streaming`, the buffer that holds streamed transactions until they
//! commit. It turns each WAL message into what the session does with it:
//! apply it now, nothing (held, or not an event), or replay a streamed
//! transaction that committed.

use crate::lsn::Lsn;
use crate::pipeline::decode::pgoutput::{self, LogicalMessage};
use crate::pipeline::decode::stream_buffer::{self, StreamBuffer};
use crate::pipeline::source::ReplicationError;

use super::errors::PipelineError;

pub(super) struct Decoding {
    decoder: pgoutput::Decoder,
    /// Buffers streamed in-progress transactions (with --streaming).
    stream: Option<StreamBuffer>,
    /// The committed streamed transaction being handed over, if any.
    replaying: Option<Replaying>,
}

/// A streamed transaction that committed: its changes, to replay as if
/// they had arrived between Begin and Commit.
struct Replaying {
    replay: stream_buffer::Replay,
    decoder: pgoutput::Decoder,
    end_lsn: Lsn,
}

/// The next piece of a committed streamed transaction.
pub(super) enum Replayed {
    /// A change, decoded, at its position.
    Change(LogicalMessage, Lsn),
    /// Every change was handed over: the transaction ends at this LSN.
    End(Lsn),
}

/// What to do with one WAL message.
pub(super) enum Step {
    Apply(LogicalMessage),
    /// Held in the stream buffer, or nothing that makes an event.
    Nothing,
    /// A streamed transaction committed: its changes follow through
    /// `next_replayed`.
    Committed {
        commit_lsn: Lsn,
        xid: u32,
        commit_time: i64,
    },
}

impl Decoding {
    pub(super) fn new(protocol: u32, stream: Option<StreamBuffer>) -> Decoding {
        Decoding {
            decoder: pgoutput::Decoder::new(protocol),
            stream,
            replaying: None,
        }
    }

    /// A committed streamed transaction is being handed over: nothing new is
    /// read until it ends.
    pub(super) fn is_replaying(&self) -> bool {
        self.replaying.is_some()
    }

    /// The next change of the committed streamed transaction, or its end
    /// (`None`: nothing is being replayed).
    pub(super) fn next_replayed(&mut self) -> Result<Option<Replayed>, PipelineError> {
        let Some(r) = self.replaying.as_mut() else {
            return Ok(None);
        };
        let Some(change) = r.replay.next() else {
            let end = r.end_lsn;
            self.replaying = None;
            return Ok(Some(Replayed::End(end)));
        };
        let change = change?;
        let msg = r
            .decoder
            .decode(change.data)
            .map_err(|source| PipelineError::Decode {
                lsn: change.lsn,
                source,
            })?;
        Ok(Some(Replayed::Change(msg, change.lsn)))
    }

    pub(super) fn stream(&self) -> Option<&StreamBuffer> {
        self.stream.as_ref()
    }

    /// Decodes the message at `wal_start`; inside a streamed block, keeps
    /// what makes events until the transaction commits.
    pub(super) fn step(
        &mut self,
        wal_start: Lsn,
        data: bytes::Bytes,
    ) -> Result<Step, PipelineError> {
        let raw = data.clone();
        let msg = self
            .decoder
            .decode(data)
            .map_err(|source| PipelineError::Decode {
                lsn: wal_start,
                source,
            })?;
        let Some(buffer) = self.stream.as_mut() else {
            return Ok(Step::Apply(msg));
        };
        match &msg {
            LogicalMessage::StreamStart(s) => {
                buffer.start(s.xid, s.first_segment)?;
                Ok(Step::Nothing)
            }
            LogicalMessage::StreamStop => Ok(Step::Nothing),
            LogicalMessage::StreamAbort(a) => {
                if let Err(e) = buffer.abort(a.xid, a.subxid) {
                    tracing::debug!(error = %e, "stream abort of a transaction with nothing buffered");
                }
                Ok(Step::Nothing)
            }
            LogicalMessage::StreamCommit(c) => {
                self.replaying = Some(Replaying {
                    replay: buffer.commit(c.xid)?,
                    decoder: stream_buffer::replay_decoder(self.decoder.protocol_version(), c.xid),
                    end_lsn: c.end_lsn,
                });
                Ok(Step::Committed {
                    commit_lsn: c.commit_lsn,
                    xid: c.xid,
                    commit_time: c.commit_time,
                })
            }
            // Inside a streamed block, keep what makes events until the
            // transaction commits; the rest (updates, deletes, types)
            // never does.
            LogicalMessage::Relation(_)
            | LogicalMessage::Insert(_)
            | LogicalMessage::Message(_)
                if self.decoder.in_stream() =>
            {
                let top = self.decoder.stream_xid().ok_or_else(|| {
                    PipelineError::Replication(ReplicationError::Protocol(format!(
                        "a change at {wal_start} inside a streamed block without the block's transaction id"
                    )))
                })?;
                let subxid = self.decoder.last_xid().unwrap_or(top);
                buffer.push(top, subxid, wal_start, &raw)?;
                Ok(Step::Nothing)
            }
            _ if self.decoder.in_stream() => Ok(Step::Nothing),
            _ => Ok(Step::Apply(msg)),
        }
    }
}
