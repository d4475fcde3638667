//! Watching the slot from the database side, and the optional heartbeat.
//!
//! Every few seconds the metadata connection reads the slot's row of
//! `pg_replication_slots` with the server's current WAL position: how much WAL
//! the slot keeps, how far the confirmed position trails, and how close the
//! slot is to being invalidated (`wal_status`, `safe_wal_size`).
//!
//! The heartbeat (`--heartbeat-interval`) writes a tiny non-transactional
//! logical message (`pg_logical_emit_message`) into the WAL of walrelay's
//! database. That keeps the walsender moving, and with it the keepalives
//! whose WAL end walrelay confirms when nothing is in flight, in setups where
//! the events database itself is silent while others write heavily.
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, SLOT_WAL_STATUSES};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, MetadataError};
use crate::pg::params::ConnectParams;

/// How often the slot is read.
pub const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The prefix of the heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "walrelay.heartbeat";

/// Polls the slot and beats the heart until `shutdown`.
pub async fn run(
    postgres: ConnectParams,
    slot: String,
    heartbeat: Option<Duration>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    metrics.watch_slot(&slot);
    let mut client: Option<crate::pg::metadata::Client> = None;
    let mut poll = tokio::time::interval(SLOT_POLL_INTERVAL);
    let mut beat = heartbeat.map(tokio::time::interval);
    loop {
        let beat_due = async {
            match beat.as_mut() {
                Some(beat) => {
                    beat.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let heartbeat_now = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = poll.tick() => false,
            () = beat_due => true,
        };
        if client
            .as_ref()
            .is_none_or(crate::pg::metadata::Client::is_closed)
        {
            client = match metadata::connect(&postgres).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "slot monitor cannot connect; will retry");
                    continue;
                }
            };
        }
        let Some(c) = client.as_ref() else { continue };
        let result = if heartbeat_now {
            beat_once(c).await
        } else {
            poll_slot(c, &slot, &metrics).await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "slot monitor query failed");
            client = None;
        }
    }
}

async fn beat_once(client: &crate::pg::metadata::Client) -> Result<(), MetadataError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, '')",
            &[&HEARTBEAT_PREFIX],
        )
        .await?;
    Ok(())
}

async fn poll_slot(
    client: &crate::pg::metadata::Client,
    slot: &str,
    metrics: &Metrics,
) -> Result<(), MetadataError> {
    let Some(row) = client
        .query_opt(
            "SELECT pg_current_wal_lsn()::text, restart_lsn::text, confirmed_flush_lsn::text,
                    wal_status, safe_wal_size
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(());
    };
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|t| t.parse::<Lsn>().ok())
    };
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    if let (Some(current), Some(restart)) = (lsn(0), lsn(1)) {
        metrics
            .slot_retained_wal
            .with_label_values(&[slot])
            .set(gauge(current.bytes_since(restart)));
    }
    if let (Some(current), Some(confirmed)) = (lsn(0), lsn(2)) {
        metrics
            .source_lag_bytes
            .with_label_values(&[slot])
            .set(gauge(current.bytes_since(confirmed)));
    }
    let status: Option<String> = row.get(3);
    for s in SLOT_WAL_STATUSES {
        metrics
            .slot_wal_status
            .with_label_values(&[slot, s])
            .set(i64::from(status.as_deref() == Some(s)));
    }
    match row.get::<_, Option<i64>>(4) {
        Some(safe) => metrics
            .slot_safe_wal_size
            .with_label_values(&[slot])
            .set(safe),
        None => {
            let _ = metrics.slot_safe_wal_size.remove_label_values(&[slot]);
        }
    }
    Ok(())
}
