//! The pure frame codec: backend messages cut from the read buffer, and
//! the CopyData payloads of the replication stream (XLogData, keepalives)
//! parsed. No I/O.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::*;
use crate::lsn::Lsn;

pub(super) enum Frame {
    CopyBothResponse,
    CopyData(Bytes),
    Other(Message),
}

pub(super) const READ_CHUNK: usize = 64 * 1024;

pub(super) async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ReplicationError> {
    loop {
        if let Some(frame) = parse_frame(buf)? {
            return Ok(frame);
        }
        buf.reserve(READ_CHUNK);
        // read_buf is cancellation safe: dropping this future loses nothing.
        if r.read_buf(buf).await? == 0 {
            return Err(ReplicationError::Closed);
        }
    }
}

pub(super) fn parse_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplicationError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ReplicationError::Protocol(format!(
            "message length {len} < 4"
        )));
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    match tag {
        // postgres-protocol's backend parser does not know CopyBothResponse,
        // and CopyData is the hot path: take both apart here.
        b'W' => {
            buf.advance(len + 1);
            Ok(Some(Frame::CopyBothResponse))
        }
        b'd' => {
            buf.advance(5);
            Ok(Some(Frame::CopyData(buf.split_to(len - 4).freeze())))
        }
        _ => match Message::parse(buf)? {
            Some(m) => Ok(Some(Frame::Other(m))),
            None => Ok(None),
        },
    }
}

/// What the server sends inside the CopyBoth stream.
#[derive(Debug, Clone)]
pub enum ReplicationMessage {
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
    /// The server ended the copy (CopyDone).
    CopyDone,
}

pub(super) fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let short = |what: &str| ReplicationError::Protocol(format!("truncated {what} message"));
    if !data.has_remaining() {
        return Err(short("CopyData"));
    }
    match data.get_u8() {
        b'w' => {
            if data.remaining() < 24 {
                return Err(short("XLogData"));
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            })
        }
        b'k' => {
            if data.remaining() < 17 {
                return Err(short("primary keepalive"));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(data.get_u64()),
                send_time: data.get_i64(),
                reply_requested: data.get_u8() == 1,
            })
        }
        tag => Err(ReplicationError::Protocol(format!(
            "unknown replication message {:?}",
            char::from(tag)
        ))),
    }
}
