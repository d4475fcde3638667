//! Bounds on the requests walrelay sends PostgreSQL, and the record of those
//! still waiting for an answer.
//!
//! Every request that waits on the network (a replication command such as
//! `SHOW` or `START_REPLICATION`, a metadata query, a snapshot fetch) runs
//! under [`RequestLimit::run`]: past `--request-timeout` it is abandoned with
//! [`TimedOut`], a transient error after which the caller drops the
//! connection and makes a new one. A request that got no answer means the
//! server's backend is stopped, the network silently drops packets, or the
//! query waits on a lock: none of that heals by waiting on the same
//! connection, and without a bound walrelay would hang there for good.
//!
//! While it waits, a request is listed in [`Waiting`], which `/readyz`
//! consults: an instance whose request has waited longer than half the
//! timeout is not ready, and says which request.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long a request may wait for PostgreSQL unless `--request-timeout`
/// says otherwise. The requests walrelay makes answer in milliseconds on a
/// healthy server; this leaves room for a loaded one.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest request name shown in errors and `/readyz`.
const MAX_NAME_CHARS: usize = 80;

/// A request PostgreSQL did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "PostgreSQL did not answer `{request}` within {after:?} (--request-timeout): the server's \
     backend, the network or a lock holds it up; the connection is dropped and made again"
)]
pub struct TimedOut {
    /// The request, as sent (shortened).
    pub request: String,
    /// The limit it exceeded.
    pub after: Duration,
}

/// The requests waiting for PostgreSQL now, with when each was sent.
#[derive(Debug, Default)]
pub struct Waiting {
    next: AtomicU64,
    requests: Mutex<BTreeMap<u64, (String, Instant)>>,
}

impl Waiting {
    /// The request that has waited longest, and how long.
    pub fn longest(&self) -> Option<(String, Duration)> {
        let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        requests
            .values()
            .min_by_key(|(_, since)| *since)
            .map(|(name, since)| (name.clone(), since.elapsed()))
    }

    fn enter(self: &Arc<Self>, name: String) -> Entry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (name, Instant::now()));
        Entry {
            waiting: Arc::clone(self),
            id,
        }
    }
}

/// A request's place in [`Waiting`], given up when it is answered,
/// abandoned or cancelled.
struct Entry {
    waiting: Arc<Waiting>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.waiting
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// How long requests may wait, and where they are listed meanwhile.
#[derive(Debug, Clone)]
pub struct RequestLimit {
    /// The bound on each request (`--request-timeout`).
    pub timeout: Duration,
    /// Where waiting requests are listed, for `/readyz`; `None` outside
    /// `walrelay run`.
    pub waiting: Option<Arc<Waiting>>,
}

impl Default for RequestLimit {
    fn default() -> Self {
        RequestLimit {
            timeout: DEFAULT_REQUEST_TIMEOUT,
            waiting: None,
        }
    }
}

impl PartialEq for RequestLimit {
    fn eq(&self, other: &Self) -> bool {
        let same_list = match (&self.waiting, &other.waiting) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.timeout == other.timeout && same_list
    }
}

impl Eq for RequestLimit {}

impl RequestLimit {
    /// Runs `request` (named by its text, `sql`) within the timeout.
    pub async fn run<F: Future>(&self, sql: &str, request: F) -> Result<F::Output, TimedOut> {
        self.run_within(self.timeout, sql, request).await
    }

    /// Runs `request` within `timeout` rather than the usual one.
    pub async fn run_within<F: Future>(
        &self,
        timeout: Duration,
        sql: &str,
        request: F,
    ) -> Result<F::Output, TimedOut> {
        let name = request_name(sql);
        let _entry = self.waiting.as_ref().map(|w| w.enter(name.clone()));
        tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| TimedOut {
                request: name,
                after: timeout,
            })
    }
}

/// A request's text on one line, shortened: its name in errors and `/readyz`.
pub fn request_name(sql: &str) -> String {
    let line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= MAX_NAME_CHARS {
        return line;
    }
    let mut short: String = line.chars().take(MAX_NAME_CHARS - 1).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_short_line() {
        assert_eq!(
            request_name("SELECT a,\n       b\n  FROM t"),
            "SELECT a, b FROM t"
        );
        let long = request_name(&"x ".repeat(100));
        assert_eq!(long.chars().count(), MAX_NAME_CHARS);
        assert!(long.ends_with('…'));
    }

    #[tokio::test]
    async fn a_request_past_its_limit_is_abandoned_naming_it_and_listed_while_it_waits() {
        let waiting = Arc::new(Waiting::default());
        let limit = RequestLimit {
            timeout: Duration::from_millis(400),
            waiting: Some(Arc::clone(&waiting)),
        };
        assert_eq!(waiting.longest(), None);
        let stuck = limit.run("SHOW\n wal_sender_timeout", std::future::pending::<()>());
        tokio::pin!(stuck);
        // Still waiting after 100 ms: listed, with its age.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut stuck)
                .await
                .is_err()
        );
        let (name, age) = waiting.longest().expect("listed while waiting");
        assert_eq!(name, "SHOW wal_sender_timeout");
        assert!(age >= Duration::from_millis(100), "{age:?}");
        // At its limit it is given up, named, and no longer listed.
        let err = stuck.await.unwrap_err();
        assert_eq!(
            err,
            TimedOut {
                request: "SHOW wal_sender_timeout".into(),
                after: Duration::from_millis(400)
            }
        );
        assert!(err.to_string().contains("--request-timeout"), "{err}");
        assert_eq!(waiting.longest(), None);
        // An answered request leaves no trace either.
        assert_eq!(limit.run("SELECT 1", async { 1 }).await, Ok(1));
        assert_eq!(waiting.longest(), None);
    }
}
