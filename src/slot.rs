//! The service's replication slot: its state as `pg_replication_slots` shows
//! it, and what walrelay does about each state.
//!
//! The slot's `confirmed_flush_lsn` is walrelay's only durable position. A
//! slot that is missing after walrelay used it, or invalidated because it held
//! more WAL than `max_slot_wal_keep_size`, means the events between its last
//! confirmation and now may never reach Kafka; walrelay then refuses to start
//! rather than silently begin again from "now".
//!
//! What invalidated a slot depends on the version: before PostgreSQL 16
//! only WAL removal (`max_slot_wal_keep_size`) could, shown as `wal_status =
//! lost`; 16 added conflicts with recovery on a standby (`conflicting`); 17
//! names the cause (`invalidation_reason`: `wal_removed`, `rows_removed`,
//! `wal_level_insufficient`) and records `inactive_since`; 18 adds
//! `idle_timeout` (`idle_replication_slot_timeout`: a slot no process used
//! for that long, invalidated at a checkpoint). The columns are read through
//! `to_jsonb` of the row, so one query serves every version (a missing
//! column reads NULL), and each cause is explained with its own fix.
//!
//! A standby also watches the process that holds the slot ([`HolderWatch`]).
//! A live holder sends a standby status update at least every 10 seconds,
//! even while a broker outage holds its confirmations back, and each carries
//! a new `reply_time`; `pg_stat_replication` shows it with the positions
//! reported. A holder whose report has not changed at all for
//! `--stale-slot-grace`, timed on the standby's own monotonic clock, is dead
//! or frozen. The holder's clock is never compared with anyone else's: a
//! holder whose clock is hours off is as alive as any other. The grace is
//! never shorter than the server's `wal_sender_timeout` plus 10 s when that
//! is set ([`holder_grace`]): a walsender busy decoding reads its client's
//! updates only every half timeout (and the server ends a silent
//! connection itself after the timeout). Only a walsender is judged: a session that holds
//! the slot through the SQL functions (`pg_logical_slot_get_changes`) sends
//! no replies, and is waited for, never terminated.
use std::time::Duration;

use tokio::time::Instant;

use crate::pg::lsn::Lsn;
use crate::pg::metadata::MetadataError;

/// One row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// The output plugin (`pgoutput` for walrelay's slot).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// The database a logical slot decodes.
    pub database: Option<String>,
    /// Whether a walsender streams from it now.
    pub active: bool,
    /// That walsender's PID.
    pub active_pid: Option<i32>,
    /// Where the next session resumes.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The oldest WAL the slot needs; NULL once PostgreSQL removed that WAL
    /// (16+ clear it for that cause only).
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (NULL before PostgreSQL 13).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is lost (NULL: unlimited).
    pub safe_wal_size: Option<i64>,
    /// Whether it is a temporary slot.
    pub temporary: bool,
    /// Why it was invalidated (PostgreSQL 17+; NULL while it is valid).
    pub invalidation_reason: Option<String>,
    /// Whether it was invalidated by a conflict with recovery (PostgreSQL 16+).
    pub conflicting: Option<bool>,
    /// When it became inactive, as PostgreSQL prints it (PostgreSQL 17+;
    /// NULL while a process streams from it).
    pub inactive_since: Option<String>,
    /// Whole seconds since `inactive_since`, by the server's clock.
    pub inactive_seconds: Option<i64>,
}

/// Reads the state of slot `name`, or `None` when it does not exist.
pub async fn inspect(
    client: &crate::pg::metadata::Client,
    name: &str,
) -> Result<Option<SlotState>, MetadataError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid,
                    confirmed_flush_lsn::text, wal_status, safe_wal_size, temporary,
                    restart_lsn::text,
                    to_jsonb(s) ->> 'invalidation_reason',
                    (to_jsonb(s) ->> 'conflicting')::boolean,
                    (to_jsonb(s) ->> 'inactive_since')::timestamptz::text,
                    extract(epoch FROM now() - (to_jsonb(s) ->> 'inactive_since')::timestamptz)::bigint
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|row| SlotState {
        plugin: row.get(0),
        slot_type: row.get(1),
        database: row.get(2),
        active: row.get(3),
        active_pid: row.get(4),
        confirmed_flush_lsn: row.get::<_, Option<String>>(5).and_then(|t| t.parse().ok()),
        wal_status: row.get(6),
        safe_wal_size: row.get(7),
        temporary: row.get(8),
        restart_lsn: row.get::<_, Option<String>>(9).and_then(|t| t.parse().ok()),
        invalidation_reason: row.get(10),
        conflicting: row.get(11),
        inactive_since: row.get(12),
        inactive_seconds: row.get(13),
    }))
}

/// The server's `idle_replication_slot_timeout` (PostgreSQL 18+): how long
/// a slot may stay unused before the next checkpoint invalidates it. `None`
/// when it is off (0) or the server has no such setting.
pub async fn idle_timeout(
    client: &crate::pg::metadata::Client,
) -> Result<Option<Duration>, MetadataError> {
    // `setting` is in the parameter's base unit (seconds in 18).
    let row = client
        .query_opt(
            "SELECT (setting::numeric * CASE unit WHEN 'min' THEN 60 WHEN 'h' THEN 3600
                                                  WHEN 'd' THEN 86400 ELSE 1 END)::bigint
               FROM pg_settings WHERE name = 'idle_replication_slot_timeout'",
            &[],
        )
        .await?;
    Ok(row
        .and_then(|row| row.get::<_, Option<i64>>(0))
        .and_then(|secs| u64::try_from(secs).ok())
        .filter(|&secs| secs > 0)
        .map(Duration::from_secs))
}

/// A slot's failover flags (PostgreSQL 17+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverFlags {
    /// Whether standbys with `sync_replication_slots` keep a copy of it.
    pub failover: bool,
    /// Whether it is such a copy (on a standby), or was one before its
    /// server was promoted.
    pub synced: bool,
    /// Whether it is temporary: on a standby, a synchronized copy that is
    /// not yet sync-ready, which promotion drops.
    pub temporary: bool,
}

/// The failover flags of slot `name`; `None` when it does not exist or the
/// server predates failover slots (PostgreSQL 16 and older).
pub async fn failover_flags(
    client: &crate::pg::metadata::Client,
    name: &str,
) -> Result<Option<FailoverFlags>, MetadataError> {
    // Read through to_jsonb: the columns exist from PostgreSQL 17 on.
    let row = client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool, temporary
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row.and_then(|row| {
        let (failover, synced): (Option<bool>, Option<bool>) = (row.get(0), row.get(1));
        Some(FailoverFlags {
            failover: failover?,
            synced: synced?,
            temporary: row.get(2),
        })
    }))
}

/// What is wrong with an existing slot, for walrelay's purposes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotProblem {
    /// Physical, another plugin, or another database.
    #[error(
        "replication slot {name:?} is not walrelay's: it is a {kind} slot{plugin} for database {database:?}; \
         choose another --slot, or drop it if it is unused"
    )]
    Foreign {
        /// The slot.
        name: String,
        /// logical/physical.
        kind: String,
        /// ` with plugin X`.
        plugin: String,
        /// Its database.
        database: Option<String>,
    },
    /// Invalidated: it can no longer be streamed from.
    #[error(
        "replication slot {name:?} is invalidated ({cause}), so the events committed after {confirmed} may \
         never have been published. walrelay will not recreate it silently. Recover: publish the missing \
         events from the table (SELECT ... FROM events WHERE recorded_at > the time of that LSN), then drop \
         the slot (SELECT pg_drop_replication_slot('{name}')) and start walrelay again; {prevent}",
        cause = reason.cause(),
        prevent = reason.prevention()
    )]
    Lost {
        /// The slot.
        name: String,
        /// Its last confirmed position.
        confirmed: String,
        /// Why PostgreSQL invalidated it.
        reason: Invalidation,
    },
}

/// Why PostgreSQL invalidated a slot, as far as its version tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// It needed WAL past `max_slot_wal_keep_size` (`wal_removed`; the only
    /// cause before PostgreSQL 16, shown as `wal_status = lost`).
    WalRemoved,
    /// No process used it for `idle_replication_slot_timeout` (PostgreSQL 18).
    IdleTimeout,
    /// A slot on a standby lost catalog rows it needed (`rows_removed`).
    RowsRemoved,
    /// `wal_level` on the primary fell below `logical`.
    WalLevelInsufficient,
    /// A conflict with recovery on a standby (PostgreSQL 16, which does not
    /// say which one).
    Conflict,
    /// A cause this version of walrelay does not know.
    Other(String),
}

impl Invalidation {
    /// The cause from `invalidation_reason` (17+), else WAL removal. On
    /// PostgreSQL 16, `conflicting` is true for an invalidated logical slot
    /// whatever the cause (17 narrowed it to the conflicts), so there a
    /// conflict is told from WAL removal by `restart_lsn`, which only WAL
    /// removal clears.
    fn of(state: &SlotState) -> Self {
        match (state.invalidation_reason.as_deref(), state.conflicting) {
            (Some("wal_removed"), _) => Invalidation::WalRemoved,
            (Some("idle_timeout"), _) => Invalidation::IdleTimeout,
            (Some("rows_removed"), _) => Invalidation::RowsRemoved,
            (Some("wal_level_insufficient"), _) => Invalidation::WalLevelInsufficient,
            (Some(other), _) => Invalidation::Other(other.to_owned()),
            (None, Some(true)) if state.restart_lsn.is_some() => Invalidation::Conflict,
            (None, _) => Invalidation::WalRemoved,
        }
    }

    fn cause(&self) -> String {
        match self {
            Invalidation::WalRemoved => {
                "wal_status = lost: PostgreSQL removed WAL it still needed, \
                 because it held more than max_slot_wal_keep_size"
                    .to_owned()
            }
            Invalidation::IdleTimeout => {
                "invalidation_reason = idle_timeout: no walrelay used it for longer than \
                 idle_replication_slot_timeout"
                    .to_owned()
            }
            Invalidation::RowsRemoved => {
                "invalidation_reason = rows_removed: on a standby, the primary removed \
                 catalog rows the slot still needed"
                    .to_owned()
            }
            Invalidation::WalLevelInsufficient => {
                "invalidation_reason = wal_level_insufficient: wal_level on the \
                 primary was set below logical"
                    .to_owned()
            }
            Invalidation::Conflict => {
                "conflicting = true: it conflicted with recovery on a standby (catalog rows \
                 removed, or wal_level lowered, on the primary)"
                    .to_owned()
            }
            Invalidation::Other(reason) => format!("invalidation_reason = {reason}"),
        }
    }

    fn prevention(&self) -> &'static str {
        match self {
            Invalidation::WalRemoved => {
                "raise max_slot_wal_keep_size (-1: unlimited) to prevent a repeat, and alert on \
                 walrelay_slot_safe_wal_size_bytes"
            }
            Invalidation::IdleTimeout => {
                "raise idle_replication_slot_timeout above the longest time every walrelay may be down \
                 (0 disables it; walrelay check --expected-max-downtime compares the two), and alert on \
                 walrelay_slot_inactive_since_seconds"
            }
            Invalidation::RowsRemoved | Invalidation::Conflict => {
                "on the standby set hot_standby_feedback = on and a primary_slot_name, so that the primary \
                 keeps the rows the slot needs"
            }
            Invalidation::WalLevelInsufficient => "keep wal_level = logical on the primary",
            Invalidation::Other(_) => {
                "see pg_replication_slots in PostgreSQL's documentation for the cause"
            }
        }
    }
}

impl SlotState {
    /// Checks that the slot is a pgoutput slot of `database` that still has its WAL.
    pub fn problem(&self, name: &str, database: &str) -> Option<SlotProblem> {
        let ours = self.slot_type == "logical"
            && self.plugin.as_deref() == Some("pgoutput")
            && self.database.as_deref() == Some(database);
        if !ours {
            return Some(SlotProblem::Foreign {
                name: name.to_owned(),
                kind: self.slot_type.clone(),
                plugin: self
                    .plugin
                    .as_ref()
                    .map(|p| format!(" with plugin {p}"))
                    .unwrap_or_default(),
                database: self.database.clone(),
            });
        }
        if self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some() {
            return Some(SlotProblem::Lost {
                name: name.to_owned(),
                confirmed: self
                    .confirmed_flush_lsn
                    .map_or_else(|| "its last confirmation".to_owned(), |l| l.to_string()),
                reason: Invalidation::of(self),
            });
        }
        None
    }
}

#[cfg(test)]
impl SlotState {
    /// A valid pgoutput slot of database `app` that nobody streams from.
    pub(crate) fn example() -> Self {
        SlotState {
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("app".into()),
            active: false,
            active_pid: None,
            confirmed_flush_lsn: Some(Lsn(0x100)),
            restart_lsn: Some(Lsn(0x80)),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            temporary: false,
            invalidation_reason: None,
            conflicting: None,
            inactive_since: None,
            inactive_seconds: None,
        }
    }
}

/// What `pg_stat_replication` shows of the holder's last status update.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replies {
    reply_time: Option<String>,
    write_lsn: Option<String>,
    flush_lsn: Option<String>,
}

/// One look at the process that holds the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    /// Nobody holds the slot.
    Nobody,
    /// A walsender whose replies this role may not see: without
    /// `pg_read_all_stats`, `pg_stat_replication` shows its PID only.
    Hidden(i32),
    /// A backend that is not a walsender (a session calling
    /// `pg_logical_slot_get_changes`, say): it sends no replies, so their
    /// standing still says nothing about it.
    Backend(i32),
    /// A walsender with its replies.
    Seen(i32, Replies),
}

/// What a look at the holder concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nobody holds it, or the holder's replies changed within the grace.
    Alive,
    /// The holder's replies cannot be seen: no judgement is possible.
    Hidden(i32),
    /// The holder is not a walsender: never judged, never terminated.
    Backend(i32),
    /// The holder's replies have not changed for this long, past the grace.
    Stale(i32, Duration),
}

/// What a standby has seen of the process that holds the slot, timed on its
/// own monotonic clock; see the module documentation.
#[derive(Debug, Default)]
pub struct HolderWatch {
    /// The holder's PID, its replies, and when this instance first saw them so.
    last: Option<(i32, Replies, Instant)>,
    /// The PID last reported as stale, so that each is reported once.
    reported_stale: Option<i32>,
    /// The PID last reported as hidden, likewise.
    reported_hidden: Option<i32>,
    /// The PID last reported as not a walsender, likewise.
    reported_backend: Option<i32>,
}

/// The grace a standby gives the slot's holder: `configured`
/// (`--stale-slot-grace`), and never less than the server's
/// `wal_sender_timeout` plus a margin ([`silence_limit`]), as `SHOW` prints
/// it in `wal_sender_timeout_shown`. A walsender busy decoding a large
/// transaction reads its client's status updates only every half
/// `wal_sender_timeout`, so `pg_stat_replication` may show the same reply
/// for that long and more while the holder is well; the server itself ends a
/// connection whose client stays silent for `wal_sender_timeout`. With the
/// timeout disabled (0), a walsender reads the updates as they come (every
/// 10 s from a healthy holder) and never ends a silent connection itself:
/// `configured` applies as it is.
///
/// [`silence_limit`]: crate::pg::conn::silence_limit
pub fn holder_grace(configured: Duration, wal_sender_timeout_shown: &str) -> Duration {
    if wal_sender_timeout_shown.trim() == "0" {
        return configured;
    }
    configured.max(crate::pg::conn::silence_limit(wal_sender_timeout_shown))
}

impl HolderWatch {
    /// Looks at the holder of `slot` once. When it is a walsender whose
    /// replies have not changed for `grace` (raised to [`holder_grace`]),
    /// reports it with its PID (once) and, with `take_over`, terminates it so
    /// that this instance can take the slot. A holder that is not a walsender
    /// is reported once and left alone.
    pub async fn check(
        &mut self,
        client: &crate::pg::metadata::Client,
        slot: &str,
        grace: Duration,
        take_over: bool,
    ) -> Result<(), MetadataError> {
        let shown: String = client
            .query_one("SELECT current_setting('wal_sender_timeout')", &[])
            .await?
            .get(0);
        let grace = holder_grace(grace, &shown);
        let holder = match client
            .query_opt(
                "SELECT s.active_pid, r.pid IS NOT NULL, r.state IS NOT NULL,
                        r.reply_time::text, r.write_lsn::text, r.flush_lsn::text
                   FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.slot_name = $1 AND s.active_pid IS NOT NULL",
                &[&slot],
            )
            .await?
        {
            None => Holder::Nobody,
            Some(row) => match (row.get(0), row.get(1), row.get(2)) {
                (pid, false, _) => Holder::Backend(pid),
                (pid, true, false) => Holder::Hidden(pid),
                (pid, true, true) => Holder::Seen(
                    pid,
                    Replies {
                        reply_time: row.get(3),
                        write_lsn: row.get(4),
                        flush_lsn: row.get(5),
                    },
                ),
            },
        };
        match self.observe(holder, Instant::now(), grace) {
            Verdict::Alive => {}
            Verdict::Hidden(pid) => {
                if self.reported_hidden != Some(pid) {
                    tracing::warn!(slot = %slot, pid,
                        "cannot tell whether the slot's holder is alive: pg_stat_replication shows its replies only to roles with \
                         pg_read_all_stats; GRANT pg_read_all_stats to walrelay's role for --stale-slot-grace to apply");
                    self.reported_hidden = Some(pid);
                }
            }
            Verdict::Backend(pid) => {
                if self.reported_backend != Some(pid) {
                    tracing::warn!(slot = %slot, pid,
                        "the slot is held by a session that is not a walsender (pg_logical_slot_get_changes or similar); \
                         standing by until it lets go, never terminating it");
                    self.reported_backend = Some(pid);
                }
            }
            Verdict::Stale(pid, unchanged) => {
                let first = self.reported_stale != Some(pid);
                if first {
                    tracing::warn!(slot = %slot, pid, unchanged = ?unchanged,
                        "the slot is held by a process that has not replied for longer than --stale-slot-grace \
                         (its status in pg_stat_replication has not changed as this instance saw it){}",
                        if take_over { "; terminating it to take over" } else { "; start with --take-over-stale-slot to take over, or SELECT pg_terminate_backend(pid)" });
                    self.reported_stale = Some(pid);
                }
                if take_over {
                    let terminated = client
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await;
                    if let (Err(error), true) = (terminated, first) {
                        tracing::warn!(slot = %slot, pid, error = %error,
                            "cannot terminate the slot's holder: a role may only terminate its own sessions \
                             unless it has pg_signal_backend; run every instance as the same role");
                    }
                }
            }
        }
        Ok(())
    }

    /// Records a look at the holder taken at `now`.
    fn observe(&mut self, holder: Holder, now: Instant, grace: Duration) -> Verdict {
        let (pid, replies) = match holder {
            Holder::Nobody => {
                self.last = None;
                return Verdict::Alive;
            }
            Holder::Hidden(pid) => {
                self.last = None;
                return Verdict::Hidden(pid);
            }
            Holder::Backend(pid) => {
                self.last = None;
                return Verdict::Backend(pid);
            }
            Holder::Seen(pid, replies) => (pid, replies),
        };
        let since = match &self.last {
            Some((p, r, since)) if *p == pid && *r == replies => *since,
            _ => {
                self.last = Some((pid, replies, now));
                now
            }
        };
        let unchanged = now.saturating_duration_since(since);
        if unchanged >= grace {
            Verdict::Stale(pid, unchanged)
        } else {
            Verdict::Alive
        }
    }
}

/// The server a session reached does not continue the history walrelay
/// confirmed positions in: confirming anything there could skip its WAL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// `IDENTIFY_SYSTEM` names another cluster than the one this process
    /// streamed from.
    #[error(
        "the PostgreSQL server walrelay reconnected to is another cluster (system identifier {found}, not \
         {expected} as before): its WAL positions mean nothing for the one walrelay confirmed to. Stopping \
         instead of confirming anything there. If the database was moved or restored on purpose, check that \
         no event is missing, then restart walrelay: a new process starts from the slot as this server has it"
    )]
    OtherSystem {
        /// The system identifier seen first.
        expected: String,
        /// The one seen now.
        found: String,
    },
    /// The slot is confirmed past the end of the server's WAL.
    #[error(
        "replication slot {slot:?} is confirmed up to {confirmed}, past the end of the server's WAL \
         ({wal_end}): the slot comes from another history than this server's (a restored backup, or a \
         slot copied from another cluster). Stopping: streaming from it would skip what this server writes \
         up to {confirmed}. Drop the slot (SELECT pg_drop_replication_slot('{slot}')) and start walrelay \
         again to publish the table from a snapshot"
    )]
    SlotAhead {
        /// The slot.
        slot: String,
        /// Its confirmed position.
        confirmed: Lsn,
        /// The server's WAL end (`IDENTIFY_SYSTEM`'s xlogpos).
        wal_end: Lsn,
    },
    /// walrelay confirmed more, earlier in this process, than the server has.
    #[error(
        "the server's WAL ends at {wal_end}, behind {confirmed}, which walrelay already confirmed on the \
         server it streamed from before: a failover to a standby that lagged behind, or a restored backup. \
         Transactions committed on the old server after {wal_end} are not on this one. Stopping instead of \
         confirming {confirmed} here, which would skip what this server writes up to it. Check which \
         events the old server had, then restart walrelay: a new process resumes from the slot as this \
         server has it"
    )]
    ServerBehind {
        /// What this process confirmed before.
        confirmed: Lsn,
        /// The server's WAL end (`IDENTIFY_SYSTEM`'s xlogpos).
        wal_end: Lsn,
    },
}

/// Checks, at the start of a session and before any status update goes
/// out, that the server continues the history this process confirmed
/// positions in: the same cluster as before (`system_id`, remembered in
/// `seen` from the first session on), a slot confirmed no further than the
/// server's WAL end (`wal_end`, `IDENTIFY_SYSTEM`'s xlogpos), and nothing
/// confirmed by this process past that end either. Every status update of
/// the session then stays within the server's WAL: it reports what this
/// session received, or the slot's own position.
pub fn check_history(
    seen: &mut Option<String>,
    system_id: &str,
    slot: &str,
    slot_confirmed: Lsn,
    confirmed: Lsn,
    wal_end: Lsn,
) -> Result<(), HistoryError> {
    match seen {
        Some(expected) if expected != system_id => {
            return Err(HistoryError::OtherSystem {
                expected: expected.clone(),
                found: system_id.to_owned(),
            });
        }
        Some(_) => {}
        None => *seen = Some(system_id.to_owned()),
    }
    if slot_confirmed > wal_end {
        return Err(HistoryError::SlotAhead {
            slot: slot.to_owned(),
            confirmed: slot_confirmed,
            wal_end,
        });
    }
    if confirmed > wal_end {
        return Err(HistoryError::ServerBehind { confirmed, wal_end });
    }
    Ok(())
}

/// Whether `name` is a valid name for walrelay's slot: lower-case letters,
/// digits and underscores, at most 58 characters (PostgreSQL allows 63, and
/// the initial snapshot's marker slot adds `_init`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 58
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> SlotState {
        SlotState::example()
    }

    #[test]
    fn a_pgoutput_slot_of_this_database_is_fine() {
        assert_eq!(slot().problem("walrelay", "app"), None);
    }

    #[test]
    fn foreign_and_lost_slots_are_named_with_the_way_out() {
        let other_db = slot().problem("walrelay", "shop").unwrap();
        assert!(
            matches!(other_db, SlotProblem::Foreign { .. }),
            "{other_db}"
        );
        let wal2json = SlotState {
            plugin: Some("wal2json".into()),
            ..slot()
        };
        assert!(
            wal2json
                .problem("walrelay", "app")
                .unwrap()
                .to_string()
                .contains("wal2json")
        );
        let lost = SlotState {
            wal_status: Some("lost".into()),
            ..slot()
        };
        let text = lost.problem("walrelay", "app").unwrap().to_string();
        assert!(
            text.contains("0/100")
                && text.contains("pg_drop_replication_slot")
                && text.contains("max_slot_wal_keep_size"),
            "{text}"
        );
    }

    #[test]
    fn each_cause_of_an_invalidation_is_explained_with_its_own_fix() {
        let explain_at = |reason: Option<&str>, conflicting: Option<bool>, restart_lsn| {
            SlotState {
                wal_status: Some("lost".into()),
                invalidation_reason: reason.map(str::to_owned),
                conflicting,
                restart_lsn,
                ..slot()
            }
            .problem("walrelay", "app")
            .unwrap()
            .to_string()
        };
        let explain = |reason, conflicting| explain_at(reason, conflicting, Some(Lsn(0x80)));
        // PostgreSQL 14 and 15: WAL removal is the only cause, which clears
        // restart_lsn.
        assert!(explain_at(None, None, None).contains("max_slot_wal_keep_size"));
        // 16: conflicting is true for every cause; WAL removal clears
        // restart_lsn, a conflict with recovery keeps it.
        assert!(explain(None, Some(true)).contains("hot_standby_feedback"));
        assert!(explain_at(None, Some(true), None).contains("max_slot_wal_keep_size"));
        assert!(explain(None, Some(false)).contains("max_slot_wal_keep_size"));
        // 17 and 18 name it.
        for (reason, fix) in [
            ("wal_removed", "max_slot_wal_keep_size"),
            ("idle_timeout", "raise idle_replication_slot_timeout"),
            ("rows_removed", "hot_standby_feedback"),
            ("wal_level_insufficient", "wal_level = logical"),
            ("a_future_cause", "invalidation_reason = a_future_cause"),
        ] {
            let text = explain(Some(reason), Some(false));
            assert!(
                text.contains(&format!("invalidation_reason = {reason}"))
                    || reason == "wal_removed",
                "{text}"
            );
            assert!(text.contains(fix), "{reason}: {text}");
        }
        // A reason counts even where wal_status would not say lost.
        let reasoned = SlotState {
            invalidation_reason: Some("idle_timeout".into()),
            ..slot()
        };
        assert!(reasoned.problem("walrelay", "app").is_some());
    }

    fn seen(pid: i32, reply_time: &str, flush: &str) -> Holder {
        Holder::Seen(
            pid,
            Replies {
                reply_time: Some(reply_time.into()),
                write_lsn: Some(flush.into()),
                flush_lsn: Some(flush.into()),
            },
        )
    }

    #[test]
    fn a_holder_whose_replies_change_is_alive_whatever_its_clock_says() {
        let grace = Duration::from_secs(15);
        let start = Instant::now();
        let mut watch = HolderWatch::default();
        // Its clock is years behind, and its positions stand still (a broker
        // outage): every update still carries a new reply_time.
        for tick in 0..100u64 {
            let reply_time = format!("2001-01-01 00:00:{:02}+00", tick % 60);
            let verdict = watch.observe(
                seen(7, &reply_time, "0/100"),
                start + Duration::from_secs(10 * tick),
                grace,
            );
            assert_eq!(verdict, Verdict::Alive, "tick {tick}");
        }
    }

    #[test]
    fn a_holder_whose_replies_stand_still_is_stale_after_the_grace_on_our_clock() {
        let grace = Duration::from_secs(15);
        let start = Instant::now();
        let mut watch = HolderWatch::default();
        let frozen = || seen(7, "2030-01-01 00:00:00+00", "0/100");
        assert_eq!(watch.observe(frozen(), start, grace), Verdict::Alive);
        let at = |s| start + Duration::from_secs(s);
        assert_eq!(watch.observe(frozen(), at(14), grace), Verdict::Alive);
        assert_eq!(
            watch.observe(frozen(), at(15), grace),
            Verdict::Stale(7, Duration::from_secs(15))
        );
        // Another holder (a new PID) starts the count again.
        let other = || seen(8, "2030-01-01 00:00:00+00", "0/100");
        assert_eq!(watch.observe(other(), at(16), grace), Verdict::Alive);
        assert_eq!(watch.observe(other(), at(30), grace), Verdict::Alive);
        assert_eq!(
            watch.observe(other(), at(31), grace),
            Verdict::Stale(8, Duration::from_secs(15))
        );
    }

    #[test]
    fn a_holder_that_is_not_a_walsender_is_never_called_stale() {
        // A session decoding with pg_logical_slot_get_changes sends no
        // replies: their standing still says nothing about it.
        let grace = Duration::from_secs(15);
        let start = Instant::now();
        let mut watch = HolderWatch::default();
        for s in [0, 15, 60, 3600] {
            assert_eq!(
                watch.observe(Holder::Backend(9), start + Duration::from_secs(s), grace),
                Verdict::Backend(9)
            );
        }
    }

    #[test]
    fn the_grace_outlasts_a_busy_walsender() {
        let configured = Duration::from_secs(15);
        // 60 s: a busy walsender may leave the reply unchanged for 30 s and more.
        assert_eq!(holder_grace(configured, "1min"), Duration::from_secs(70));
        assert_eq!(holder_grace(configured, "5s"), Duration::from_secs(15));
        assert_eq!(
            holder_grace(Duration::from_secs(600), "1min"),
            Duration::from_secs(600)
        );
        // Disabled: the walsender reads every update as it comes.
        assert_eq!(holder_grace(configured, "0"), configured);
        // Unreadable: PostgreSQL's default is assumed.
        assert_eq!(holder_grace(configured, "?"), Duration::from_secs(70));
    }

    #[test]
    fn a_holder_this_role_cannot_see_is_never_called_stale() {
        let grace = Duration::from_secs(15);
        let start = Instant::now();
        let mut watch = HolderWatch::default();
        for s in [0, 60, 3600] {
            assert_eq!(
                watch.observe(Holder::Hidden(7), start + Duration::from_secs(s), grace),
                Verdict::Hidden(7)
            );
        }
        // Nobody holds it: nothing to watch, and the count starts afresh.
        assert_eq!(watch.observe(Holder::Nobody, start, grace), Verdict::Alive);
        assert!(watch.last.is_none());
    }

    #[test]
    fn a_session_confirms_only_within_the_history_of_the_server() {
        let mut seen = None;
        // The first session remembers the cluster.
        assert_eq!(
            check_history(&mut seen, "7001", "w", Lsn(0x100), Lsn(0x100), Lsn(0x200)),
            Ok(())
        );
        assert_eq!(seen.as_deref(), Some("7001"));
        // The same cluster, further on: fine.
        assert_eq!(
            check_history(&mut seen, "7001", "w", Lsn(0x180), Lsn(0x180), Lsn(0x300)),
            Ok(())
        );
        // Another cluster on the same address.
        assert!(matches!(
            check_history(&mut seen, "8002", "w", Lsn(0x100), Lsn(0x180), Lsn(0x300)),
            Err(HistoryError::OtherSystem { .. })
        ));
        assert_eq!(seen.as_deref(), Some("7001"));
        // A standby that lagged behind what this process confirmed.
        assert_eq!(
            check_history(&mut seen, "7001", "w", Lsn(0x100), Lsn(0x180), Lsn(0x150)),
            Err(HistoryError::ServerBehind {
                confirmed: Lsn(0x180),
                wal_end: Lsn(0x150)
            })
        );
        // A slot confirmed past the server's WAL.
        let mut fresh = None;
        assert!(matches!(
            check_history(&mut fresh, "7001", "w", Lsn(0x400), Lsn(0x400), Lsn(0x300)),
            Err(HistoryError::SlotAhead { .. })
        ));
    }

    #[test]
    fn slot_names_follow_postgres_rules() {
        assert!(valid_name("walrelay_1"));
        for bad in ["", "Walrelay", "wal-relay", "a b", &"x".repeat(59)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
