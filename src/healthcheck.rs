//! `walrelay healthcheck`: probes a running walrelay's endpoint, for
//! orchestrators that take a command rather than an HTTP probe (a container
//! image's `HEALTHCHECK`, which has no HTTP client to run otherwise).
//!
//! One `GET` over HTTP/1.0 on a plain TCP socket, with the standard library
//! only: exit 0 when the answer is 200, 1 for anything else (another status,
//! no answer within the timeout, nothing listening), as Docker expects of a
//! health check command. The answer's body (`ok`, `ready`, `not ready: ...`)
//! is printed, so that `docker inspect` shows why.
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::ValueEnum;

/// The largest answer read: the probes answer a line.
const MAX_ANSWER: usize = 64 * 1024;

/// Which endpoint to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Probe {
    /// `/healthz`: liveness.
    Healthz,
    /// `/readyz`: readiness.
    Readyz,
    /// `/active`: whether this instance publishes.
    Active,
}

impl Probe {
    /// The endpoint's path.
    pub fn path(self) -> &'static str {
        match self {
            Probe::Healthz => "/healthz",
            Probe::Readyz => "/readyz",
            Probe::Active => "/active",
        }
    }
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// Nothing answered in time, or the connection failed.
    #[error("{addr}{path}: {source}")]
    Io {
        /// The address probed.
        addr: SocketAddr,
        /// The path.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("{addr}{path}: no answer within {timeout:?}")]
    Timeout {
        /// The address probed.
        addr: SocketAddr,
        /// The path.
        path: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// An answer that is not HTTP.
    #[error("{addr}{path}: not an HTTP answer")]
    NotHttp {
        /// The address probed.
        addr: SocketAddr,
        /// The path.
        path: &'static str,
    },
    /// An answer other than 200.
    #[error("{addr}{path}: {status} {body}")]
    Unhealthy {
        /// The address probed.
        addr: SocketAddr,
        /// The path.
        path: &'static str,
        /// The HTTP status.
        status: u16,
        /// The answer's body, trimmed.
        body: String,
    },
}

/// The address to connect to for a listening address: a wildcard one
/// (`0.0.0.0`, `::`, as in a container) is reached on the loopback interface.
pub fn local(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// `GET probe` on `addr`, all of it within `timeout`: the body of a 200
/// answer, or why not.
pub fn check(
    addr: SocketAddr,
    probe: Probe,
    timeout: Duration,
) -> Result<String, HealthcheckError> {
    let addr = local(addr);
    let path = probe.path();
    let deadline = Instant::now() + timeout;
    let io = |source| HealthcheckError::Io { addr, path, source };
    let timed_out = || HealthcheckError::Timeout {
        addr,
        path,
        timeout,
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: walrelay-healthcheck\r\n\r\n"
    )
    .map_err(io)?;
    // HTTP/1.0: the server closes after the answer. Read until then, within
    // the one deadline however the bytes trickle in.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        stream.set_read_timeout(Some(left)).map_err(io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() > MAX_ANSWER {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A server that closes without reading all of the request may
            // reset the connection after its answer.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty() => {
                break;
            }
            Err(e) => return Err(io(e)),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(HealthcheckError::NotHttp { addr, path })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .trim()
        .to_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(HealthcheckError::Unhealthy {
            addr,
            path,
            status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `answer` (after reading the request), or
    /// holds it silent when `answer` is `None`.
    fn serve_once(answer: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // The whole request head, so that closing sends no reset.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            match answer {
                Some(answer) => {
                    let _ = stream.write_all(answer.as_bytes());
                }
                None => std::thread::sleep(Duration::from_secs(30)),
            }
        });
        addr
    }

    #[test]
    fn a_200_is_healthy_and_anything_else_is_not() {
        let addr = serve_once(Some("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"));
        assert_eq!(
            check(addr, Probe::Readyz, Duration::from_secs(5)).unwrap(),
            "ready"
        );
        let addr = serve_once(Some(
            "HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: halted: poison_row: ...\n",
        ));
        let err = check(addr, Probe::Readyz, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&err, HealthcheckError::Unhealthy { status: 503, body, .. } if body.starts_with("not ready: halted")),
            "{err}"
        );
        let addr = serve_once(Some("SSH-2.0-OpenSSH\r\n"));
        assert!(matches!(
            check(addr, Probe::Healthz, Duration::from_secs(5)),
            Err(HealthcheckError::NotHttp { .. })
        ));
    }

    #[test]
    fn nothing_listening_or_a_silent_server_fails_within_the_timeout() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            check(closed, Probe::Healthz, Duration::from_secs(5)),
            Err(HealthcheckError::Io { .. })
        ));
        let silent = serve_once(None);
        let started = Instant::now();
        let err = check(silent, Probe::Healthz, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, HealthcheckError::Timeout { .. }), "{err}");
        // Bounded by the timeout, not by the server (which holds on for 30 s).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_wildcard_address_is_probed_on_the_loopback_interface() {
        assert_eq!(
            local("0.0.0.0:9643".parse().unwrap()),
            "127.0.0.1:9643".parse().unwrap()
        );
        assert_eq!(
            local("[::]:9643".parse().unwrap()),
            "[::1]:9643".parse().unwrap()
        );
        assert_eq!(
            local("10.1.2.3:9643".parse().unwrap()),
            "10.1.2.3:9643".parse().unwrap()
        );
    }
}
