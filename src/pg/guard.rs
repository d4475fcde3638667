//! The stream between the metadata connection's tokio-postgres client and
//! its socket, which holds that client to walrelay's rules.
//!
//! tokio-postgres answers whatever the server asks for: a cleartext
//! password over plain TCP, SCRAM without channel binding when it cannot
//! compute one. Rather than fork it, walrelay opens the socket itself (TCP,
//! SSLRequest, TLS: [`super::transport`]) and hands tokio-postgres an
//! [`AuthGuard`] around it, through `Config::connect_raw`. Until the server
//! accepts the login, the guard
//!
//! - reads each backend message whole before tokio-postgres sees a byte of
//!   it, refuses a length beyond its kind's cap (the same caps as the
//!   replication connection, [`super::protocol`]), passes each
//!   authentication request through the [`AuthExchange`] and fails the
//!   connection on a refusal, so tokio-postgres never learns of a request it
//!   must not answer; and drops NoticeResponse and ParameterStatus, which
//!   tokio-postgres would take for a wrong answer (the replication
//!   connection skips them too);
//! - holds each message tokio-postgres writes until it is whole, and sends
//!   it only if the exchange allows it: a password nobody may have, or a
//!   SCRAM first message with another mechanism or channel-binding flag
//!   than the policy chose (over TLS, never the "n" of a client that cannot
//!   bind), never leaves.
//!
//! Once the login is accepted it only checks each header's length, and the
//! bytes pass through. When the guard refuses, tokio-postgres sees an I/O
//! error; the reason itself waits in the guard's [`Verdict`] for whoever
//! opened the connection.
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

use super::auth::{AuthError, AuthExchange, AuthMethod, Channel};
use super::protocol::{FrameError, Phase, check_header, is_authentication_ok};
use super::transport::Socket;

/// How much the read buffer grows by when it fills up.
const READ_CHUNK: usize = 16 * 1024;

/// The most tokio-postgres may write during the login before a message of
/// it is whole: its messages then are a few hundred bytes.
const MAX_LOGIN_WRITE: usize = 64 * 1024;

/// Why the guard failed the connection.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The authentication policy refused.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A message longer than its kind may be, or one that does not parse.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// What the guard saw of the login, for whoever opened the connection.
#[derive(Debug, Default)]
pub struct Verdict {
    /// How the server authenticated walrelay, once it asked.
    pub method: Option<AuthMethod>,
    /// Why the guard failed the connection, if it did.
    pub refusal: Option<Refusal>,
}

/// The socket of the metadata connection, as tokio-postgres sees it.
#[derive(Debug)]
pub struct AuthGuard {
    inner: Socket,
    /// The login's judge, until the server accepts it.
    exchange: Option<AuthExchange>,
    verdict: Arc<Mutex<Verdict>>,
    /// The `tls-server-end-point` data tokio-postgres binds SCRAM to (`None`
    /// without TLS).
    binding: Option<Vec<u8>>,
    /// Set once the guard refused: nothing passes any more.
    refused: bool,
    phase: Phase,
    /// Read from the socket, not yet judged.
    incoming: BytesMut,
    /// Judged, for tokio-postgres.
    ready: BytesMut,
    /// Bytes of a message body still to pass through once authenticated.
    body_left: usize,
    /// Whether the startup message (the one without a tag) went out.
    startup_written: bool,
    /// Written by tokio-postgres during the login, not yet a whole message.
    pending: BytesMut,
    /// Judged, for the socket.
    outgoing: BytesMut,
}

impl AuthGuard {
    /// Guards `inner`, which runs over `channel`, with `exchange`; the
    /// outcome shows in `verdict`.
    pub fn new(
        inner: Socket,
        exchange: AuthExchange,
        channel: &Channel,
    ) -> (Self, Arc<Mutex<Verdict>>) {
        let binding = match channel {
            Channel::Plain => None,
            Channel::Tls {
                binding: Ok(data), ..
            } => Some(data.clone()),
            // tokio-postgres answers plain SCRAM with "n" when it has no
            // binding, which walrelay never sends over TLS; given a
            // placeholder it answers "y", which the policy chooses when the
            // server does not offer -PLUS. When the server does offer it,
            // the exchange refuses the login (the binding cannot be
            // computed) before tokio-postgres sees the offer, so the
            // placeholder is never used to bind.
            Channel::Tls {
                binding: Err(_), ..
            } => Some(Vec::new()),
        };
        let verdict = Arc::new(Mutex::new(Verdict::default()));
        (
            AuthGuard {
                inner,
                exchange: Some(exchange),
                verdict: Arc::clone(&verdict),
                binding,
                refused: false,
                phase: Phase::Authenticating,
                incoming: BytesMut::with_capacity(READ_CHUNK),
                ready: BytesMut::new(),
                body_left: 0,
                startup_written: false,
                pending: BytesMut::new(),
                outgoing: BytesMut::new(),
            },
            verdict,
        )
    }

    /// Records `refusal` and turns it into the I/O error tokio-postgres sees.
    fn refuse(&mut self, refusal: Refusal) -> io::Error {
        let error = io::Error::new(io::ErrorKind::PermissionDenied, refusal.to_string());
        self.refused = true;
        self.exchange = None;
        self.pending.clear();
        self.outgoing.clear();
        self.verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .refusal = Some(refusal);
        error
    }

    /// Judges what `incoming` holds, moving what passes to `ready`; returns
    /// whether it made progress.
    fn judge_incoming(&mut self) -> Result<bool, Refusal> {
        if self.body_left > 0 {
            let n = self.body_left.min(self.incoming.len());
            self.ready.extend_from_slice(&self.incoming.split_to(n));
            self.body_left -= n;
            return Ok(n > 0);
        }
        let [tag, a, b, c, d, ..] = self.incoming[..] else {
            return Ok(false);
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        check_header(tag, len, self.phase)?;
        // Within the caps, so no overflow.
        let total = len as usize + 1;
        if self.phase == Phase::Authenticated {
            self.ready.extend_from_slice(&self.incoming.split_to(5));
            self.body_left = total - 5;
            return Ok(true);
        }
        if self.incoming.len() < total {
            return Ok(false);
        }
        let message = self.incoming.split_to(total);
        match tag {
            b'R' => {
                let parsed = backend::Message::parse(&mut message.clone())
                    .map_err(FrameError::Malformed)?
                    .expect("a whole message");
                if let Some(exchange) = &mut self.exchange {
                    exchange.on_request(&parsed)?;
                    self.verdict
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .method = exchange.method();
                }
                if is_authentication_ok(&message) {
                    self.phase = Phase::Authenticated;
                    self.exchange = None;
                }
                self.ready.extend_from_slice(&message);
            }
            // Answers nothing during the login; tokio-postgres would take it
            // for a wrong answer and give up.
            b'N' => log_notice(message),
            b'S' => {}
            _ => self.ready.extend_from_slice(&message),
        }
        Ok(true)
    }

    /// Judges the whole messages in `pending`, moving what passes to `outgoing`.
    fn judge_outgoing(&mut self) -> Result<(), AuthError> {
        loop {
            let (tag, header) = if self.startup_written {
                let [tag, ..] = self.pending[..] else {
                    return Ok(());
                };
                (Some(tag), 1)
            } else {
                (None, 0)
            };
            let Some(len) = self.pending.get(header..header + 4) else {
                return Ok(());
            };
            let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
            let total = header + len.max(4);
            if self.pending.len() < total {
                return Ok(());
            }
            if let (Some(tag), Some(exchange)) = (tag, &mut self.exchange) {
                exchange.on_client_message(tag, &self.pending[header + 4..total])?;
            }
            self.startup_written = true;
            self.outgoing
                .extend_from_slice(&self.pending.split_to(total));
        }
    }

    /// Writes `outgoing` to the socket.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.outgoing))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// The error tokio-postgres sees once the guard refused.
fn already_refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the connection was refused by walrelay's authentication policy",
    )
}

fn log_notice(mut message: BytesMut) {
    if let Ok(Some(backend::Message::NoticeResponse(body))) = backend::Message::parse(&mut message)
    {
        if let Ok(notice) = super::conn::ServerError::from_fields(body.fields()) {
            tracing::info!(code = %notice.code, "postgres (metadata connection, during login): {}", notice.message);
        }
    }
}

impl AsyncRead for AuthGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(already_refused()));
        }
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match this.judge_incoming() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(refusal) => return Poll::Ready(Err(this.refuse(refusal))),
            }
            // Room for one chunk of what arrives, never for what a length claims.
            let start = this.incoming.len();
            this.incoming.resize(start + READ_CHUNK, 0);
            let mut chunk = ReadBuf::new(&mut this.incoming[start..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut chunk);
            let read = chunk.filled().len();
            this.incoming.truncate(start + read);
            ready!(polled)?;
            if read == 0 {
                // The end: whatever partial message is left is dropped.
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for AuthGuard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(already_refused()));
        }
        if this.exchange.is_none() && this.pending.is_empty() {
            ready!(this.poll_drain(cx))?;
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if this.pending.len() + buf.len() > MAX_LOGIN_WRITE {
            return Poll::Ready(Err(io::Error::other(
                "the metadata connection's client wrote more than 64 KiB during the login",
            )));
        }
        this.pending.extend_from_slice(buf);
        if let Err(refusal) = this.judge_outgoing() {
            return Poll::Ready(Err(this.refuse(refusal.into())));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Err(already_refused()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl TlsStream for AuthGuard {
    fn channel_binding(&self) -> ChannelBinding {
        self.binding
            .clone()
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// The "TLS connector" tokio-postgres is given: the guard's socket already
/// runs TLS (walrelay negotiated it), so connecting hands the stream back.
#[derive(Debug, Clone, Copy)]
pub struct Established;

impl TlsConnect<AuthGuard> for Established {
    type Stream = AuthGuard;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<AuthGuard>>;

    fn connect(self, stream: AuthGuard) -> Self::Future {
        std::future::ready(Ok(stream))
    }
}
