//! Waiting until a committed event is in Kafka, on walrelay's `/progress`.
//!
//! The rule (walrelay's README, "Waiting until a write is published"): after
//! COMMIT returned, read `pg_current_wal_lsn()`; once `/progress` shows
//! `confirmed_lsn_int` at or past it, every event of the transaction is
//! acknowledged by the broker. `/progress` says `null` while walrelay cannot
//! vouch for a position (starting, or publishing its initial snapshot), and
//! is unreachable while walrelay is down: both mean "not yet".
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// How often the wait asks again.
const POLL: Duration = Duration::from_millis(20);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the wait failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not confirmed within the time allowed.
    #[error(
        "walrelay at {url} had not confirmed {wanted} within {waited:?} (last answer: {last}); \
         is walrelay running, with --metrics-addr where --walrelay-url points?"
    )]
    NotYet {
        /// walrelay's address.
        url: String,
        /// The position waited for.
        wanted: String,
        /// For how long.
        waited: Duration,
        /// What the last request gave.
        last: String,
    },
    /// The URL is not `http://host:port`.
    #[error("--walrelay-url {0:?}: expected http://host:port")]
    BadUrl(String),
}

/// The `confirmed_lsn_int` walrelay at `url` reports: `Ok(None)` for `null`,
/// `Err` (what went wrong) when it cannot be asked.
pub async fn confirmed(url: &url::Url) -> Result<Option<u64>, String> {
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().ok_or("no port")?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(connection);
        let request = hyper::Request::get("/progress")
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("HTTP: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("GET /progress: {status}"));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("GET /progress: {e}"))?;
        Ok(json["confirmed_lsn_int"].as_u64())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// Waits until walrelay at `url` confirms `lsn` (`lsn_int` as a number).
pub async fn wait(
    url: &url::Url,
    lsn: &str,
    lsn_int: u64,
    timeout: Duration,
) -> Result<(), PublishError> {
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err(PublishError::BadUrl(url.to_string()));
    }
    let started = Instant::now();
    loop {
        let last = match confirmed(url).await {
            Ok(Some(confirmed)) if confirmed >= lsn_int => return Ok(()),
            Ok(Some(confirmed)) => format!("confirmed {confirmed}"),
            Ok(None) => "no position yet".to_owned(),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(PublishError::NotYet {
                url: url.to_string(),
                wanted: lsn.to_owned(),
                waited: started.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
