//! Failover: the slot that survives a promotion, the chain that keeps
//! walrelay from publishing what a promotion takes back, and following a
//! promotion from one primary to the next.
//!
//! ```text
//!  primary (timeline 1)                          standby
//!  walrelay's slot, FAILOVER true ──── slotsync worker (sync_replication_slots = on,
//!  synchronized_standby_slots = 'sb1'      hot_standby_feedback = on, primary_slot_name = 'sb1',
//!      ▲ the walsender decodes WAL only          dbname in primary_conninfo) keeps a copy:
//!      │ once slot sb1's standby flushed it      synced = true, sync-ready once temporary = false
//!      │
//!  walrelay ── after a promotion: all hosts again ──► new primary (timeline 2), same slot
//! ```
//!
//! PostgreSQL 17 makes a failover lose nothing and invent nothing, if the
//! whole chain is there:
//! - the slot is a failover slot (`CREATE_REPLICATION_SLOT ... (FAILOVER
//!   true)` or `ALTER_REPLICATION_SLOT ... (FAILOVER true)`), so a standby
//!   with `sync_replication_slots` keeps a copy of it, at most as far as the
//!   primary's and never past what the standby itself has received;
//! - `synchronized_standby_slots` on the primary names the standby's
//!   physical slot, so the walsender sends walrelay nothing (and no keepalive
//!   position) the standby has not flushed: whatever walrelay publishes and
//!   confirms survives the standby's promotion. Without it, walrelay may
//!   publish transactions the promoted standby never received: events the
//!   event store no longer has.
//!
//! After a promotion walrelay finds the slot on the new primary (a fresh
//! process by its name, a running one by trying every host again), checks
//! with `IDENTIFY_SYSTEM` that it is the same cluster on a newer timeline,
//! and with `TIMELINE_HISTORY` that everything it confirmed lies before the
//! point where the new timeline branched off ([`follow`]). The copy may be
//! behind the position walrelay confirmed on the old primary (it is synced
//! every 200 ms to 30 s): the transactions in between are published again,
//! duplicates that consumers drop by `seq_nr`.
//!
//! A slot that is missing on a promoted server is never recreated silently:
//! the timeline says the server was promoted (or restored), and walrelay
//! cannot tell a first start there from a slot a failover lost. It stops
//! and names the setup step the promoted server shows missing
//! ([`missing_steps`]); `--new-slot-on-timeline N` lets it create the slot
//! on timeline N (a later promotion makes that setting stale by itself).
use crate::check::Finding;
use crate::config::{FailoverSlot, RunConfig};
use crate::pg::conn::{SystemId, TimelineSwitch, major_version};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, Client, MetadataError};
use crate::slot;

/// The first PostgreSQL major with failover slots.
pub const FAILOVER_SLOTS_SINCE: u32 = 17;

/// A promotion walrelay follows: the cluster it streamed from is on a newer
/// timeline, which branched off after everything walrelay confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// The timeline walrelay streamed from.
    pub from: u32,
    /// The server's timeline now.
    pub to: u32,
    /// Where `from` ended on the way to `to`.
    pub switchpoint: Lsn,
}

/// A promotion walrelay cannot follow without skipping or inventing events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FollowError {
    /// walrelay confirmed past the point where the new timeline branched off.
    #[error(
        "PostgreSQL was promoted: timeline {from} ended at {switchpoint} and timeline {to} began \
         there, but walrelay had already published and confirmed up to {confirmed} on timeline \
         {from}. The events of the transactions between {switchpoint} and {confirmed} are in \
         Kafka but not on the promoted server (the standby never received them: the primary's \
         synchronized_standby_slots did not hold walrelay back until the standby had them). \
         walrelay stops rather than confirm that position on the new timeline, which would skip \
         its transactions. Find those events by their lsn header (> {switchpoint}) and have \
         consumers disregard them, set synchronized_standby_slots on the primary (see `walrelay \
         check`), then start walrelay again: it resumes from the slot on the new primary"
    )]
    Diverged {
        /// The old timeline.
        from: u32,
        /// The new timeline.
        to: u32,
        /// Where the old one ended.
        switchpoint: Lsn,
        /// What walrelay confirmed.
        confirmed: Lsn,
    },
    /// The server's history does not pass through walrelay's timeline.
    #[error(
        "the server is on timeline {to}, whose history does not include timeline {from} walrelay \
         streamed from: it branched off elsewhere (another standby promoted from an older point, \
         or a restore). walrelay cannot tell which of the events it published are on this \
         server; stop the server that should not be primary, or start walrelay again to resume \
         from the slot as this server has it"
    )]
    NotInHistory {
        /// walrelay's timeline.
        from: u32,
        /// The server's.
        to: u32,
    },
}

/// Whether walrelay, having streamed `streamed` and confirmed `confirmed`,
/// may resume on `now`, whose timeline history is `history`; `Ok(None)`
/// when the timeline is the same.
pub fn follow(
    streamed: &SystemId,
    now: &SystemId,
    history: &[TimelineSwitch],
    confirmed: Lsn,
) -> Result<Option<Switch>, FollowError> {
    if now.timeline <= streamed.timeline {
        return Ok(None);
    }
    let ended = history
        .iter()
        .find(|s| s.timeline == streamed.timeline)
        .ok_or(FollowError::NotInHistory {
            from: streamed.timeline,
            to: now.timeline,
        })?;
    // WAL before the switchpoint is the same on both timelines; a
    // confirmed position at it covers only that WAL.
    if confirmed > ended.switchpoint {
        return Err(FollowError::Diverged {
            from: streamed.timeline,
            to: now.timeline,
            switchpoint: ended.switchpoint,
            confirmed,
        });
    }
    Ok(Some(Switch {
        from: streamed.timeline,
        to: now.timeline,
        switchpoint: ended.switchpoint,
    }))
}

/// The names in a `synchronized_standby_slots` value (`sb1, "Sb2"`).
pub fn standby_slot_names(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(|name| name.trim().trim_matches('"').to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

/// A setting, or `None` where it does not exist or this role may not read it.
async fn setting(client: &Client, name: &str) -> Result<Option<String>, MetadataError> {
    let row = client
        .query_one(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_settings WHERE name = $1)
                         THEN current_setting($1) END",
            &[&name],
        )
        .await;
    match row {
        Ok(row) => Ok(row.get(0)),
        // 42501: a setting only superusers and pg_read_all_settings may read.
        Err(e) if e.sqlstate() == Some("42501") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The server's major version.
async fn major(client: &Client) -> Result<u32, MetadataError> {
    let version: String = client
        .query_one("SELECT current_setting('server_version')", &[])
        .await?
        .get(0);
    Ok(major_version(&version))
}

/// Whether a `primary_conninfo` names a database (key/value or URI form).
fn conninfo_has_dbname(conninfo: &str) -> bool {
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let rest = conninfo.split_once("://").map_or("", |(_, r)| r);
        let path = rest
            .split_once('/')
            .map_or("", |(_, p)| p.split('?').next().unwrap_or(""));
        return !path.is_empty() || conninfo.contains("dbname=");
    }
    conninfo.split_whitespace().any(|pair| {
        pair.split_once('=')
            .is_some_and(|(k, v)| k.trim() == "dbname" && !v.trim().trim_matches('\'').is_empty())
    })
}

/// The steps of the failover setup that a promoted server's own settings
/// show missing, for the error that a slot is missing on it: its settings
/// are still those it had as a standby.
pub async fn missing_steps(client: &Client, slot: &str) -> Result<Vec<String>, MetadataError> {
    let major = major(client).await?;
    if major < FAILOVER_SLOTS_SINCE {
        return Ok(vec![format!(
            "PostgreSQL {major} does not synchronize replication slots to standbys (PostgreSQL 17 \
             does): after every failover the slot is missing"
        )]);
    }
    let mut missing = Vec::new();
    for (name, want) in [
        ("sync_replication_slots", "on"),
        ("hot_standby_feedback", "on"),
    ] {
        if setting(client, name).await?.as_deref() != Some(want) {
            missing.push(format!(
                "{name} was not on on this server when it was a standby"
            ));
        }
    }
    if setting(client, "primary_slot_name")
        .await?
        .is_none_or(|s| s.is_empty())
    {
        missing.push("primary_slot_name was not set on this server when it was a standby".into());
    }
    match setting(client, "primary_conninfo").await? {
        Some(conninfo) if !conninfo_has_dbname(&conninfo) => missing.push(
            "primary_conninfo named no dbname on this server when it was a standby".into(),
        ),
        Some(_) => {}
        None => missing.push(
            "(primary_conninfo cannot be read without pg_read_all_settings: check that it names a dbname)"
                .into(),
        ),
    }
    if missing.is_empty() {
        missing.push(format!(
            "this server's slot synchronization settings look right: the slot {slot:?} was not a \
             failover slot (--failover-slot off, or PostgreSQL older than 17 when it was made), \
             the primary's synchronized_standby_slots did not name this server's primary_slot_name, \
             or the copy was not yet sync-ready (temporary) when the server was promoted"
        ));
    }
    Ok(missing)
}

/// The whole failover chain, for `check` and for `run` at start: the
/// primary's side, and with `--standby-url` the standby's.
pub async fn chain_findings(
    client: &Client,
    config: &RunConfig,
    slot_failover: Option<bool>,
) -> Result<Vec<Finding>, MetadataError> {
    let mut out = primary_findings(client, config, slot_failover).await?;
    if config.failover_slot != FailoverSlot::Off && major(client).await? >= FAILOVER_SLOTS_SINCE {
        let listed = standby_slot_names(
            &setting(client, "synchronized_standby_slots")
                .await?
                .unwrap_or_default(),
        );
        out.extend(standby_findings(config, &listed).await);
    }
    Ok(out)
}

/// The primary's side of the failover chain, for `check` and for `run` at
/// start. `slot_failover` is the slot's `failover` flag, `None` when the slot
/// does not exist yet.
pub async fn primary_findings(
    client: &Client,
    config: &RunConfig,
    slot_failover: Option<bool>,
) -> Result<Vec<Finding>, MetadataError> {
    const SUBJECT: &str = "failover";
    let mut out = Vec::new();
    if config.failover_slot == FailoverSlot::Off {
        out.push(Finding::ok(
            SUBJECT,
            "--failover-slot off: the slot is not kept on standbys; a failover loses it",
        ));
        return Ok(out);
    }
    let major = major(client).await?;
    if major < FAILOVER_SLOTS_SINCE {
        let found = format!(
            "PostgreSQL {major} cannot keep the slot on standbys (failover slots came with 17): \
             after a failover the slot is missing and walrelay stops (see the README)"
        );
        out.push(if config.failover_slot == FailoverSlot::Require {
            Finding::problem(
                SUBJECT,
                found,
                "upgrade to PostgreSQL 17, or --failover-slot auto",
            )
        } else {
            Finding::ok(SUBJECT, found)
        });
        return Ok(out);
    }
    out.push(match slot_failover {
        Some(true) => Finding::ok(
            SUBJECT,
            format!("slot {:?} is a failover slot", config.slot),
        ),
        Some(false) => Finding::problem(
            SUBJECT,
            format!(
                "slot {:?} is not a failover slot: standbys do not keep it",
                config.slot
            ),
            format!(
                "run walrelay with --failover-slot auto (it alters the slot at start), or \
                 ALTER_REPLICATION_SLOT {} (FAILOVER true) on a replication connection",
                config.slot
            ),
        ),
        None => Finding::ok(
            SUBJECT,
            format!("slot {:?} will be created as a failover slot", config.slot),
        ),
    });
    let listed = standby_slot_names(
        &setting(client, "synchronized_standby_slots")
            .await?
            .unwrap_or_default(),
    );
    let standbys: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'physical' AND active)
                  + (SELECT count(*) FROM pg_stat_replication r WHERE NOT EXISTS
                       (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid))",
            &[],
        )
        .await?
        .get(0);
    if listed.is_empty() {
        let found = "synchronized_standby_slots is empty: walrelay can publish transactions no \
                     standby has received yet, which a promoted standby does not have";
        let fix = "ALTER SYSTEM SET synchronized_standby_slots = '<the standby's primary_slot_name>'; \
                   SELECT pg_reload_conf();";
        out.push(
            if standbys == 0 && config.failover_slot == FailoverSlot::Auto {
                Finding::ok(
                    SUBJECT,
                    "no standby replicates from this server, so there is nothing to fail over to; \
                     when one is added, list its physical slot in synchronized_standby_slots",
                )
            } else {
                Finding::problem(SUBJECT, found, fix)
            },
        );
        return Ok(out);
    }
    let rows = client
        .query(
            "SELECT slot_name::text, slot_type, active, (pg_current_wal_lsn() - restart_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &[&listed],
        )
        .await?;
    for name in &listed {
        let row = rows.iter().find(|r| r.get::<_, String>(0) == *name);
        out.push(listed_slot_finding(name, row));
    }
    Ok(out)
}

/// One slot of `synchronized_standby_slots`, as `pg_replication_slots`
/// shows it (`name`, `slot_type`, `active`, bytes behind), if it exists.
fn listed_slot_finding(name: &str, row: Option<&tokio_postgres::Row>) -> Finding {
    const SUBJECT: &str = "failover";
    match row {
        None => Finding::problem(
            SUBJECT,
            format!(
                "synchronized_standby_slots lists {name:?}, which does not exist: the primary \
                 sends walrelay nothing until it does"
            ),
            format!(
                "SELECT pg_create_physical_replication_slot('{name}'), and set \
                 primary_slot_name = '{name}' on the standby; or remove it from the list"
            ),
        ),
        Some(row) if row.get::<_, String>(1) != "physical" => Finding::problem(
            SUBJECT,
            format!("synchronized_standby_slots lists {name:?}, which is not a physical slot"),
            "list the standbys' physical slots (their primary_slot_name) only",
        ),
        Some(row) if !row.get::<_, bool>(2) => Finding::problem(
            SUBJECT,
            format!(
                "standby slot {name:?} of synchronized_standby_slots is not active: no \
                 standby streams from it, and walrelay is held back until one catches up"
            ),
            format!(
                "start the standby whose primary_slot_name is {name:?} (or remove the slot \
                 from synchronized_standby_slots if that standby is gone for good)"
            ),
        ),
        Some(row) => Finding::ok(
            SUBJECT,
            format!(
                "standby slot {name:?} of synchronized_standby_slots is active ({} bytes behind)",
                row.get::<_, Option<i64>>(3)
                    .map_or_else(|| "?".to_owned(), |d| d.to_string())
            ),
        ),
    }
}

/// The standby's side of the failover chain, on every host of
/// `--standby-url`; `listed` is the primary's `synchronized_standby_slots`.
pub async fn standby_findings(config: &RunConfig, listed: &[String]) -> Vec<Finding> {
    const SUBJECT: &str = "standby";
    let Some(standby) = &config.standby else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for target in &standby.hosts {
        let params = standby.at(target);
        match metadata::connect(&params).await {
            Err(e) => out.push(Finding::problem(
                SUBJECT,
                format!("cannot connect to the standby at {target}: {e}"),
                "check --standby-url, the password and the standby's pg_hba.conf",
            )),
            Ok(client) => match one_standby(&client, config, listed, &target.to_string()).await {
                Ok(findings) => out.extend(findings),
                Err(e) => out.push(Finding::problem(
                    SUBJECT,
                    format!("a check query on the standby at {target} failed: {e}"),
                    "see the error",
                )),
            },
        }
    }
    out
}

async fn one_standby(
    client: &Client,
    config: &RunConfig,
    listed: &[String],
    target: &str,
) -> Result<Vec<Finding>, MetadataError> {
    const SUBJECT: &str = "standby";
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if !in_recovery {
        return Ok(vec![Finding::problem(
            SUBJECT,
            format!("{target} is not in recovery: it is not a standby"),
            "give --standby-url the standby's address",
        )]);
    }
    let mut out = Vec::new();
    let mut require = |name: &str, want: &str, found: Option<String>, why: &str| {
        let found_text = found.clone().unwrap_or_else(|| "unset".into());
        out.push(if found.as_deref() == Some(want) {
            Finding::ok(SUBJECT, format!("{target}: {name} = {want}"))
        } else {
            Finding::problem(
                SUBJECT,
                format!("{target}: {name} is {found_text}: {why}"),
                format!("on the standby: ALTER SYSTEM SET {name} = {want}; then SELECT pg_reload_conf() (restart for wal_level)"),
            )
        });
    };
    require(
        "sync_replication_slots",
        "on",
        setting(client, "sync_replication_slots").await?,
        "the standby keeps no copy of walrelay's slot, so a promotion loses it",
    );
    require(
        "hot_standby_feedback",
        "on",
        setting(client, "hot_standby_feedback").await?,
        "slot synchronization needs it (the primary would remove catalog rows the copy needs)",
    );
    require(
        "wal_level",
        "logical",
        setting(client, "wal_level").await?,
        "slot synchronization needs wal_level = logical on the standby too",
    );
    let slot_name = setting(client, "primary_slot_name")
        .await?
        .unwrap_or_default();
    out.push(if slot_name.is_empty() {
        Finding::problem(
            SUBJECT,
            format!("{target}: primary_slot_name is not set: slot synchronization needs it"),
            "create a physical slot on the primary and set primary_slot_name to it on the standby",
        )
    } else if !listed.contains(&slot_name) {
        Finding::problem(
            SUBJECT,
            format!(
                "{target}: its primary_slot_name {slot_name:?} is not in the primary's \
                 synchronized_standby_slots: walrelay may publish what this standby lacks"
            ),
            format!("on the primary: add '{slot_name}' to synchronized_standby_slots"),
        )
    } else {
        Finding::ok(
            SUBJECT,
            format!("{target}: primary_slot_name {slot_name:?} is in synchronized_standby_slots"),
        )
    });
    out.push(match setting(client, "primary_conninfo").await? {
        Some(conninfo) if conninfo_has_dbname(&conninfo) => {
            Finding::ok(SUBJECT, format!("{target}: primary_conninfo names a dbname"))
        }
        Some(_) => Finding::problem(
            SUBJECT,
            format!("{target}: primary_conninfo names no dbname: slot synchronization needs one"),
            "add dbname=<the events database> to primary_conninfo on the standby",
        ),
        None => Finding::problem(
            SUBJECT,
            format!("{target}: primary_conninfo cannot be read by this role, so its dbname is unchecked"),
            "GRANT pg_read_all_settings TO the role of --standby-url, or check by hand that primary_conninfo names a dbname",
        ),
    });
    out.push(own_standby_slots_finding(client, target, &slot_name).await?);
    out.push(synced_slot_finding(client, &config.slot, target).await?);
    Ok(out)
}

/// The standby's own `synchronized_standby_slots`, which takes effect when
/// it is promoted: a listed slot that does not exist there (physical slots
/// are not synchronized), or the standby's own `primary_slot_name` (a copy of
/// the primary's configuration), holds walrelay back on the new primary
/// until a standby streams from that slot or the setting is changed.
async fn own_standby_slots_finding(
    client: &Client,
    target: &str,
    own_slot: &str,
) -> Result<Finding, MetadataError> {
    const SUBJECT: &str = "standby";
    let listed = standby_slot_names(
        &setting(client, "synchronized_standby_slots")
            .await?
            .unwrap_or_default(),
    );
    let existing: Vec<String> = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let stale: Vec<&String> = listed
        .iter()
        .filter(|name| !existing.contains(name) || *name == own_slot)
        .collect();
    Ok(if stale.is_empty() {
        Finding::ok(
            SUBJECT,
            format!(
                "{target}: its own synchronized_standby_slots holds nothing back once it is promoted"
            ),
        )
    } else {
        Finding::problem(
            SUBJECT,
            format!(
                "{target}: its own synchronized_standby_slots lists {stale:?} (a copy of the \
                 primary's setting?), which no standby of it streams from (its own \
                 primary_slot_name, or a slot missing there: physical slots are not \
                 synchronized): once it is promoted, the new primary sends walrelay nothing \
                 until a standby streams from that slot or the setting is changed"
            ),
            "on the standby: ALTER SYSTEM SET synchronized_standby_slots = ''; SELECT pg_reload_conf(); \
             (it has no effect while it is a standby) and set it on the promoted server once its \
             own standbys stream from their slots",
        )
    })
}

/// Whether the standby holds a sync-ready copy of walrelay's slot.
async fn synced_slot_finding(
    client: &Client,
    slot: &str,
    target: &str,
) -> Result<Finding, MetadataError> {
    const SUBJECT: &str = "standby";
    Ok(match slot::failover_flags(client, slot).await? {
        Some(flags) if flags.synced && !flags.temporary => Finding::ok(
            SUBJECT,
            format!("{target}: slot {slot:?} is synchronized and sync-ready"),
        ),
        Some(flags) if flags.synced => Finding::problem(
            SUBJECT,
            format!(
                "{target}: slot {slot:?} is synchronized but not yet sync-ready (temporary): a \
                 promotion now would drop it"
            ),
            "wait until the standby's log says the slot is sync-ready (walrelay must have confirmed a position the standby has)",
        ),
        Some(_) => Finding::problem(
            SUBJECT,
            format!("{target}: slot {slot:?} exists on the standby but was not synchronized"),
            "drop that slot on the standby: synchronization will not overwrite it",
        ),
        None => Finding::problem(
            SUBJECT,
            format!("{target}: slot {slot:?} is not on the standby"),
            "make it a failover slot (walrelay does, with --failover-slot auto) and fix the standby settings above",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(timeline: u32) -> SystemId {
        SystemId {
            system_id: "7000".into(),
            timeline,
            xlog_pos: Lsn(0),
            dbname: None,
        }
    }

    fn history(entries: &[(u32, u64)]) -> Vec<TimelineSwitch> {
        entries
            .iter()
            .map(|&(timeline, at)| TimelineSwitch {
                timeline,
                switchpoint: Lsn(at),
            })
            .collect()
    }

    #[test]
    fn a_promotion_after_everything_confirmed_is_followed() {
        let h = history(&[(1, 0x5000)]);
        assert_eq!(follow(&id(1), &id(1), &h, Lsn(0x9000)), Ok(None));
        assert_eq!(
            follow(&id(1), &id(2), &h, Lsn(0x5000)),
            Ok(Some(Switch {
                from: 1,
                to: 2,
                switchpoint: Lsn(0x5000)
            }))
        );
        // Two promotions while walrelay was away: timeline 1 ended at 0x5000.
        let h = history(&[(1, 0x5000), (2, 0x8000)]);
        assert_eq!(
            follow(&id(1), &id(3), &h, Lsn(0x4000))
                .unwrap()
                .unwrap()
                .switchpoint,
            Lsn(0x5000)
        );
    }

    #[test]
    fn a_confirmed_position_past_the_branch_point_is_refused() {
        let h = history(&[(1, 0x5000)]);
        let err = follow(&id(1), &id(2), &h, Lsn(0x5001)).unwrap_err();
        assert!(
            matches!(
                err,
                FollowError::Diverged {
                    confirmed: Lsn(0x5001),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("synchronized_standby_slots"),
            "{err}"
        );
        // A timeline that branched off elsewhere.
        let h = history(&[(2, 0x5000)]);
        assert!(matches!(
            follow(&id(3), &id(4), &h, Lsn(1)),
            Err(FollowError::NotInHistory { from: 3, to: 4 })
        ));
    }

    #[test]
    fn settings_parse() {
        assert_eq!(standby_slot_names(" sb1, \"sb2\" ,,"), ["sb1", "sb2"]);
        assert!(standby_slot_names("").is_empty());
        assert!(conninfo_has_dbname("host=p port=5432 user=r dbname=app"));
        assert!(conninfo_has_dbname("host=p dbname='app'"));
        assert!(!conninfo_has_dbname("host=p port=5432 user=r"));
        assert!(conninfo_has_dbname(
            "postgres://r@p:5432/app?sslmode=require"
        ));
        assert!(!conninfo_has_dbname("postgres://r@p:5432"));
        assert!(conninfo_has_dbname("postgresql://r@p?dbname=app"));
    }
}
