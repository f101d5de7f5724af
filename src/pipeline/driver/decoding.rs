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
}

/// A streamed transaction that committed: its changes, to replay as if
/// they had arrived between Begin and Commit.
pub(super) struct Replaying {
    pub(super) replay: stream_buffer::Replay,
    pub(super) decoder: pgoutput::Decoder,
    pub(super) end_lsn: Lsn,
}

/// What to do with one WAL message.
pub(super) enum Step {
    Apply(LogicalMessage),
    /// Held in the stream buffer, or nothing that makes an event.
    Nothing,
    /// A streamed transaction committed.
    Committed {
        commit_lsn: Lsn,
        xid: u32,
        commit_time: i64,
        replaying: Replaying,
    },
}

impl Decoding {
    pub(super) fn new(protocol: u32, stream: Option<StreamBuffer>) -> Decoding {
        Decoding {
            decoder: pgoutput::Decoder::new(protocol),
            stream,
        }
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
            LogicalMessage::StreamCommit(c) => Ok(Step::Committed {
                commit_lsn: c.commit_lsn,
                xid: c.xid,
                commit_time: c.commit_time,
                replaying: Replaying {
                    replay: buffer.commit(c.xid)?,
                    decoder: stream_buffer::replay_decoder(self.decoder.protocol_version(), c.xid),
                    end_lsn: c.end_lsn,
                },
            }),
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
