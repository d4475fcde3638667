//! Watching the slot from the database side, and the optional heartbeat.
//!
//! Every few seconds the metadata connection reads the slot's row of
//! `pg_replication_slots` with the server's current WAL position: how much WAL
//! the slot keeps, how far the confirmed position trails, and how close the
//! slot is to being invalidated (`wal_status`, `safe_wal_size`), and since
//! when nobody streams from it (`inactive_since`, PostgreSQL 17+) against
//! `idle_replication_slot_timeout` (18+).
//!
//! The heartbeat (`--heartbeat-interval`) writes a tiny non-transactional
//! logical message (`pg_logical_emit_message`) into the WAL of walrelay's
//! database. That keeps the walsender moving, and with it the keepalives
//! whose WAL end walrelay confirms when nothing is in flight, in setups where
//! the events database itself is silent while others write heavily.
use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, SLOT_WAL_STATUSES};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::MetadataError;
use crate::pg::params::ConnectParams;

/// How often the slot is read.
pub const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The prefix of the heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "walrelay.heartbeat";

/// Polls the slot and beats the heart until `shutdown`, on the primary
/// among the hosts `postgres` names: the URL's hosts until the replication
/// connection has chosen one (so the slot's metrics appear while walrelay
/// cannot stream yet), then the host it streams from.
pub async fn run(
    mut postgres: watch::Receiver<ConnectParams>,
    slot: String,
    heartbeat: Option<Duration>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    metrics.watch_slot(&slot);
    let mut client: Option<crate::pg::metadata::Client> = None;
    let mut poll = tokio::time::interval(SLOT_POLL_INTERVAL);
    let mut beat = heartbeat.map(tokio::time::interval);
    let mut standby_slots = HashSet::new();
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
        // A failover moved the primary: follow it.
        if postgres.has_changed().unwrap_or(false) {
            client = None;
        }
        if client
            .as_ref()
            .is_none_or(crate::pg::metadata::Client::is_closed)
        {
            // Until the replication connection has chosen its primary, the
            // URL's hosts (the first primary among them); then that host.
            let host = postgres.borrow_and_update().clone();
            client = match crate::pg::primary::metadata(&host).await {
                Ok((c, _)) => Some(c),
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
            match poll_slot(c, &slot, &metrics).await {
                Ok(()) => match poll_inactivity(c, &slot, &metrics).await {
                    Ok(()) => poll_standby_slots(c, &metrics, &mut standby_slots).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
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

/// Sets `walrelay_standby_sync_lag_bytes` for each slot of
/// `synchronized_standby_slots` (PostgreSQL 17+): how much WAL the primary
/// has that the slot's standby has not confirmed. The walsender decodes a
/// failover slot no further than every one of them, so a stuck standby holds
/// walrelay back by exactly this. A listed slot that does not exist, or
/// whose standby never connected, counts from the start of the WAL.
async fn poll_standby_slots(
    client: &crate::pg::metadata::Client,
    metrics: &Metrics,
    exported: &mut HashSet<String>,
) -> Result<(), MetadataError> {
    let setting: Option<String> = client
        .query_one(
            "SELECT current_setting('synchronized_standby_slots', true)",
            &[],
        )
        .await?
        .get(0);
    let listed = crate::failover::standby_slot_names(&setting.unwrap_or_default());
    let rows = if listed.is_empty() {
        Vec::new()
    } else {
        client
            .query(
                "SELECT name, (pg_current_wal_lsn() - coalesce(s.restart_lsn, '0/0'))::bigint
                   FROM unnest($1::text[]) AS name
                   LEFT JOIN pg_replication_slots s ON s.slot_name = name",
                &[&listed],
            )
            .await?
    };
    let mut now = HashSet::new();
    for row in rows {
        let (name, lag): (String, i64) = (row.get(0), row.get(1));
        metrics
            .standby_sync_lag
            .with_label_values(&[&name])
            .set(lag.max(0));
        now.insert(name);
    }
    for gone in exported.difference(&now) {
        let _ = metrics.standby_sync_lag.remove_label_values(&[gone]);
    }
    *exported = now;
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

/// Since when the slot is unused (PostgreSQL 17+) and after how long unused
/// PostgreSQL invalidates it (`idle_replication_slot_timeout`, 18+). Read
/// through `to_jsonb` and `pg_settings`, so older servers give NULL: 0.
async fn poll_inactivity(
    client: &crate::pg::metadata::Client,
    slot: &str,
    metrics: &Metrics,
) -> Result<(), MetadataError> {
    let Some(row) = client
        .query_opt(
            "SELECT floor(extract(epoch FROM (to_jsonb(s) ->> 'inactive_since')::timestamptz))::bigint
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(());
    };
    metrics
        .slot_inactive_since
        .with_label_values(&[slot])
        .set(row.get::<_, Option<i64>>(0).unwrap_or(0));
    let timeout = crate::slot::idle_timeout(client).await?;
    metrics
        .slot_idle_timeout
        .with_label_values(&[slot])
        .set(timeout.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)));
    Ok(())
}
