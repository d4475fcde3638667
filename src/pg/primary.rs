//! Choosing the server to stream from among the hosts of the URL.
//!
//! walrelay streams from a primary only: a standby's slots cannot be
//! decoded from while it synchronizes them, and what a standby holds is
//! what its primary already sent. The hosts are tried in the order the URL
//! lists them, each within `connect_timeout`, as libpq does:
//!
//! ```text
//! for each host:  connect ──► SELECT pg_is_in_recovery(), transaction_read_only
//!                   │ fails        │ in recovery (a standby): skip
//!                   ▼              │ read-only and target_session_attrs=read-write: skip
//!                 skip             ▼
//!                             (replication) IDENTIFY_SYSTEM: another cluster,
//!                              or a timeline older than one streamed from: skip
//!                                  ▼
//!                               use it
//! ```
//!
//! Every skipped host is named with its reason in the error when none is
//! usable ([`NoPrimary`]); it is transient (try all hosts again later) as
//! long as one of the reasons may pass by itself: a host down, a standby
//! about to be promoted.
//!
//! A timeline older than one walrelay already streamed from means an old
//! primary that came back after a failover without being turned into a
//! standby (split brain): what it sends from its own timeline on is what the
//! promoted server never had, so it is never streamed from.
use std::fmt;
use std::future::Future;

use super::conn::{ConnError, ReplicationConnection, SystemId};
use super::metadata::{self, Client, MetadataError};
use super::params::{ConnectParams, HostPort, TargetSessionAttrs};

/// Why a host was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Connecting or asking it failed.
    Failed {
        /// The error (never holding the password).
        error: String,
        /// Whether trying again later may succeed.
        transient: bool,
    },
    /// It is a standby.
    InRecovery,
    /// `transaction_read_only` is on and `target_session_attrs=read-write`.
    ReadOnly,
    /// It is on an older timeline than one walrelay streamed from.
    OlderTimeline {
        /// Its timeline.
        found: u32,
        /// The newest timeline walrelay streamed from.
        streamed: u32,
    },
    /// It belongs to another cluster than the one walrelay streamed from.
    OtherCluster {
        /// Its system identifier.
        found: String,
        /// The system identifier walrelay streamed from.
        streamed: String,
    },
}

impl SkipReason {
    fn transient(&self) -> bool {
        match self {
            SkipReason::Failed { transient, .. } => *transient,
            // A standby may be promoted, an old primary be stopped.
            SkipReason::InRecovery | SkipReason::ReadOnly | SkipReason::OlderTimeline { .. } => {
                true
            }
            SkipReason::OtherCluster { .. } => false,
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Failed { error, .. } => write!(f, "{error}"),
            SkipReason::InRecovery => write!(f, "in recovery (a standby)"),
            SkipReason::ReadOnly => write!(
                f,
                "read-only (default_transaction_read_only is on) and target_session_attrs=read-write"
            ),
            SkipReason::OlderTimeline { found, streamed } => write!(
                f,
                "on timeline {found}, older than timeline {streamed} walrelay already streamed from: \
                 a former primary that came back after a failover without being made a standby \
                 (what it wrote since is not on the promoted server); stop it or rebuild it as a standby"
            ),
            SkipReason::OtherCluster { found, streamed } => write!(
                f,
                "another cluster (system identifier {found}, walrelay streamed from {streamed}); \
                 remove it from the host list"
            ),
        }
    }
}

/// A host that was tried and not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The host.
    pub target: HostPort,
    /// Why.
    pub reason: SkipReason,
}

/// None of the URL's hosts is a primary walrelay may stream from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NoPrimary {
    /// Each host in the order tried, with why it was skipped.
    pub skipped: Vec<Skipped>,
    /// What was asked for.
    pub attrs: TargetSessionAttrs,
}

impl NoPrimary {
    /// Whether trying the hosts again later may succeed without anyone
    /// changing the configuration.
    pub fn is_transient(&self) -> bool {
        self.skipped.iter().any(|s| s.reason.transient())
    }
}

impl fmt::Display for NoPrimary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [only] = self.skipped.as_slice() {
            return write!(f, "PostgreSQL at {}: {}", only.target, only.reason);
        }
        write!(
            f,
            "no primary among the {} PostgreSQL hosts (target_session_attrs={}):",
            self.skipped.len(),
            self.attrs.as_str()
        )?;
        for skipped in &self.skipped {
            write!(f, " {}: {};", skipped.target, skipped.reason)?;
        }
        Ok(())
    }
}

/// Tries `attempt` on each host of `params` in order, and returns the
/// first success with the parameters of its host; `attempt` says why a host
/// is skipped otherwise.
pub async fn choose<T, F, Fut>(
    params: &ConnectParams,
    mut attempt: F,
) -> Result<(T, ConnectParams), NoPrimary>
where
    F: FnMut(ConnectParams) -> Fut,
    Fut: Future<Output = Result<T, SkipReason>>,
{
    let mut skipped = Vec::new();
    for target in &params.hosts {
        let host = params.at(target);
        match attempt(host.clone()).await {
            Ok(found) => {
                for s in &skipped {
                    let Skipped { target, reason } = s;
                    tracing::info!(host = %target, reason = %reason, "skipped a PostgreSQL host");
                }
                return Ok((found, host));
            }
            Err(reason) => skipped.push(Skipped {
                target: target.clone(),
                reason,
            }),
        }
    }
    Err(NoPrimary {
        skipped,
        attrs: params.target_session_attrs,
    })
}

/// The query that tells a primary from a standby, as libpq asks it for
/// `target_session_attrs`; it runs on both kinds of connection.
const ROLE_QUERY: &str =
    "SELECT pg_is_in_recovery()::text, current_setting('transaction_read_only')";

/// What the answer to [`ROLE_QUERY`] says of a server, for `attrs`.
fn judge(attrs: TargetSessionAttrs, in_recovery: bool, read_only: bool) -> Result<(), SkipReason> {
    if in_recovery {
        return Err(SkipReason::InRecovery);
    }
    if read_only && attrs == TargetSessionAttrs::ReadWrite {
        return Err(SkipReason::ReadOnly);
    }
    Ok(())
}

fn failed_metadata(error: &MetadataError) -> SkipReason {
    SkipReason::Failed {
        error: error.to_string(),
        transient: error.is_transient(),
    }
}

fn failed_replication(error: &ConnError) -> SkipReason {
    SkipReason::Failed {
        error: error.to_string(),
        transient: error.is_transient(),
    }
}

/// Opens a metadata connection to the first host that is a primary.
pub async fn metadata(params: &ConnectParams) -> Result<(Client, ConnectParams), NoPrimary> {
    let attrs = params.target_session_attrs;
    choose(params, |host| async move {
        let client = metadata::connect(&host)
            .await
            .map_err(|e| failed_metadata(&e))?;
        let row = client
            .query_one(ROLE_QUERY, &[])
            .await
            .map_err(|e| failed_metadata(&e))?;
        let (in_recovery, read_only): (String, String) = (row.get(0), row.get(1));
        judge(attrs, in_recovery == "true", read_only == "on")?;
        Ok(client)
    })
    .await
}

/// Opens a replication connection to the first host that is a primary of
/// the cluster `streamed` names (when given) on its timeline or a newer
/// one; returns it with the server's `IDENTIFY_SYSTEM` answer.
pub async fn replication(
    params: &ConnectParams,
    streamed: Option<&SystemId>,
) -> Result<((ReplicationConnection, SystemId), ConnectParams), NoPrimary> {
    let attrs = params.target_session_attrs;
    choose(params, |host| async move {
        let mut repl = ReplicationConnection::connect(&host)
            .await
            .map_err(|e| failed_replication(&e))?;
        let rows = repl
            .simple_query(ROLE_QUERY)
            .await
            .map_err(|e| failed_replication(&e))?;
        let row = rows.first().ok_or_else(|| SkipReason::Failed {
            error: "the role query returned no row".into(),
            transient: true,
        })?;
        let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        judge(attrs, text(0) == "true", text(1) == "on")?;
        let id = repl
            .identify_system()
            .await
            .map_err(|e| failed_replication(&e))?;
        if let Some(streamed) = streamed {
            if id.system_id != streamed.system_id {
                return Err(SkipReason::OtherCluster {
                    found: id.system_id,
                    streamed: streamed.system_id.clone(),
                });
            }
            if id.timeline < streamed.timeline {
                return Err(SkipReason::OlderTimeline {
                    found: id.timeline,
                    streamed: streamed.timeline,
                });
            }
        }
        Ok((repl, id))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> ConnectParams {
        ConnectParams::from_url_with_env(url, |_| None).unwrap()
    }

    #[tokio::test]
    async fn hosts_are_tried_in_order_until_one_is_usable() {
        let p = params("postgres://u:pw@a:1,b:2,c:3/d");
        let mut tried = Vec::new();
        let ((), chosen) = choose(&p, |host| {
            tried.push(host.target().to_string());
            async move {
                match host.host.as_str() {
                    "a" => Err(SkipReason::Failed {
                        error: "connection refused".into(),
                        transient: true,
                    }),
                    "b" => Err(SkipReason::InRecovery),
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(tried, ["a:1", "b:2", "c:3"]);
        assert_eq!(chosen.target().to_string(), "c:3");
        assert_eq!(chosen.hosts.len(), 1);
        assert_eq!(chosen.password(), Some("pw"));
    }

    #[tokio::test]
    async fn the_error_names_each_host_and_why_and_is_transient_while_one_may_recover() {
        let p = params("postgres://u:hunter2@a:1,b:2/d?target_session_attrs=read-write");
        let err = choose(&p, |host| async move {
            Err::<(), _>(match host.host.as_str() {
                "a" => SkipReason::Failed {
                    error: "password authentication failed".into(),
                    transient: false,
                },
                _ => SkipReason::ReadOnly,
            })
        })
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "no primary among the 2 PostgreSQL hosts (target_session_attrs=read-write)"
            ) && text.contains("a:1: password authentication failed")
                && text.contains("b:2: read-only"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(err.is_transient());
        let definite = choose(&p, |_| async {
            Err::<(), _>(SkipReason::OtherCluster {
                found: "1".into(),
                streamed: "2".into(),
            })
        })
        .await
        .unwrap_err();
        assert!(!definite.is_transient(), "{definite}");
    }

    #[test]
    fn standbys_are_skipped_whatever_the_target_and_read_only_only_for_read_write() {
        for attrs in [
            TargetSessionAttrs::Any,
            TargetSessionAttrs::Primary,
            TargetSessionAttrs::ReadWrite,
        ] {
            assert_eq!(judge(attrs, true, false), Err(SkipReason::InRecovery));
            assert_eq!(judge(attrs, false, false), Ok(()));
        }
        assert_eq!(
            judge(TargetSessionAttrs::ReadWrite, false, true),
            Err(SkipReason::ReadOnly)
        );
        assert_eq!(judge(TargetSessionAttrs::Primary, false, true), Ok(()));
        assert_eq!(judge(TargetSessionAttrs::Any, false, true), Ok(()));
    }
}
