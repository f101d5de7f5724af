//! The CopyBoth stream after START_REPLICATION: a reader of WAL messages
//! and keepalives, and a writer of standby status updates.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use super::*;
use crate::lsn::Lsn;
use crate::pipeline::decode::pgoutput::PG_EPOCH_OFFSET_SECS;

/// The open CopyBoth stream, split so that status updates can be written
/// while a read is pending.
pub struct ReplicationStream {
    pub reader: ReplicationReader,
    pub writer: ReplicationWriter,
}

pub struct ReplicationReader {
    pub(super) r: ReadHalf<BoxStream>,
    pub(super) buf: BytesMut,
}

pub struct ReplicationWriter {
    pub(super) w: WriteHalf<BoxStream>,
    pub(super) out: BytesMut,
}

impl ReplicationReader {
    /// The next message of the stream. Cancellation safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            let frame = read_frame(&mut self.r, &mut self.buf).await?;
            if let Some(m) = Self::message(frame)? {
                return Ok(m);
            }
        }
    }

    /// The next message if it is already buffered, without waiting for the
    /// socket: lets the pipeline handle a burst of messages in one turn.
    pub fn try_next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        while let Some(frame) = parse_frame(&mut self.buf)? {
            if let Some(m) = Self::message(frame)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// A frame's meaning inside the stream; None for frames to skip.
    pub(super) fn message(frame: Frame) -> Result<Option<ReplicationMessage>, ReplicationError> {
        {
            match frame {
                Frame::CopyData(data) => return parse_copy_data(data).map(Some),
                Frame::Other(Message::CopyDone) => return Ok(Some(ReplicationMessage::CopyDone)),
                Frame::Other(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()))
                }
                Frame::Other(Message::NoticeResponse(_))
                | Frame::Other(Message::ParameterStatus(_)) => {}
                Frame::Other(Message::CommandComplete(_))
                | Frame::Other(Message::ReadyForQuery(_)) => {}
                Frame::Other(_) | Frame::CopyBothResponse => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message inside the replication stream".into(),
                    ))
                }
            }
        }
        Ok(None)
    }
}

/// Microseconds since the Postgres epoch, for status updates.
pub fn pg_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_OFFSET_SECS * 1_000_000
}

impl ReplicationWriter {
    /// Sends a standby status update reporting `confirmed` as written,
    /// flushed and applied: the server moves the slot's `confirmed_flush_lsn`
    /// to it and will never send anything at or before it again.
    pub async fn send_status(
        &mut self,
        confirmed: Lsn,
        reply: bool,
    ) -> Result<(), ReplicationError> {
        self.out.clear();
        self.out.put_u8(b'd');
        self.out.put_u32(4 + 34);
        self.out.put_u8(b'r');
        self.out.put_u64(confirmed.0);
        self.out.put_u64(confirmed.0);
        self.out.put_u64(confirmed.0);
        self.out.put_i64(pg_now());
        self.out.put_u8(u8::from(reply));
        self.send().await
    }

    /// Ends the copy from our side (CopyDone) so the server can finish cleanly.
    pub async fn send_copy_done(&mut self) -> Result<(), ReplicationError> {
        self.out.clear();
        frontend::copy_done(&mut self.out);
        self.send().await
    }

    pub async fn send_terminate(&mut self) -> Result<(), ReplicationError> {
        self.out.clear();
        frontend::terminate(&mut self.out);
        self.send().await
    }

    /// Writes the message built in `out` and flushes it.
    async fn send(&mut self) -> Result<(), ReplicationError> {
        self.w.write_all(&self.out).await?;
        self.w.flush().await?;
        Ok(())
    }
}
