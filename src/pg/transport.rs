//! The socket under both connections: TCP with walrelay's keepalives, then
//! TLS as `sslmode` says.
//!
//! PostgreSQL does not start TLS on connect: the client sends an SSLRequest
//! and the server answers one byte, `S` (go ahead) or `N` (no TLS here),
//! which only `sslmode=prefer` accepts. The answer is read alone from the
//! socket, so bytes a man in the middle slips in after `S` go into the
//! handshake and fail it instead of being taken for the server's (libpq's
//! CVE-2021-23222). What comes out is the [`Socket`] and the [`Channel`]
//! that the authentication policy judges.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::auth::Channel;
use super::params::ConnectParams;
use super::tls::{TlsSetup, channel_binding, explain_handshake_error};

/// The connection could not be opened as far as the login.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect failed.
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server answered `N` to SSLRequest.
    #[error(
        "PostgreSQL at {target} does not accept TLS, but the sslmode requires it: \
         enable ssl on the server or use sslmode=prefer or disable"
    )]
    TlsRefused {
        /// `host:port`.
        target: String,
    },
    /// The handshake failed (a certificate that does not verify, say).
    #[error("TLS handshake with PostgreSQL at {target} failed: {}", explain_handshake_error(.source))]
    TlsHandshake {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Neither `S` nor `N` to SSLRequest.
    #[error("PostgreSQL at {target} answered {answer:?} to SSLRequest (expected S or N)")]
    SslAnswer {
        /// `host:port`.
        target: String,
        /// The byte it sent.
        answer: char,
    },
    /// Reading or writing the socket failed.
    #[error("the connection to PostgreSQL at {target} failed: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Whether trying again may succeed without anyone changing anything: a
    /// network failure may pass, a refused certificate or a server without
    /// TLS will not.
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Connect { .. } | TransportError::Io { .. } => true,
            TransportError::TlsHandshake { source, .. } => source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .is_none(),
            TransportError::TlsRefused { .. } | TransportError::SslAnswer { .. } => false,
        }
    }
}

/// A plain or TLS socket.
#[derive(Debug)]
pub enum Socket {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens the connection to `params`' server as far as the login: TCP, then
/// TLS as `tls` says (`None`: sslmode=disable).
pub async fn open(
    params: &ConnectParams,
    tls: Option<TlsSetup>,
    target: &str,
) -> Result<(Socket, Channel), TransportError> {
    let tcp = tcp_connect(params, target).await?;
    match tls {
        None => Ok((Socket::Plain(tcp), Channel::Plain)),
        Some(tls) => start_tls(tcp, tls, target).await,
    }
}

/// Opens the TCP connection, with Nagle off (status updates are small and
/// urgent) and the keepalives of `params`.
pub async fn tcp_connect(
    params: &ConnectParams,
    target: &str,
) -> Result<TcpStream, TransportError> {
    let connect = |source| TransportError::Connect {
        target: target.to_owned(),
        source,
    };
    let tcp = TcpStream::connect((params.host.as_str(), params.port))
        .await
        .map_err(connect)?;
    tcp.set_nodelay(true).map_err(connect)?;
    if let Some(keepalives) = params.keepalives {
        // An idle connection (a standby's, or one waiting on a stalled
        // broker) must survive NAT and load balancer idle timeouts, and a
        // dead peer must show within a minute, not hours.
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(keepalives.idle)
                    .with_interval(keepalives.interval)
                    .with_retries(keepalives.count),
            )
            .map_err(connect)?;
    }
    Ok(tcp)
}

async fn start_tls(
    mut tcp: TcpStream,
    tls: TlsSetup,
    target: &str,
) -> Result<(Socket, Channel), TransportError> {
    let io = |source| TransportError::Io {
        target: target.to_owned(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io)?;
    match tcp.read_u8().await.map_err(io)? {
        b'S' => {}
        b'N' if tls.optional => return Ok((Socket::Plain(tcp), Channel::Plain)),
        b'N' => {
            return Err(TransportError::TlsRefused {
                target: target.to_owned(),
            });
        }
        other => {
            return Err(TransportError::SslAnswer {
                target: target.to_owned(),
                answer: char::from(other),
            });
        }
    }
    let stream = tokio_rustls::TlsConnector::from(tls.config)
        .connect(tls.server_name, tcp)
        .await
        .map_err(|source| TransportError::TlsHandshake {
            target: target.to_owned(),
            source,
        })?;
    let binding = match stream.get_ref().1.peer_certificates() {
        Some([cert, ..]) => channel_binding(cert),
        // rustls always has the peer's certificate after a handshake.
        _ => Err(super::tls::ChannelBindingError::NoCertificate),
    };
    Ok((
        Socket::Tls(Box::new(stream)),
        Channel::Tls {
            verified: tls.verified,
            binding,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_socket_gets_the_keepalives_of_the_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = |query: &str| {
            ConnectParams::from_url_with_env(
                &format!("postgres://u@127.0.0.1:{port}/d{query}"),
                |_| None,
            )
            .unwrap()
        };
        let tuned = url("?keepalives_idle=42&keepalives_interval=7&keepalives_count=4");
        let tcp = tcp_connect(&tuned, "test").await.unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(42)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        let defaults = tcp_connect(&url(""), "test").await.unwrap();
        assert_eq!(
            socket2::SockRef::from(&defaults)
                .tcp_keepalive_time()
                .unwrap(),
            super::super::params::DEFAULT_KEEPALIVES.idle
        );
        let off = tcp_connect(&url("?keepalives=0"), "test").await.unwrap();
        assert!(!socket2::SockRef::from(&off).keepalive().unwrap());
    }
}
