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
use bytes::Bytes;

use crate::event::{
    Event, EventLayout, LayoutError, RowError, SEQ_NR_COLUMN, TableName, TopicTemplate, Transaction,
};
use crate::pg::lsn::Lsn;
use crate::pg::pgoutput::{ColumnValue, DecodeError, Message, TupleData};
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
    /// A row that cannot become an event.
    #[error(
        "row of aggregate {aggregate:?} seq_nr {seq_nr} in the transaction committed at {commit_lsn} cannot be published: {reason}"
    )]
    Row {
        /// The key column's text, if any.
        aggregate: Option<String>,
        /// The seq_nr column's text, or `?`.
        seq_nr: String,
        /// The transaction.
        commit_lsn: Lsn,
        /// Why.
        #[source]
        reason: RowError,
    },
}

/// Follows one replication session's messages for one table.
#[derive(Debug)]
pub struct Source {
    table: TableName,
    topic: TopicTemplate,
    layout: Option<EventLayout>,
    txn: Option<Transaction>,
}

impl Source {
    /// A source for `table`, publishing to `topic`.
    pub fn new(table: TableName, topic: TopicTemplate) -> Self {
        Source {
            table,
            topic,
            layout: None,
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
        Ok(match Message::parse(data)? {
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
                if self.table.matches(&relation) {
                    self.layout = Some(EventLayout::new(&relation, &self.topic)?);
                }
                Step::Nothing
            }
            Message::Insert(insert) => match &self.layout {
                Some(layout) if layout.relation_oid() == insert.relation_oid => {
                    let txn = self
                        .txn
                        .as_ref()
                        .ok_or(SourceError::Order("Insert outside a transaction"))?;
                    layout
                        .event(txn, &insert.new)
                        .map(Step::Event)
                        .map_err(|reason| row_error(layout, &insert.new, txn.commit_lsn, reason))?
                }
                _ => Step::Nothing,
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
        match (&self.layout, &self.txn) {
            (Some(layout), Some(txn)) if layout.relation_oid() == relation_oid => {
                Step::Unexpected(UnexpectedChange {
                    kind,
                    commit_lsn: txn.commit_lsn,
                })
            }
            _ => Step::Nothing,
        }
    }
}

/// Names the row that could not become an event by its key and seq_nr.
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
        seq_nr: text(layout.column_index(SEQ_NR_COLUMN)).unwrap_or_else(|| "?".to_owned()),
        commit_lsn,
        reason,
    }
}
