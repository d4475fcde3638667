//! Framing of the PostgreSQL wire protocol on a replication connection.
//!
//! Every backend message is a tag byte, a 4-byte big-endian length that counts
//! itself, and a body. [`BackendCodec`] waits until a whole message is buffered
//! before it consumes anything, so a read cancelled half-way loses no bytes.
//! postgres-protocol parses the ordinary messages; two are handled here:
//! CopyBothResponse (`W`), which its parser does not know, and CopyData (`d`),
//! whose body is handed on as a [`Bytes`] slice of the read buffer, so the
//! pgoutput payload inside is never copied.
//!
//! Inside CopyData, the walsender sends XLogData (`w`) and primary keepalives
//! (`k`); the client sends standby status updates (`r`). Their layouts, all
//! big-endian:
//!
//! ```text
//! w  Int64 WAL start  Int64 WAL end  Int64 server clock  Byte[n] payload
//! k  Int64 WAL end    Int64 server clock                 Byte reply requested
//! r  Int64 written    Int64 flushed  Int64 applied  Int64 clock  Byte reply requested
//! ```
//!
//! Clocks are microseconds since 2000-01-01 UTC.
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend;

use super::lsn::Lsn;
use super::pgoutput::PG_EPOCH_UNIX_SECS;

/// The largest backend message accepted. PostgreSQL's own limit for a
/// CopyData row is 1 GB; anything beyond that is a corrupt stream.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// One message from the server.
pub enum BackendMessage {
    /// The server entered CopyBoth mode: streaming has started.
    CopyBothResponse,
    /// A CopyData body.
    CopyData(Bytes),
    /// Anything else, parsed by postgres-protocol.
    Other(backend::Message),
}

impl std::fmt::Debug for BackendMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendMessage::CopyBothResponse => f.write_str("CopyBothResponse"),
            BackendMessage::CopyData(body) => f.debug_tuple("CopyData").field(&body.len()).finish(),
            // postgres-protocol's messages do not implement Debug.
            BackendMessage::Other(_) => f.write_str("Other(..)"),
        }
    }
}

/// Splits the server's byte stream into [`BackendMessage`]s.
#[derive(Debug, Default)]
pub struct BackendCodec;

impl BackendCodec {
    /// Takes one whole message off the front of `buf`, or returns `None` (and
    /// consumes nothing) when the buffer does not yet hold one.
    pub fn decode(buf: &mut BytesMut) -> io::Result<Option<BackendMessage>> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "backend message {:?} has invalid length {len}",
                    char::from(tag)
                ),
            ));
        }
        let total = len + 1;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        match tag {
            b'd' => {
                let mut frame = buf.split_to(total);
                frame.advance(5);
                Ok(Some(BackendMessage::CopyData(frame.freeze())))
            }
            b'W' => {
                buf.advance(total);
                Ok(Some(BackendMessage::CopyBothResponse))
            }
            _ => backend::Message::parse(buf).map(|m| m.map(BackendMessage::Other)),
        }
    }
}

/// A message of the replication sub-protocol, carried in CopyData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A chunk of decoded WAL: for logical replication, one output plugin message.
    XLogData {
        /// Where the data starts in the WAL (0 for some messages: do not use for progress).
        wal_start: Lsn,
        /// The server's WAL end when it sent this.
        wal_end: Lsn,
        /// The server's clock when it sent this.
        server_time: i64,
        /// The plugin's message.
        data: Bytes,
    },
    /// The server's heartbeat.
    PrimaryKeepalive {
        /// The server's current WAL end: everything before it has been sent.
        wal_end: Lsn,
        /// The server's clock.
        server_time: i64,
        /// The server wants a status update now, or it will time the connection out.
        reply_requested: bool,
    },
}

/// A CopyData body that is not a replication message.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationMessageError {
    /// Too short for its kind.
    #[error("replication message {kind:?} truncated: {len} bytes, expected at least {expected}")]
    Truncated {
        /// The tag.
        kind: char,
        /// What arrived.
        len: usize,
        /// What the layout needs.
        expected: usize,
    },
    /// Neither `w` nor `k`.
    #[error("unknown replication message tag {0:?}")]
    UnknownTag(char),
    /// Empty CopyData.
    #[error("empty CopyData message")]
    Empty,
}

impl ReplicationMessage {
    /// Parses a CopyData body; the XLogData payload is a slice of `body`.
    pub fn parse(mut body: Bytes) -> Result<Self, ReplicationMessageError> {
        let Some(&tag) = body.first() else {
            return Err(ReplicationMessageError::Empty);
        };
        let need = |expected: usize| {
            if body.len() < expected {
                Err(ReplicationMessageError::Truncated {
                    kind: char::from(tag),
                    len: body.len(),
                    expected,
                })
            } else {
                Ok(())
            }
        };
        match tag {
            b'w' => {
                need(25)?;
                body.advance(1);
                Ok(ReplicationMessage::XLogData {
                    wal_start: Lsn(body.get_u64()),
                    wal_end: Lsn(body.get_u64()),
                    server_time: body.get_i64(),
                    data: body,
                })
            }
            b'k' => {
                need(18)?;
                body.advance(1);
                Ok(ReplicationMessage::PrimaryKeepalive {
                    wal_end: Lsn(body.get_u64()),
                    server_time: body.get_i64(),
                    reply_requested: body.get_u8() != 0,
                })
            }
            other => Err(ReplicationMessageError::UnknownTag(char::from(other))),
        }
    }
}

/// The positions a standby status update reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StandbyStatus {
    /// Highest position received.
    pub write: Lsn,
    /// Position that is durably handled: the only field that moves a logical slot.
    pub flush: Lsn,
    /// Reported equal to `flush`.
    pub apply: Lsn,
}

/// Appends a standby status update, framed as a CopyData message, to `buf`.
pub fn put_standby_status_update(
    status: StandbyStatus,
    now: SystemTime,
    reply_requested: bool,
    buf: &mut BytesMut,
) {
    buf.reserve(1 + 4 + 34);
    buf.put_u8(b'd');
    buf.put_u32(4 + 34);
    buf.put_u8(b'r');
    buf.put_u64(status.write.0);
    buf.put_u64(status.flush.0);
    buf.put_u64(status.apply.0);
    buf.put_i64(system_time_to_pg(now));
    buf.put_u8(u8::from(reply_requested));
}

/// Converts a clock reading to PostgreSQL's microseconds since 2000-01-01.
pub fn system_time_to_pg(t: SystemTime) -> i64 {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    match t.duration_since(pg_epoch) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::pgoutput::pg_timestamp_to_system_time;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn waits_for_a_whole_message_and_consumes_nothing_before() {
        let bytes = frame(b'd', b"kpayload");
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(BackendCodec::decode(&mut buf).unwrap().is_none());
            assert_eq!(buf.len(), cut, "consumed bytes of a partial message");
        }
        let mut buf = BytesMut::from(&bytes[..]);
        match BackendCodec::decode(&mut buf).unwrap() {
            Some(BackendMessage::CopyData(body)) => assert_eq!(&body[..], b"kpayload"),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn decodes_copy_both_and_delegates_the_rest() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'W', &[0, 0, 0]));
        buf.extend_from_slice(&frame(b'Z', b"I"));
        assert!(matches!(
            BackendCodec::decode(&mut buf).unwrap(),
            Some(BackendMessage::CopyBothResponse)
        ));
        assert!(matches!(
            BackendCodec::decode(&mut buf).unwrap(),
            Some(BackendMessage::Other(backend::Message::ReadyForQuery(_)))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_impossible_lengths() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(BackendCodec::decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(BackendCodec::decode(&mut buf).is_err());
    }

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x10u64.to_be_bytes());
        w.extend_from_slice(&0x20u64.to_be_bytes());
        w.extend_from_slice(&7i64.to_be_bytes());
        w.extend_from_slice(b"BEGIN");
        assert_eq!(
            ReplicationMessage::parse(Bytes::from(w)).unwrap(),
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                server_time: 7,
                data: Bytes::from_static(b"BEGIN"),
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x30u64.to_be_bytes());
        k.extend_from_slice(&9i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            ReplicationMessage::parse(Bytes::from(k.clone())).unwrap(),
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x30),
                server_time: 9,
                reply_requested: true
            }
        );
        k.pop();
        assert!(ReplicationMessage::parse(Bytes::from(k)).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"x")).is_err());
        assert!(ReplicationMessage::parse(Bytes::new()).is_err());
    }

    #[test]
    fn status_update_is_34_bytes_in_copy_data() {
        let mut buf = BytesMut::new();
        let status = StandbyStatus {
            write: Lsn(3),
            flush: Lsn(2),
            apply: Lsn(2),
        };
        let now = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS + 1);
        put_standby_status_update(status, now, false, &mut buf);
        assert_eq!(buf.len(), 1 + 4 + 34);
        assert_eq!(&buf[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&buf[6..14], &3u64.to_be_bytes());
        assert_eq!(&buf[14..22], &2u64.to_be_bytes());
        assert_eq!(&buf[22..30], &2u64.to_be_bytes());
        assert_eq!(&buf[30..38], &1_000_000i64.to_be_bytes());
        assert_eq!(buf[38], 0);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplicationMessage::parse(Bytes::from(bytes.clone()));
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = BackendCodec::decode(&mut buf) {}
        }

        #[test]
        fn clock_conversion_round_trips(micros in -(1i64 << 50)..(1i64 << 50)) {
            prop_assert_eq!(system_time_to_pg(pg_timestamp_to_system_time(micros)), micros);
        }
    }
}
