//! The service's replication slot: its state as `pg_replication_slots` shows
//! it, and what walrelay does about each state.
//!
//! The slot's `confirmed_flush_lsn` is walrelay's only durable position. A
//! slot that is missing after walrelay used it, or invalidated because it held
//! more WAL than `max_slot_wal_keep_size`, means the events between its last
//! confirmation and now may never reach Kafka; walrelay then refuses to start
//! rather than silently begin again from "now".
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
    /// `reserved`, `extended`, `unreserved` or `lost` (NULL before PostgreSQL 13).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is lost (NULL: unlimited).
    pub safe_wal_size: Option<i64>,
    /// Whether it is a temporary slot.
    pub temporary: bool,
}

/// Reads the state of slot `name`, or `None` when it does not exist.
pub async fn inspect(
    client: &crate::pg::metadata::Client,
    name: &str,
) -> Result<Option<SlotState>, MetadataError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid,
                    confirmed_flush_lsn::text, wal_status, safe_wal_size, temporary
               FROM pg_replication_slots WHERE slot_name = $1",
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
    /// Invalidated: it lost WAL.
    #[error(
        "replication slot {name:?} is invalidated (wal_status = lost): PostgreSQL removed WAL it still needed, \
         so the events committed after {confirmed} may never have been published. walrelay will not recreate it \
         silently. Recover: publish the missing events from the table (SELECT ... FROM events WHERE recorded_at > \
         the time of that LSN), then drop the slot (SELECT pg_drop_replication_slot('{name}')) and start walrelay \
         again; raise max_slot_wal_keep_size to prevent a repeat"
    )]
    Lost {
        /// The slot.
        name: String,
        /// Its last confirmed position.
        confirmed: String,
    },
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
        if self.wal_status.as_deref() == Some("lost") {
            return Some(SlotProblem::Lost {
                name: name.to_owned(),
                confirmed: self
                    .confirmed_flush_lsn
                    .map_or_else(|| "its last confirmation".to_owned(), |l| l.to_string()),
            });
        }
        None
    }
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
        SlotState {
            plugin: Some("pgoutput".into()),
            slot_type: "logical".into(),
            database: Some("app".into()),
            active: false,
            active_pid: None,
            confirmed_flush_lsn: Some(Lsn(0x100)),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            temporary: false,
        }
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
            text.contains("0/100") && text.contains("pg_drop_replication_slot"),
            "{text}"
        );
    }

    #[test]
    fn slot_names_follow_postgres_rules() {
        assert!(valid_name("walrelay_1"));
        for bad in ["", "Walrelay", "wal-relay", "a b", &"x".repeat(59)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
