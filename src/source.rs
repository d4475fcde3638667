//! The source: the committed inserts of the events table, in commit order,
//! from the messages of a replication stream.
//!
//! pgoutput (proto 1, no streaming) sends each transaction whole, at its
//! commit: `Begin`, then a `Relation` for every table whose description the
//! session has not seen (or that changed), then the changes, then `Commit`.
//! Nothing of an aborted transaction is ever sent. [`Source`] tracks the
//! events table's Relation, turns its Inserts into [`Event`]s, reports
//! anything else done to it, and says when a transaction ends or when the
//! server reports progress outside any transaction.
//!
//! The table is known by its name (`--table`) and, for the session, by the
//! OID that name had when the session began ([`TableAnchor`]). A Relation
//! message carries the name the table had when the transaction committed
//! (decoding reads the catalog as of then), so both matter: in a
//! transaction committed before the anchor's position, a Relation with the
//! anchored OID or with the name is the events table, whatever the other
//! says (it was renamed since, or replaced and its successor took the name).
//! In one committed after it, the table must still have both: the anchored
//! OID under another name means it was renamed, the name on another OID
//! that another table took it. Either is an error naming both names, never
//! a silent stop: followed by name alone, a renamed table's rows would be
//! skipped; followed by OID alone, the events of a table that took over the
//! name would be.
use std::collections::HashMap;

use bytes::Bytes;

use crate::event::{Event, EventLayout, LayoutError, Mapping, RowError, TableName, Transaction};
use crate::pg::conn::{self, ConnError, ReplicationConnection};
use crate::pg::lsn::Lsn;
use crate::pg::pgoutput::{ColumnValue, DecodeError, Message, Relation, TupleData};
use crate::pg::protocol::ReplicationMessage;

/// What one replication message means for the events table.
#[derive(Debug)]
pub enum Step {
    /// Nothing to act on.
    Nothing,
    /// A transaction began.
    Begin {
        /// Its commit LSN.
        commit_lsn: Lsn,
        /// Its commit time, microseconds since 2000-01-01 UTC.
        commit_ts: i64,
    },
    /// A row was inserted into the events table.
    Event(Event),
    /// A transaction ended; once its events are delivered, `end_lsn` may be confirmed.
    Commit {
        /// The start of its commit record.
        commit_lsn: Lsn,
        /// The end of its commit record: the position to confirm.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_ts: i64,
    },
    /// Something other than an insert happened to the events table.
    Unexpected(UnexpectedChange),
    /// The server's WAL end, outside any transaction: every transaction that
    /// committed before it has been received.
    Idle {
        /// The keepalive's WAL end.
        wal_end: Lsn,
    },
    /// The server sent data up to here (informational).
    Received {
        /// The XLogData's WAL end.
        wal_end: Lsn,
    },
}

/// An UPDATE, DELETE or TRUNCATE of the append-only events table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnexpectedChange {
    /// `update`, `delete` or `truncate` (the metric label).
    pub kind: &'static str,
    /// The commit LSN of the transaction that made it.
    pub commit_lsn: Lsn,
}

/// A stream the source cannot follow.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A pgoutput message that does not decode.
    #[error("cannot decode a pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    /// The events table lost a required column.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A change arrived outside Begin/Commit, or for a table never described.
    #[error("pgoutput stream out of order: {0}")]
    Order(&'static str),
    /// The events table does not exist when a session begins.
    #[error(
        "the events table {0} does not exist (renamed or dropped?); walrelay streams the table \
         --table names: give it back its name, or point --table at it"
    )]
    TableMissing(TableName),
    /// The events table was renamed (or moved to another schema) while streaming.
    #[error(
        "the events table {table} (OID {oid}) is named {renamed} in the transaction committed at \
         {commit_lsn}: it was renamed while walrelay streamed it. walrelay stops here rather than \
         skip its rows (nothing from this transaction on is confirmed). Either give it back its \
         name (ALTER TABLE {renamed} RENAME TO ... / SET SCHEMA ...) or, if the new name is to \
         stay, restart with --table {renamed}; either way walrelay then publishes every row it \
         holds, under both names"
    )]
    Renamed {
        /// `--table`.
        table: TableName,
        /// The table's OID.
        oid: u32,
        /// Its new `schema.name`.
        renamed: String,
        /// The transaction that shows the new name.
        commit_lsn: Lsn,
    },
    /// Another table took the events table's name while streaming.
    #[error(
        "another table (OID {other}) is named {table} in the transaction committed at \
         {commit_lsn}, but the events table walrelay streams is OID {oid}: the table was replaced \
         or renamed and another one given its name. walrelay stops here rather than guess which \
         one holds the events (nothing from this transaction on is confirmed). If the new table \
         is the events table from now on, restart walrelay: it streams the table --table names \
         when it starts (rows written to OID {oid} after it lost the name are then not \
         published; copy them over first); otherwise give the name back to OID {oid}"
    )]
    Replaced {
        /// `--table`.
        table: TableName,
        /// The OID walrelay streams.
        oid: u32,
        /// The OID that now has the name.
        other: u32,
        /// The transaction that shows it.
        commit_lsn: Lsn,
    },
    /// A row that cannot become an event.
    #[error(
        "row of aggregate {aggregate:?} seq_nr {seq_nr} in the transaction committed at {commit_lsn} cannot be published: {reason}"
    )]
    Row {
        /// The key column's text, if any.
        aggregate: Option<String>,
        /// The sequence column's text, or `?`.
        seq_nr: String,
        /// The transaction.
        commit_lsn: Lsn,
        /// Why.
        #[source]
        reason: RowError,
    },
}

/// The events table as the catalog has it when a session begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableAnchor {
    /// The OID `--table` names.
    pub oid: u32,
    /// A WAL position after every transaction the catalog reading reflects:
    /// transactions committed from here on are decoded with what came after.
    pub as_of: Lsn,
}

/// Reads the OID of `table` and the WAL insert position, on the replication
/// connection before streaming starts; `None` when the table does not exist.
/// The catalog is read first, in the statement's snapshot, so every rename
/// it reflects committed before the position read after it.
pub async fn anchor(
    repl: &mut ReplicationConnection,
    table: &TableName,
) -> Result<Option<TableAnchor>, ConnError> {
    let qualified = format!(
        "{}.{}",
        conn::quote_ident(&table.schema),
        conn::quote_ident(&table.name)
    );
    let rows = repl
        .simple_query(&format!(
            "SELECT to_regclass({})::oid, pg_current_wal_insert_lsn()",
            conn::quote_literal(&qualified)
        ))
        .await?;
    let bad = || ConnError::Protocol("the events table's OID query returned no row".into());
    let row = rows.into_iter().next().ok_or_else(bad)?;
    let (Some(oid), Some(as_of)) = (
        row.first().cloned().flatten(),
        row.get(1).cloned().flatten().and_then(|t| t.parse().ok()),
    ) else {
        return Ok(None);
    };
    let oid = oid
        .parse()
        .map_err(|_| ConnError::Protocol(format!("the events table's OID {oid:?}")))?;
    Ok(Some(TableAnchor { oid, as_of }))
}

/// The pgoutput options of a session with a server whose `server_version`
/// is `server_version`, publishing `publication`.
///
/// - `proto_version 1`: no streaming of transactions in progress, so nothing
///   uncommitted ever arrives.
/// - `origin 'any'` from PostgreSQL 16 on (older servers reject the option,
///   and always send everything). `'none'` would leave out every
///   transaction replayed from a replication origin: an events table fed
///   by a logical replication subscription (a migration, a consolidated
///   store) or by a tool that sets a session origin would then lose those
///   events silently. `'any'` is also the server's default; saying it keeps
///   a changed default from ever doing that.
pub fn pgoutput_options(server_version: &str, publication: &str) -> Vec<(&'static str, String)> {
    let mut options = vec![
        ("proto_version", "1".to_owned()),
        ("publication_names", conn::quote_ident(publication)),
    ];
    if server_major(server_version).is_some_and(|major| major >= 16) {
        options.push(("origin", "any".to_owned()));
    }
    options
}

/// The major version of a `server_version` such as `16.4 (Debian
/// 16.4-1.pgdg120+1)`, `17beta1` or `9.6.24`.
pub fn server_major(server_version: &str) -> Option<u32> {
    let digits = server_version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(server_version.len());
    server_version[..digits].parse().ok()
}

/// Follows one replication session's messages for one table.
#[derive(Debug)]
pub struct Source {
    table: TableName,
    mapping: Mapping,
    anchor: TableAnchor,
    /// The layout of each relation that is the events table, by OID: one,
    /// unless transactions from before a replacement are replayed.
    layouts: HashMap<u32, Described>,
    txn: Option<Transaction>,
}

/// A relation taken for the events table, as its last Relation message
/// described it.
#[derive(Debug)]
struct Described {
    layout: EventLayout,
    /// Its `schema.name` then.
    name: String,
    /// It had `--table`'s name.
    named: bool,
    /// It is the anchored OID.
    anchored: bool,
}

impl Source {
    /// A source for `table`, its rows mapped by `mapping`, with the table
    /// as `anchor` found it.
    pub fn new(table: TableName, mapping: Mapping, anchor: TableAnchor) -> Self {
        Source {
            table,
            mapping,
            anchor,
            layouts: HashMap::new(),
            txn: None,
        }
    }

    /// Whether a transaction has begun and not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Interprets one replication message.
    pub fn step(&mut self, message: ReplicationMessage) -> Result<Step, SourceError> {
        match message {
            ReplicationMessage::PrimaryKeepalive { wal_end, .. } => Ok(if self.txn.is_none() {
                Step::Idle { wal_end }
            } else {
                Step::Received { wal_end }
            }),
            ReplicationMessage::XLogData { data, .. } => self.decode(data),
        }
    }

    fn decode(&mut self, data: Bytes) -> Result<Step, SourceError> {
        self.apply(Message::parse(data)?)
    }

    /// Takes a Relation message: a description of the events table, the
    /// sign of a rename or a replacement, or another table's. A table that
    /// was the events table and no longer qualifies (it lost the name before
    /// the anchor, replayed after a restart) is forgotten: its later rows are
    /// another table's.
    fn relation(&mut self, relation: &Relation) -> Result<(), SourceError> {
        let named = self.table.matches(relation);
        let anchored = relation.oid == self.anchor.oid;
        if !named && !anchored {
            self.layouts.remove(&relation.oid);
            return Ok(());
        }
        let name = format!("{}.{}", relation.schema(), relation.name);
        let commit_lsn = self.txn.as_ref().map_or(Lsn(u64::MAX), |t| t.commit_lsn);
        self.check_current(relation.oid, &name, named, anchored, commit_lsn)?;
        let layout = EventLayout::new(relation, &self.mapping)?;
        self.layouts.insert(
            relation.oid,
            Described {
                layout,
                name,
                named,
                anchored,
            },
        );
        Ok(())
    }

    /// Whether relation `oid`, known as `name`, named and anchored as said,
    /// is the events table for a transaction committed at `commit_lsn`:
    /// before the anchor, either says so; from the anchor on, it must be
    /// both, or the table was renamed or replaced.
    fn check_current(
        &self,
        oid: u32,
        name: &str,
        named: bool,
        anchored: bool,
        commit_lsn: Lsn,
    ) -> Result<(), SourceError> {
        if commit_lsn < self.anchor.as_of || (named && anchored) {
            return Ok(());
        }
        Err(if anchored {
            SourceError::Renamed {
                table: self.table.clone(),
                oid,
                renamed: name.to_owned(),
                commit_lsn,
            }
        } else {
            SourceError::Replaced {
                table: self.table.clone(),
                oid: self.anchor.oid,
                other: oid,
                commit_lsn,
            }
        })
    }

    fn apply(&mut self, message: Message) -> Result<Step, SourceError> {
        Ok(match message {
            Message::Begin(begin) => {
                self.txn = Some(Transaction::new(begin.final_lsn, begin.commit_ts));
                Step::Begin {
                    commit_lsn: begin.final_lsn,
                    commit_ts: begin.commit_ts,
                }
            }
            Message::Commit(commit) => {
                if self.txn.take().is_none() {
                    return Err(SourceError::Order("Commit without Begin"));
                }
                Step::Commit {
                    commit_lsn: commit.commit_lsn,
                    end_lsn: commit.end_lsn,
                    commit_ts: commit.commit_ts,
                }
            }
            Message::Relation(relation) => {
                self.relation(&relation)?;
                Step::Nothing
            }
            Message::Insert(insert) => match self.layouts.get(&insert.relation_oid) {
                Some(described) => {
                    let txn = self
                        .txn
                        .as_ref()
                        .ok_or(SourceError::Order("Insert outside a transaction"))?;
                    // Described before the anchor as only one of the two:
                    // from the anchor on, that is no longer the events table.
                    self.check_current(
                        insert.relation_oid,
                        &described.name,
                        described.named,
                        described.anchored,
                        txn.commit_lsn,
                    )?;
                    let layout = &described.layout;
                    layout
                        .event(txn, &insert.new)
                        .map(Step::Event)
                        .map_err(|reason| row_error(layout, &insert.new, txn.commit_lsn, reason))?
                }
                None => Step::Nothing,
            },
            Message::Update(u) => self.unexpected(u.relation_oid, "update"),
            Message::Delete(d) => self.unexpected(d.relation_oid, "delete"),
            Message::Truncate(t) => t
                .relation_oids
                .iter()
                .map(|oid| self.unexpected(*oid, "truncate"))
                .find(|step| matches!(step, Step::Unexpected(_)))
                .unwrap_or(Step::Nothing),
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => Step::Nothing,
        })
    }

    fn unexpected(&self, relation_oid: u32, kind: &'static str) -> Step {
        match &self.txn {
            Some(txn) if self.layouts.contains_key(&relation_oid) => {
                Step::Unexpected(UnexpectedChange {
                    kind,
                    commit_lsn: txn.commit_lsn,
                })
            }
            _ => Step::Nothing,
        }
    }
}

/// Names the row that could not become an event by its key and sequence.
pub fn row_error(
    layout: &EventLayout,
    row: &TupleData,
    commit_lsn: Lsn,
    reason: RowError,
) -> SourceError {
    let text = |i: Option<usize>| match i.and_then(|i| row.get(i)) {
        Some(ColumnValue::Text(b) | ColumnValue::Binary(b)) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    };
    SourceError::Row {
        aggregate: text(Some(layout.key_index())),
        seq_nr: text(layout.seq_index()).unwrap_or_else(|| "?".to_owned()),
        commit_lsn,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_any_is_asked_of_postgresql_16_and_later_only() {
        let origin = |version: &str| {
            pgoutput_options(version, "pub")
                .into_iter()
                .find(|(name, _)| *name == "origin")
                .map(|(_, value)| value)
        };
        assert_eq!(origin("14.23"), None);
        assert_eq!(origin("15.18 (Debian 15.18-0+deb12u1)"), None);
        assert_eq!(origin("16.14").as_deref(), Some("any"));
        assert_eq!(origin("17beta1").as_deref(), Some("any"));
        assert_eq!(origin("18.4").as_deref(), Some("any"));
        assert_eq!(server_major("9.6.24"), Some(9));
        assert_eq!(server_major(""), None);
        assert_eq!(
            pgoutput_options("16.1", "walrelay_events")[..2],
            [
                ("proto_version", "1".to_owned()),
                ("publication_names", "\"walrelay_events\"".to_owned())
            ]
        );
    }
    use crate::pg::pgoutput::{Begin, Column, Commit, Insert, ReplicaIdentity};

    /// The events table is OID 100, named public.events as of 0/1000.
    const ANCHOR: TableAnchor = TableAnchor {
        oid: 100,
        as_of: Lsn(0x1000),
    };

    fn source() -> Source {
        let no_seq = crate::event::Columns {
            seq: None,
            ..crate::event::Columns::default()
        };
        Source::new(
            "public.events".parse().unwrap(),
            Mapping::new(no_seq, "events".parse().unwrap()),
            ANCHOR,
        )
    }

    fn relation(oid: u32, schema: &str, name: &str) -> Message {
        let column = |name: &str, type_oid| Column {
            flags: 0,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            oid,
            namespace: schema.into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![column("aggregate_id", 25), column("payload", 3802)],
        })
    }

    fn insert(oid: u32, key: &str) -> Message {
        Message::Insert(Insert {
            relation_oid: oid,
            new: vec![
                ColumnValue::Text(Bytes::copy_from_slice(key.as_bytes())),
                ColumnValue::Text(Bytes::from_static(b"{}")),
            ],
        })
    }

    /// Runs one transaction committed at `commit_lsn`; returns the keys of
    /// its events, or the first error.
    fn transaction(
        source: &mut Source,
        commit_lsn: u64,
        messages: Vec<Message>,
    ) -> Result<Vec<String>, SourceError> {
        let begin = Begin {
            final_lsn: Lsn(commit_lsn),
            commit_ts: 0,
            xid: 1,
        };
        source.apply(Message::Begin(begin))?;
        let mut keys = Vec::new();
        for message in messages {
            if let Step::Event(event) = source.apply(message)? {
                keys.push(String::from_utf8_lossy(&event.key).into_owned());
            }
        }
        let commit = Commit {
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 0x30),
            commit_ts: 0,
        };
        source.apply(Message::Commit(commit))?;
        Ok(keys)
    }

    #[test]
    fn the_table_named_and_anchored_is_published_and_others_are_not() {
        let mut s = source();
        let keys = transaction(
            &mut s,
            0x2000,
            vec![
                relation(100, "public", "events"),
                relation(200, "public", "other"),
                insert(100, "a"),
                insert(200, "x"),
                insert(100, "b"),
            ],
        )
        .unwrap();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn a_rename_while_streaming_stops_naming_both_names() {
        let mut s = source();
        transaction(
            &mut s,
            0x2000,
            vec![relation(100, "public", "events"), insert(100, "a")],
        )
        .unwrap();
        let err = transaction(
            &mut s,
            0x3000,
            vec![relation(100, "public", "events_v2"), insert(100, "b")],
        )
        .unwrap_err();
        assert!(
            matches!(&err, SourceError::Renamed { oid: 100, renamed, commit_lsn: Lsn(0x3000), .. }
                if renamed == "public.events_v2"),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("public.events (OID 100) is named public.events_v2")
                && text.contains("--table public.events_v2"),
            "{text}"
        );
        // Moving it to another schema is a rename too, also as the first
        // Relation of a session.
        let err = transaction(
            &mut source(),
            0x3000,
            vec![relation(100, "archive", "events"), insert(100, "b")],
        )
        .unwrap_err();
        assert!(err.to_string().contains("is named archive.events"), "{err}");
    }

    #[test]
    fn another_table_taking_the_name_while_streaming_stops_naming_both() {
        let mut s = source();
        let err = transaction(
            &mut s,
            0x3000,
            vec![relation(300, "public", "events"), insert(300, "new")],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::Replaced {
                    oid: 100,
                    other: 300,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("another table (OID 300) is named public.events"),
            "{err}"
        );
    }

    #[test]
    fn names_from_before_the_anchor_are_history_and_both_tables_publish() {
        // Replayed from before the session began: the table was called
        // events_old then and has been renamed to events since, and another
        // table, OID 300, was called events then.
        let mut s = source();
        let keys = transaction(
            &mut s,
            0x800,
            vec![
                relation(100, "public", "events_old"),
                relation(300, "public", "events"),
                insert(100, "renamed since"),
                insert(300, "had the name then"),
            ],
        )
        .unwrap();
        assert_eq!(keys, ["renamed since", "had the name then"]);
        // From the anchor on, only OID 100 under the name is the events table.
        let keys = transaction(
            &mut s,
            0x2000,
            vec![relation(100, "public", "events"), insert(100, "now")],
        )
        .unwrap();
        assert_eq!(keys, ["now"]);
        // OID 300 lost the name before the anchor; a row of it committed
        // after the anchor, undescribed since, is not taken for an event.
        let err = transaction(&mut s, 0x2100, vec![insert(300, "x")]).unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::Replaced {
                    oid: 100,
                    other: 300,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_table_that_lost_the_name_while_walrelay_was_down_is_no_longer_published() {
        // While walrelay was down: ALTER TABLE events RENAME TO events_old;
        // CREATE TABLE events (OID 300); writers kept inserting into
        // events_old (OID 100). The session anchors OID 300 and replays
        // from before the rename.
        let mut s = Source::new(
            "public.events".parse().unwrap(),
            Mapping::new(
                crate::event::Columns {
                    seq: None,
                    ..crate::event::Columns::default()
                },
                "events".parse().unwrap(),
            ),
            TableAnchor {
                oid: 300,
                as_of: Lsn(0x5000),
            },
        );
        let keys = transaction(
            &mut s,
            0x1000,
            vec![relation(100, "public", "events"), insert(100, "before")],
        )
        .unwrap();
        assert_eq!(keys, ["before"], "it was the events table then");
        // The rename and the new table: DDL, decoded to nothing.
        transaction(&mut s, 0x2000, vec![]).unwrap();
        let keys = transaction(
            &mut s,
            0x3000,
            vec![relation(100, "public", "events_old"), insert(100, "old 1")],
        )
        .unwrap();
        assert!(keys.is_empty(), "published a row of events_old: {keys:?}");
        let keys = transaction(&mut s, 0x4000, vec![insert(100, "old 2")]).unwrap();
        assert!(keys.is_empty(), "published a row of events_old: {keys:?}");
        let keys = transaction(
            &mut s,
            0x6000,
            vec![
                insert(100, "old 3"),
                relation(300, "public", "events"),
                insert(300, "new"),
            ],
        )
        .unwrap();
        assert_eq!(keys, ["new"]);
    }
}
