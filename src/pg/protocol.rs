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
//! A length is a claim by the peer, so it sizes nothing: the read buffer
//! grows with the bytes that arrive, and each kind of message has a cap,
//! checked on the header before any of the body is read. Until
//! AuthenticationOk the caps are tight (libpq's 2000 bytes for an
//! authentication request, 8 KiB for anything else), so whoever answers the
//! connection cannot make walrelay hold more before the login; afterwards
//! CopyData and DataRow may reach PostgreSQL's own 1 GB, errors, notices and
//! row descriptions 1 MiB, and the rest libpq's 30000 bytes.
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

/// The largest backend message accepted at all: PostgreSQL's own limit for
/// a CopyData row or a DataRow is 1 GB (`MaxAllocSize`).
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// The largest authentication request (`R`) before authentication completes:
/// libpq's own limit. SCRAM's messages are a few hundred bytes.
pub const MAX_AUTH_REQUEST_LEN: usize = 2000;

/// The largest message of any other kind before authentication completes
/// (an ErrorResponse saying why the login failed, a notice, a parameter
/// status): a few KiB, so that whoever answers a connection cannot make
/// walrelay buffer more than that before it has proved anything.
pub const MAX_STARTUP_MESSAGE_LEN: usize = 8 * 1024;

/// The largest error, notice, row description or notification once
/// authenticated: libpq accepts these "long" kinds at any length; a
/// megabyte is far beyond any that PostgreSQL sends to walrelay.
pub const MAX_LONG_MESSAGE_LEN: usize = 1 << 20;

/// The largest message of every other kind once authenticated (ReadyForQuery,
/// CommandComplete, ParameterStatus, ...): libpq's limit for the kinds it
/// does not expect to be long.
pub const MAX_SHORT_MESSAGE_LEN: usize = 30_000;

/// Whether the server has accepted the login yet. Before, every message is
/// small, and a length that says otherwise is refused before a byte of its
/// body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Between the startup message and AuthenticationOk.
    #[default]
    Authenticating,
    /// After AuthenticationOk.
    Authenticated,
}

/// The largest length (the field's value, which counts itself) a backend
/// message with `tag` may have in `phase`.
pub fn max_message_len(tag: u8, phase: Phase) -> usize {
    match (phase, tag) {
        (Phase::Authenticating, b'R') => MAX_AUTH_REQUEST_LEN,
        (Phase::Authenticating, _) => MAX_STARTUP_MESSAGE_LEN,
        // CopyData carries pgoutput messages, DataRow query results: a
        // single column value can approach 1 GB.
        (Phase::Authenticated, b'd' | b'D') => MAX_MESSAGE_LEN,
        (Phase::Authenticated, b'E' | b'N' | b'A' | b'T' | b't' | b'V') => MAX_LONG_MESSAGE_LEN,
        (Phase::Authenticated, _) => MAX_SHORT_MESSAGE_LEN,
    }
}

/// A backend message header that cannot be right.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A length below 4, which cannot even count itself.
    #[error("PostgreSQL sent a message {:?} with the impossible length {len}", char::from(*.tag))]
    TooShort {
        /// The message's tag.
        tag: u8,
        /// Its length field.
        len: u32,
    },
    /// A length beyond what the message's kind may have.
    #[error(
        "PostgreSQL sent a message {:?} claiming {len} bytes, but walrelay accepts at most {max} \
         for that kind{}: the peer is not a PostgreSQL server speaking the protocol (or the stream \
         is corrupt); the connection is dropped without reading it",
        char::from(*.tag),
        match .phase { Phase::Authenticating => " before authentication completes", Phase::Authenticated => "" }
    )]
    TooLong {
        /// The message's tag.
        tag: u8,
        /// Its length field.
        len: u32,
        /// The limit for its kind.
        max: usize,
        /// Whether the login had completed.
        phase: Phase,
    },
    /// A whole message whose body does not parse.
    #[error("PostgreSQL sent a malformed message: {0}")]
    Malformed(#[source] io::Error),
}

/// Checks a backend message header: the tag and the length field.
pub fn check_header(tag: u8, len: u32, phase: Phase) -> Result<(), FrameError> {
    if len < 4 {
        return Err(FrameError::TooShort { tag, len });
    }
    let max = max_message_len(tag, phase);
    if usize::try_from(len).map_or(true, |l| l > max) {
        return Err(FrameError::TooLong {
            tag,
            len,
            max,
            phase,
        });
    }
    Ok(())
}

/// Whether a whole backend message (tag, length, body) is AuthenticationOk.
pub fn is_authentication_ok(message: &[u8]) -> bool {
    message.len() == 9 && message[0] == b'R' && message[5..9] == [0, 0, 0, 0]
}

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

/// Splits the server's byte stream into [`BackendMessage`]s, refusing a
/// length beyond what the message's kind may have (tighter until
/// AuthenticationOk, which it watches for).
#[derive(Debug, Default)]
pub struct BackendCodec {
    phase: Phase,
}

impl BackendCodec {
    /// The phase the next message is judged in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Takes one whole message off the front of `buf`, or returns `None` (and
    /// consumes nothing) when the buffer does not yet hold one. It never
    /// reserves room for a message before its bytes arrive: the caller's
    /// buffer grows with what is read, not with what a length claims.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BackendMessage>, FrameError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        check_header(tag, len, self.phase)?;
        // Within MAX_MESSAGE_LEN, so no overflow.
        let total = len as usize + 1;
        if buf.len() < total {
            return Ok(None);
        }
        if is_authentication_ok(&buf[..total]) {
            self.phase = Phase::Authenticated;
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
            _ => backend::Message::parse(buf)
                .map(|m| m.map(BackendMessage::Other))
                .map_err(FrameError::Malformed),
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

    /// A codec past authentication, as while streaming.
    fn authenticated() -> BackendCodec {
        let mut codec = BackendCodec::default();
        let mut buf = BytesMut::from(&frame(b'R', &[0, 0, 0, 0])[..]);
        assert!(codec.decode(&mut buf).unwrap().is_some());
        assert_eq!(codec.phase(), Phase::Authenticated);
        codec
    }

    #[test]
    fn waits_for_a_whole_message_and_consumes_nothing_before() {
        let bytes = frame(b'd', b"kpayload");
        let mut codec = authenticated();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            assert_eq!(buf.len(), cut, "consumed bytes of a partial message");
        }
        let mut buf = BytesMut::from(&bytes[..]);
        match codec.decode(&mut buf).unwrap() {
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
        let mut codec = authenticated();
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(BackendMessage::CopyBothResponse)
        ));
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(BackendMessage::Other(backend::Message::ReadyForQuery(_)))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_impossible_lengths() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(matches!(
            authenticated().decode(&mut buf),
            Err(FrameError::TooShort { len: 3, .. })
        ));
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            authenticated().decode(&mut buf),
            Err(FrameError::TooLong { .. })
        ));
    }

    /// The header of a message of `tag` claiming `len` bytes, with no body yet.
    fn header(tag: u8, len: usize) -> BytesMut {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u8(tag);
        buf.put_u32(u32::try_from(len).unwrap());
        buf
    }

    #[test]
    fn a_claimed_length_reserves_nothing_before_its_bytes_arrive() {
        // A peer that claims a 1 GB CopyData and sends a few bytes of it.
        let mut buf = header(b'd', MAX_MESSAGE_LEN);
        buf.extend_from_slice(b"wxyz");
        let mut codec = authenticated();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(
            buf.capacity() < 64 * 1024,
            "the buffer grew to {} bytes for 9 that arrived",
            buf.capacity()
        );
        assert_eq!(buf.len(), 9, "nothing consumed");
    }

    #[test]
    fn every_kind_has_a_cap_tight_until_the_login_completes() {
        let mut codec = BackendCodec::default();
        // Before AuthenticationOk: libpq's 2000 bytes for an authentication
        // request, a few KiB for anything else, CopyData included.
        for (tag, ok, refused) in [
            (b'R', MAX_AUTH_REQUEST_LEN, MAX_AUTH_REQUEST_LEN + 1),
            (b'E', MAX_STARTUP_MESSAGE_LEN, MAX_STARTUP_MESSAGE_LEN + 1),
            (b'N', MAX_STARTUP_MESSAGE_LEN, MAX_STARTUP_MESSAGE_LEN + 1),
            (b'S', MAX_STARTUP_MESSAGE_LEN, MAX_STARTUP_MESSAGE_LEN + 1),
            (b'd', MAX_STARTUP_MESSAGE_LEN, MAX_STARTUP_MESSAGE_LEN + 1),
        ] {
            assert!(codec.decode(&mut header(tag, ok)).unwrap().is_none());
            let err = codec.decode(&mut header(tag, refused)).unwrap_err();
            assert!(
                matches!(
                    err,
                    FrameError::TooLong {
                        phase: Phase::Authenticating,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string().contains("before authentication completes"),
                "{err}"
            );
        }
        // An error or a notice is no AuthenticationOk: the phase stays.
        let mut buf = BytesMut::from(&frame(b'R', &[0, 0, 0, 3])[..]);
        codec.decode(&mut buf).unwrap();
        assert_eq!(codec.phase(), Phase::Authenticating);

        let mut codec = authenticated();
        for (tag, ok, refused) in [
            (b'd', MAX_MESSAGE_LEN, MAX_MESSAGE_LEN + 1),
            (b'D', MAX_MESSAGE_LEN, MAX_MESSAGE_LEN + 1),
            (b'E', MAX_LONG_MESSAGE_LEN, MAX_LONG_MESSAGE_LEN + 1),
            (b'T', MAX_LONG_MESSAGE_LEN, MAX_LONG_MESSAGE_LEN + 1),
            (b'S', MAX_SHORT_MESSAGE_LEN, MAX_SHORT_MESSAGE_LEN + 1),
            (b'Z', MAX_SHORT_MESSAGE_LEN, MAX_SHORT_MESSAGE_LEN + 1),
            (b'W', MAX_SHORT_MESSAGE_LEN, MAX_SHORT_MESSAGE_LEN + 1),
        ] {
            assert!(codec.decode(&mut header(tag, ok)).unwrap().is_none());
            assert!(matches!(
                codec.decode(&mut header(tag, refused)),
                Err(FrameError::TooLong {
                    phase: Phase::Authenticated,
                    ..
                })
            ));
        }
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
            let mut codec = BackendCodec::default();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        #[test]
        fn clock_conversion_round_trips(micros in -(1i64 << 50)..(1i64 << 50)) {
            prop_assert_eq!(system_time_to_pg(pg_timestamp_to_system_time(micros)), micros);
        }
    }
}
