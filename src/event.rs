//! From a decoded Insert and its Relation to the record walrelay publishes.
//!
//! The message contract (DESIGN.md; README, "Message contract") over the
//! columns the flags name ([`Columns`]): the key column's text is the Kafka
//! key, the payload column's value the Kafka value, every other non-NULL
//! column a header by its name (or the name `--header-name` gives it), plus
//! `lsn` (the transaction's commit LSN, `X/Y`) and `commit_ts` (the commit
//! time, RFC 3339 UTC). Columns are found by name in the latest Relation
//! message, so adding, dropping or reordering columns while streaming needs
//! nothing but that message; losing a column the mapping needs is an error
//! naming it.
//!
//! Values are the text PostgreSQL's output functions produce, in the session
//! settings the replication connection pins (UTF-8, ISO dates, UTC), kept as
//! slices of the received buffer. The payload is the exception: what the
//! table holds, published as is. A `bytea` payload arrives as its text form
//! (`\x` and hexadecimal digits, or the escape form under
//! `bytea_output = escape`) and is decoded to its bytes; `json`, `jsonb` and
//! text types are published as their UTF-8 text. JSON is checked only with
//! `--payload-format json`.
//!
//! Adding a header: every header is built in [`EventLayout::event`], from
//! two lists. A header computed once per transaction (a constant, the commit
//! LSN or time) goes into [`Transaction::new`]'s list; one computed from the
//! row goes after the column headers in [`EventLayout::event`], where the
//! row's cells, key and payload are at hand. Name it in README's message
//! contract, and add it to [`RESERVED_HEADERS`] so that no `--header-name`
//! can produce it too.
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

pub use crate::cloudevents::CloudEvents;
use crate::cloudevents::{self as ce};
use crate::pg::lsn::Lsn;
use crate::pg::pgoutput::{ColumnValue, Relation, TupleData, pg_timestamp_to_system_time};
use crate::trace_context::{self, TRACEPARENT, TRACESTATE};

/// The `--key-column` unless told otherwise: its text is the Kafka key.
pub const DEFAULT_KEY_COLUMN: &str = "aggregate_id";
/// The `--seq-column` unless told otherwise: the per-aggregate sequence.
pub const DEFAULT_SEQ_COLUMN: &str = "seq_nr";
/// The `--payload-column` unless told otherwise: the Kafka value.
pub const DEFAULT_PAYLOAD_COLUMN: &str = "payload";
/// The `--metadata-column` unless told otherwise: where a trace context is.
pub const DEFAULT_METADATA_COLUMN: &str = "metadata";
/// The `--time-column` unless told otherwise: when the event happened.
pub const DEFAULT_TIME_COLUMN: &str = "recorded_at";
/// What `--seq-column` takes for a table without a sequence column.
pub const NO_SEQ_COLUMN: &str = "none";
/// The header that carries the transaction's commit LSN.
pub const LSN_HEADER: &str = "lsn";
/// The header that carries the transaction's commit time.
pub const COMMIT_TS_HEADER: &str = "commit_ts";
/// Headers walrelay sets itself, which no column may be renamed to.
pub const RESERVED_HEADERS: [&str; 2] = [LSN_HEADER, COMMIT_TS_HEADER];

/// OIDs of `json` and `jsonb`, whose text is JSON already.
const JSON_TYPE_OIDS: [u32; 2] = [114, 3802];
/// OID of `bytea`, whose text form is `\x` and hexadecimal digits.
const BYTEA_TYPE_OID: u32 = 17;

/// How the payload column's value becomes the Kafka value (`--payload-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// By the column's type: `json`/`jsonb` as JSON text, `bytea` as its
    /// bytes, any other type as its UTF-8 text; nothing is checked.
    #[default]
    Auto,
    /// Any type, checked to be JSON: a payload that is not is a poison row.
    Json,
    /// Any type, as opaque bytes; nothing is checked.
    Bytes,
}

/// What a published value is, as `--payload-format` declares it: how `tail`
/// shows it, and what a content type would say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// JSON text.
    Json,
    /// UTF-8 text.
    Text,
    /// Bytes of any kind.
    Binary,
}

/// A schema-qualified table name, `schema.table` or `table` (schema `public`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub name: String,
}

/// A table name that is not `schema.table` or `table`.
#[derive(Debug, thiserror::Error)]
#[error("invalid table name {0:?}: expected schema.table or table, like public.events")]
pub struct TableNameError(String);

impl FromStr for TableName {
    type Err = TableNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (schema, name) = s.split_once('.').unwrap_or(("public", s));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(TableNameError(s.to_owned()));
        }
        Ok(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl TableName {
    /// Whether `relation` is this table.
    pub fn matches(&self, relation: &Relation) -> bool {
        relation.schema() == self.schema && relation.name == self.name
    }
}

/// Which columns of the table make the event (`--key-column`,
/// `--seq-column`, `--payload-column`, `--type-column`, `--header-name`)
/// and how the payload is read (`--payload-format`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    /// Its text is the Kafka key.
    pub key: String,
    /// The per-aggregate sequence, if the table has one: the snapshot's
    /// order within an aggregate, and what consumers deduplicate on.
    pub seq: Option<String>,
    /// Its value is the Kafka value.
    pub payload: String,
    /// The event's type, which every row must have.
    pub event_type: Option<String>,
    /// How the payload becomes the Kafka value.
    pub payload_format: PayloadFormat,
    /// Columns whose header has another name than the column: (column, header).
    pub header_names: Vec<(String, String)>,
    /// The column whose JSON object may hold a W3C trace context, if the
    /// table has it.
    pub metadata: String,
    /// The column that says when the event happened (`ce_time`), if the
    /// table has it.
    pub time: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            key: DEFAULT_KEY_COLUMN.to_owned(),
            seq: Some(DEFAULT_SEQ_COLUMN.to_owned()),
            payload: DEFAULT_PAYLOAD_COLUMN.to_owned(),
            event_type: None,
            payload_format: PayloadFormat::Auto,
            header_names: Vec::new(),
            metadata: DEFAULT_METADATA_COLUMN.to_owned(),
            time: DEFAULT_TIME_COLUMN.to_owned(),
        }
    }
}

/// What each column a flag names is for, as errors say it.
const KEY_PURPOSE: &str = "the Kafka key (--key-column)";
const PAYLOAD_PURPOSE: &str = "the Kafka value (--payload-column)";
const SEQ_PURPOSE: &str = "the sequence (--seq-column)";
const TYPE_PURPOSE: &str = "the event type (--type-column)";
const HEADER_PURPOSE: &str = "a header (--header-name)";

impl Columns {
    /// The columns the flags name, each with what it is for.
    fn named(&self) -> impl Iterator<Item = (&str, &'static str)> {
        [
            (Some(self.key.as_str()), KEY_PURPOSE),
            (Some(self.payload.as_str()), PAYLOAD_PURPOSE),
            (self.seq.as_deref(), SEQ_PURPOSE),
            (self.event_type.as_deref(), TYPE_PURPOSE),
        ]
        .into_iter()
        .filter_map(|(column, purpose)| column.map(|c| (c, purpose)))
        .chain(
            self.header_names
                .iter()
                .map(|(column, _)| (column.as_str(), HEADER_PURPOSE)),
        )
    }

    /// The header `column` becomes.
    pub fn header_name<'a>(&'a self, column: &'a str) -> &'a str {
        self.header_names
            .iter()
            .find(|(c, _)| c == column)
            .map_or(column, |(_, header)| header.as_str())
    }
}

/// How rows become events: the columns, and the topics they may go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The columns.
    pub columns: Columns,
    /// The topic template.
    pub topic: TopicTemplate,
    /// The topics rows may resolve the template to (`--allowed-topic`);
    /// empty: any (the template's literal prefix confines them).
    pub allowed_topics: Vec<TopicPattern>,
    /// With `--format cloudevents`, the CloudEvents attributes.
    pub cloudevents: Option<CloudEvents>,
}

impl Mapping {
    /// Maps `columns`, publishing to `topic`, to any topic, in the default
    /// format.
    pub fn new(columns: Columns, topic: TopicTemplate) -> Self {
        Mapping {
            columns,
            topic,
            allowed_topics: Vec::new(),
            cloudevents: None,
        }
    }

    /// Every column the table must have (and a publication's column list
    /// must include), each once, in the order the flags name them.
    pub fn needed_columns(&self) -> Vec<&str> {
        let mut needed: Vec<&str> = Vec::new();
        let named = self.columns.named().map(|(c, _)| c);
        for column in named.chain(self.topic.columns()) {
            if !needed.contains(&column) {
                needed.push(column);
            }
        }
        needed
    }

    /// The header that carries the sequence column, if any.
    pub fn seq_header(&self) -> Option<&str> {
        self.columns
            .seq
            .as_deref()
            .map(|c| self.columns.header_name(c))
    }

    /// Whether rows may publish to `topic`.
    pub fn allows(&self, topic: &str) -> bool {
        allows(&self.allowed_topics, topic)
    }
}

/// Whether `allowed` (`--allowed-topic`; empty: any) allows `topic`.
fn allows(allowed: &[TopicPattern], topic: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|p| p.matches(topic))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

/// A topic name that may name columns in braces: `events.{event_type}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

/// A topic template that cannot produce valid topic names.
#[derive(Debug, thiserror::Error)]
pub enum TopicTemplateError {
    /// Unbalanced or empty braces.
    #[error("invalid topic {0:?}: braces must enclose a column name, like events.{{event_type}}")]
    Braces(String),
    /// Characters Kafka does not allow in topic names.
    #[error("invalid topic {0:?}: Kafka topic names use only letters, digits, '.', '_' and '-'")]
    Characters(String),
    /// Empty.
    #[error("the topic is empty")]
    Empty,
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// Whether Kafka accepts `topic` as a topic name: 1 to 249 letters, digits,
/// `.`, `_` and `-`, and neither `.` nor `..`.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && topic.chars().all(is_topic_char)
        && topic != "."
        && topic != ".."
}

impl FromStr for TopicTemplate {
    type Err = TopicTemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(TopicTemplateError::Empty);
        }
        let braces = || TopicTemplateError::Braces(s.to_owned());
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
                Some(i) if rest[i..].starts_with('}') => return Err(braces()),
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_owned()));
                    }
                    let close = rest[i..].find('}').ok_or_else(braces)? + i;
                    let column = &rest[i + 1..close];
                    if column.is_empty() || column.contains('{') {
                        return Err(braces());
                    }
                    parts.push(Part::Column(column.to_owned()));
                    rest = &rest[close + 1..];
                }
            }
        }
        let literal_ok = parts.iter().all(|p| match p {
            Part::Literal(l) => l.chars().all(is_topic_char),
            Part::Column(_) => true,
        });
        if !literal_ok {
            return Err(TopicTemplateError::Characters(s.to_owned()));
        }
        Ok(TopicTemplate { parts })
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Literal(l) => f.write_str(l)?,
                Part::Column(c) => write!(f, "{{{c}}}")?,
            }
        }
        Ok(())
    }
}

impl TopicTemplate {
    /// The columns the template names.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The topic when it names no column, else `None`.
    pub fn fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Literal(l)] => Some(l),
            _ => None,
        }
    }

    /// The columns other than `key` (the key column) that the template
    /// names: each can send the events of one aggregate to more than one topic.
    pub fn columns_besides<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> {
        self.columns().filter(move |c| *c != key)
    }

    /// Whether the topics rows can make the template name are confined to
    /// a namespace: the template names no column, or starts with a literal
    /// prefix that ends in a separator (`.`, `_` or `-`: `events.{event_type}`
    /// stays among the `events.` topics, where `{event_type}` or
    /// `events{event_type}` could name any topic, or another team's).
    pub fn is_confined(&self) -> bool {
        match self.parts.as_slice() {
            [Part::Literal(_)] => true,
            [Part::Literal(prefix), ..] => prefix.ends_with(['.', '_', '-']),
            _ => false,
        }
    }

    /// Whether some row can make the template resolve to `topic`: its
    /// literal parts appear in order, and each column fills a gap with any
    /// run of topic characters (the empty one included, as an empty column
    /// value does).
    pub fn can_resolve_to(&self, topic: &str) -> bool {
        fn resolves(parts: &[Part], rest: &str) -> bool {
            match parts.split_first() {
                None => rest.is_empty(),
                Some((Part::Literal(l), tail)) => rest
                    .strip_prefix(l.as_str())
                    .is_some_and(|rest| resolves(tail, rest)),
                Some((Part::Column(_), tail)) => rest
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain([rest.len()])
                    .take_while(|i| rest[..*i].chars().all(is_topic_char))
                    .any(|i| resolves(tail, &rest[i..])),
            }
        }
        resolves(&self.parts, topic)
    }
}

/// A topic rows may publish to (`--allowed-topic`): a name, or a prefix
/// followed by `*` (`orders.*`: every topic that starts with `orders.`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    prefix: bool,
}

/// An `--allowed-topic` that names no topic.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is neither a Kafka topic name nor a prefix followed by * (like orders.*); topic names \
     use only letters, digits, '.', '_' and '-'"
)]
pub struct TopicPatternError(String);

impl FromStr for TopicPattern {
    type Err = TopicPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (text, prefix) = match s.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (s, false),
        };
        // A lone `*` would allow every topic, internal ones included.
        let valid = if prefix {
            !text.is_empty() && text.chars().all(is_topic_char)
        } else {
            is_valid_topic_name(text)
        };
        if !valid {
            return Err(TopicPatternError(s.to_owned()));
        }
        Ok(TopicPattern {
            text: text.to_owned(),
            prefix,
        })
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        if self.prefix {
            f.write_str("*")?;
        }
        Ok(())
    }
}

impl TopicPattern {
    /// Whether `topic` is this topic, or starts with this prefix.
    pub fn matches(&self, topic: &str) -> bool {
        if self.prefix {
            topic.starts_with(&self.text)
        } else {
            topic == self.text
        }
    }
}

/// The events table lacks a column the mapping needs.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A required column is not in the Relation message.
    #[error(
        "table {table} has no column {column:?}, which walrelay needs for {purpose}; restore the \
         column, or name the one to use instead (--key-column, --seq-column (none for no \
         sequence), --payload-column, --type-column, --header-name, --topic)"
    )]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
        /// What it is for.
        purpose: &'static str,
    },
    /// Two columns would become headers of the same name.
    #[error(
        "table {table} has two columns that become header {header:?} (see --header-name); \
         give one another name"
    )]
    DuplicateHeader {
        /// `schema.table`.
        table: String,
        /// The header.
        header: String,
    },
    /// A column would become a header `--format cloudevents` sets.
    #[error(
        "table {table} has a column that becomes header {header:?}, which --format cloudevents \
         sets itself (ce_* and content-type); give it another name with --header-name"
    )]
    CloudEventsHeader {
        /// `schema.table`.
        table: String,
        /// The header.
        header: String,
    },
    /// `--format cloudevents` without a column it needs.
    #[error("--format cloudevents needs {0} (ce_id is <key>:<sequence>, ce_type the type column)")]
    CloudEventsColumn(&'static str),
}

#[derive(Clone, Debug)]
enum TopicPart {
    Literal(String),
    Column(usize),
}

/// Where each part of an [`Event`] comes from in one version of the table's
/// columns. Built from each Relation message of the events table.
#[derive(Clone, Debug)]
pub struct EventLayout {
    relation_oid: u32,
    /// Every column's name, by position.
    names: Vec<Arc<str>>,
    key: usize,
    seq: Option<usize>,
    event_type: Option<usize>,
    value: usize,
    /// The value column is `bytea`: its text is decoded to its bytes.
    value_bytea: bool,
    /// The value is checked to be JSON (`--payload-format json`, a column
    /// that is not `json` or `jsonb`).
    value_checked: bool,
    value_kind: ValueKind,
    headers: Vec<(Arc<str>, usize)>,
    topic: Vec<TopicPart>,
    allowed_topics: Vec<TopicPattern>,
    /// The metadata column, whose trace context becomes headers, unless a
    /// column is a `traceparent` or `tracestate` header itself.
    trace_source: Option<usize>,
    /// With `--format cloudevents`.
    cloudevents: Option<CloudEventsLayout>,
}

/// Where the CloudEvents attributes of an event come from.
#[derive(Clone, Debug)]
struct CloudEventsLayout {
    /// The sequence column, half of `ce_id`.
    seq: usize,
    /// The type column: `ce_type`.
    event_type: usize,
    /// The time column (`ce_time`), if the table has it.
    time: Option<usize>,
    /// `ce_specversion`, `ce_source` and `content-type`, the same for every
    /// event.
    constant: Vec<(Arc<str>, Bytes)>,
}

impl CloudEventsLayout {
    /// The attributes over the sequence, type and time columns (the first
    /// two required), for values of `value_kind`; no column header of
    /// `table` may be one of them.
    fn new(
        attributes: &CloudEvents,
        headers: &[(Arc<str>, usize)],
        (seq, event_type, time): (Option<usize>, Option<usize>, Option<usize>),
        value_kind: ValueKind,
        table: impl Fn() -> String,
    ) -> Result<Self, LayoutError> {
        if let Some((header, _)) = headers
            .iter()
            .find(|(h, _)| h.starts_with(ce::ATTRIBUTE_PREFIX) || &**h == ce::CONTENT_TYPE_HEADER)
        {
            return Err(LayoutError::CloudEventsHeader {
                table: table(),
                header: header.to_string(),
            });
        }
        let constant = [
            (ce::SPEC_VERSION_HEADER, ce::SPEC_VERSION),
            (ce::SOURCE_HEADER, attributes.source.as_str()),
            (ce::CONTENT_TYPE_HEADER, attributes.content_type(value_kind)),
        ];
        Ok(CloudEventsLayout {
            seq: seq.ok_or(LayoutError::CloudEventsColumn("--seq-column"))?,
            event_type: event_type.ok_or(LayoutError::CloudEventsColumn("--type-column"))?,
            time,
            constant: constant
                .iter()
                .map(|(h, v)| (Arc::from(*h), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        })
    }
}

impl EventLayout {
    /// Maps `relation`'s columns by name, as `mapping` says.
    pub fn new(relation: &Relation, mapping: &Mapping) -> Result<Self, LayoutError> {
        let table = || format!("{}.{}", relation.schema(), relation.name);
        let find = |column: &str, purpose: &'static str| {
            relation
                .column_index(column)
                .ok_or_else(|| LayoutError::MissingColumn {
                    table: table(),
                    column: column.to_owned(),
                    purpose,
                })
        };
        let columns = &mapping.columns;
        let key = find(&columns.key, KEY_PURPOSE)?;
        let value = find(&columns.payload, PAYLOAD_PURPOSE)?;
        let seq = columns
            .seq
            .as_deref()
            .map(|c| find(c, SEQ_PURPOSE))
            .transpose()?;
        let event_type = columns
            .event_type
            .as_deref()
            .map(|c| find(c, TYPE_PURPOSE))
            .transpose()?;
        for (column, _) in &columns.header_names {
            find(column, HEADER_PURPOSE)?;
        }
        let topic = mapping
            .topic
            .parts
            .iter()
            .map(|part| match part {
                Part::Literal(l) => Ok(TopicPart::Literal(l.clone())),
                Part::Column(c) => find(c, "the topic name (--topic)").map(TopicPart::Column),
            })
            .collect::<Result<_, _>>()?;
        let mut headers: Vec<(Arc<str>, usize)> = Vec::with_capacity(relation.columns.len());
        for (i, column) in relation.columns.iter().enumerate() {
            if i == key || i == value {
                continue;
            }
            let header = columns.header_name(&column.name);
            if headers.iter().any(|(h, _)| &**h == header) {
                return Err(LayoutError::DuplicateHeader {
                    table: table(),
                    header: header.to_owned(),
                });
            }
            headers.push((Arc::from(header), i));
        }
        let trace_source = relation.column_index(&columns.metadata).filter(|_| {
            !headers
                .iter()
                .any(|(h, _)| [TRACEPARENT, TRACESTATE].contains(&&**h))
        });
        let type_oid = relation.columns[value].type_oid;
        let is_json = JSON_TYPE_OIDS.contains(&type_oid);
        let value_bytea = type_oid == BYTEA_TYPE_OID;
        let (value_kind, value_checked) = match columns.payload_format {
            PayloadFormat::Auto if is_json => (ValueKind::Json, false),
            PayloadFormat::Auto if value_bytea => (ValueKind::Binary, false),
            PayloadFormat::Auto => (ValueKind::Text, false),
            // PostgreSQL checked a json or jsonb value already.
            PayloadFormat::Json => (ValueKind::Json, !is_json),
            PayloadFormat::Bytes => (ValueKind::Binary, false),
        };
        let cloudevents = mapping
            .cloudevents
            .as_ref()
            .map(|attributes| {
                let time = relation.column_index(&columns.time);
                let columns = (seq, event_type, time);
                CloudEventsLayout::new(attributes, &headers, columns, value_kind, table)
            })
            .transpose()?;
        Ok(EventLayout {
            relation_oid: relation.oid,
            names: relation
                .columns
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            key,
            seq,
            event_type,
            value,
            value_bytea,
            value_checked,
            value_kind,
            headers,
            topic,
            allowed_topics: mapping.allowed_topics.clone(),
            trace_source,
            cloudevents,
        })
    }

    /// The OID of the table this layout is for.
    pub fn relation_oid(&self) -> u32 {
        self.relation_oid
    }

    /// The position of the key column in a row.
    pub fn key_index(&self) -> usize {
        self.key
    }

    /// The position of the sequence column in a row, if the table has one.
    pub fn seq_index(&self) -> Option<usize> {
        self.seq
    }

    /// What the published values are.
    pub fn value_kind(&self) -> ValueKind {
        self.value_kind
    }

    /// Builds the event for one inserted row of transaction `txn`.
    pub fn event(&self, txn: &Transaction, row: &TupleData) -> Result<Event, RowError> {
        if row.len() < self.names.len() {
            return Err(RowError::ColumnCount {
                expected: self.names.len(),
                got: row.len(),
            });
        }
        let cell = |i: usize| match &row[i] {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => Ok(Some(b)),
            ColumnValue::Null => Ok(None),
            ColumnValue::UnchangedToast => Err(RowError::UnchangedToast(self.names[i].to_string())),
        };
        let required = |i: usize, purpose: &'static str| {
            cell(i)?.cloned().ok_or_else(|| RowError::Null {
                column: self.names[i].to_string(),
                purpose,
            })
        };
        let key = required(self.key, "the Kafka key")?;
        let seq = self.seq.map(|i| required(i, "the sequence")).transpose()?;
        if let Some(i) = self.event_type {
            required(i, "the event type")?;
        }
        let value = cell(self.value)?
            .ok_or_else(|| RowError::NullPayload(self.names[self.value].to_string()))?;
        let value = self.value(value.clone())?;
        let topic = self.topic(row)?;
        // Every header of the event: the row's columns, the CloudEvents
        // attributes, the trace context, then the transaction's.
        let mut headers = Vec::with_capacity(self.headers.len() + txn.headers.len() + 8);
        for (name, i) in &self.headers {
            if let Some(v) = cell(*i)? {
                headers.push((Arc::clone(name), v.clone()));
            }
        }
        if let Some(layout) = &self.cloudevents {
            headers.extend(layout.constant.iter().cloned());
            let mut id = Vec::with_capacity(key.len() + 12);
            id.extend_from_slice(&key);
            id.push(b':');
            // Both required: checked above.
            id.extend_from_slice(cell(layout.seq)?.map_or(&b""[..], |s| &s[..]));
            headers.push((Arc::from(ce::ID_HEADER), Bytes::from(id)));
            if let Some(event_type) = cell(layout.event_type)? {
                headers.push((Arc::from(ce::TYPE_HEADER), event_type.clone()));
            }
            let recorded = layout
                .time
                .map(cell)
                .transpose()?
                .flatten()
                .and_then(|t| ce::rfc3339_from_pg(t))
                .map(Bytes::from);
            if let Some(time) = recorded.or_else(|| txn.rfc3339_commit_ts.clone()) {
                headers.push((Arc::from(ce::TIME_HEADER), time));
            }
        }
        let mut invalid_trace_context = None;
        if let Some(metadata) = self.trace_source.map(cell).transpose()?.flatten() {
            let context = trace_context::from_metadata(metadata);
            for (name, value) in [
                (TRACEPARENT, context.traceparent),
                (TRACESTATE, context.tracestate),
            ] {
                if let Some(value) = value {
                    headers.push((Arc::from(name), metadata.slice_ref(value.as_bytes())));
                }
            }
            invalid_trace_context = context.invalid;
        }
        headers.extend(txn.headers.iter().cloned());
        Ok(Event {
            topic,
            key,
            seq,
            value,
            value_kind: self.value_kind,
            headers,
            commit_lsn: txn.commit_lsn,
            invalid_trace_context,
        })
    }

    /// The Kafka value of a payload whose text form is `text`.
    fn value(&self, text: Bytes) -> Result<Bytes, RowError> {
        let column = || self.names[self.value].to_string();
        let value = if self.value_bytea {
            decode_bytea(&text).ok_or_else(|| RowError::InvalidBytea(column()))?
        } else {
            text
        };
        if self.value_checked && serde_json::from_slice::<serde::de::IgnoredAny>(&value).is_err() {
            return Err(RowError::InvalidJson(column()));
        }
        Ok(value)
    }

    fn topic(&self, row: &TupleData) -> Result<String, RowError> {
        let mut topic = String::new();
        for part in &self.topic {
            match part {
                TopicPart::Literal(l) => topic.push_str(l),
                TopicPart::Column(i) => match &row[*i] {
                    ColumnValue::Text(b) | ColumnValue::Binary(b) => {
                        topic.push_str(&String::from_utf8_lossy(b));
                    }
                    ColumnValue::Null | ColumnValue::UnchangedToast => {
                        return Err(RowError::Null {
                            column: self.names[*i].to_string(),
                            purpose: "the topic",
                        });
                    }
                },
            }
        }
        if !is_valid_topic_name(&topic) {
            return Err(RowError::InvalidTopic(topic));
        }
        if !allows(&self.allowed_topics, &topic) {
            return Err(RowError::TopicNotAllowed(topic));
        }
        Ok(topic)
    }
}

/// A row that cannot become an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    /// A column the event needs is NULL.
    #[error("the {column} column ({purpose}) is NULL")]
    Null {
        /// The column.
        column: String,
        /// What it is for.
        purpose: &'static str,
    },
    /// The payload column is NULL.
    #[error(
        "the {0} column (the Kafka value) is NULL; walrelay publishes no tombstones: a null value \
         would read as a deletion, and a compacted topic would drop the aggregate's earlier events"
    )]
    NullPayload(String),
    /// An Insert never has unchanged TOAST values; this one does.
    #[error("column {0:?} arrived without its value (unchanged TOAST)")]
    UnchangedToast(String),
    /// The topic template produced a name Kafka would refuse.
    #[error(
        "the topic template produced {0:?}, which is not a valid Kafka topic name (1 to 249 \
         letters, digits, '.', '_' and '-', neither '.' nor '..')"
    )]
    InvalidTopic(String),
    /// The topic template produced a topic no `--allowed-topic` allows.
    #[error("the topic template produced {0:?}, which no --allowed-topic allows")]
    TopicNotAllowed(String),
    /// The topic the row names does not exist on the Kafka cluster.
    #[error(
        "topic {0:?}, which the row's columns name, does not exist on the Kafka cluster; create it \
         (kafka-topics.sh --create --topic {0}) if rows are to go there"
    )]
    TopicMissing(String),
    /// The payload is not JSON (`--payload-format json`).
    #[error("the {0} column is not valid JSON (--payload-format json)")]
    InvalidJson(String),
    /// A `bytea` payload whose text is neither bytea's hex nor escape form.
    #[error("the {0} column is not bytea in hex or escape format")]
    InvalidBytea(String),
    /// The row has fewer values than the Relation has columns.
    #[error("the row has {got} values, but the table has {expected} columns")]
    ColumnCount {
        /// From the Relation.
        expected: usize,
        /// In the row.
        got: usize,
    },
}

/// Decodes bytea's text form: hex (`\x48656c6c6f`, the default
/// `bytea_output`), or escape (`Hello\000\\`: printable bytes as they are, a
/// backslash doubled, other bytes as a backslash and three octal digits).
/// A hex text starts with `\x`; an escape one never does, since it doubles
/// every backslash. `None` for anything else.
fn decode_bytea(text: &[u8]) -> Option<Bytes> {
    if let Some(digits) = text.strip_prefix(b"\\x") {
        if digits.len() % 2 != 0 {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16);
        return digits
            .chunks_exact(2)
            .map(|pair| u8::try_from(nibble(pair[0])? * 16 + nibble(pair[1])?).ok())
            .collect::<Option<Vec<u8>>>()
            .map(Bytes::from);
    }
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some((&first, tail)) = rest.split_first() {
        if first != b'\\' {
            bytes.push(first);
            rest = tail;
            continue;
        }
        match tail {
            [b'\\', tail @ ..] => {
                bytes.push(b'\\');
                rest = tail;
            }
            [a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', tail @ ..] => {
                bytes.push((a - b'0') * 64 + (b - b'0') * 8 + (c - b'0'));
                rest = tail;
            }
            _ => return None,
        }
    }
    Some(Bytes::from(bytes))
}

/// Microseconds in a day.
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, the PostgreSQL epoch.
const UNIX_TO_PG_EPOCH_DAYS: i64 = 10_957;

/// The `commit_ts` header's text for a PostgreSQL timestamp (microseconds
/// since 2000-01-01 UTC), for every `i64`, without panicking.
///
/// Years 0000 to 9999 are RFC 3339 in UTC with microseconds,
/// `2026-11-25T10:18:50.969472Z`. Other years (a replication origin can set
/// any commit time) use ISO 8601's expanded form: a sign and six digits,
/// `+010000-01-01T00:00:00.000000Z`, `-000001-12-31T23:59:59.999999Z`. Years
/// count astronomically on the proleptic Gregorian calendar: year 0000 is
/// 1 BC. PostgreSQL's `infinity` and `-infinity` (`i64::MAX`, `i64::MIN`)
/// read as PostgreSQL prints them.
pub fn format_commit_ts(micros: i64) -> String {
    match micros {
        i64::MAX => return "infinity".to_owned(),
        i64::MIN => return "-infinity".to_owned(),
        _ => {}
    }
    let days = micros.div_euclid(MICROS_PER_DAY) + UNIX_TO_PG_EPOCH_DAYS;
    let of_day = micros.rem_euclid(MICROS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let (secs, frac) = (of_day / 1_000_000, of_day % 1_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let year = if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else {
        format!("{year:+07}")
    };
    format!("{year}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{frac:06}Z")
}

/// The proleptic Gregorian (year, month, day) of a day counted from
/// 1970-01-01, for any day an `i64` of microseconds can reach. Counts in
/// 400-year eras of 146,097 days that start on 1 March, so the leap day
/// ends each era's year (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    // Shift the origin to 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March: 0 is March, 11 is February.
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// What every event of one transaction shares, formatted once.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// The commit LSN (`Begin.final_lsn`).
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
    /// The headers every event of the transaction carries after its
    /// columns': `lsn`, `commit_ts`.
    headers: Vec<(Arc<str>, Bytes)>,
    /// The commit time when RFC 3339 can say it (years 0000 to 9999): the
    /// `ce_time` of events whose table says no other time.
    rfc3339_commit_ts: Option<Bytes>,
}

impl Transaction {
    /// The shared part of the events of the transaction a Begin announced.
    pub fn new(commit_lsn: Lsn, commit_ts: i64) -> Self {
        let commit_ts_text = Bytes::from(format_commit_ts(commit_ts));
        // The expanded years start with a sign, the infinities are words.
        let rfc3339_commit_ts = commit_ts_text
            .first()
            .is_some_and(u8::is_ascii_digit)
            .then(|| commit_ts_text.clone());
        let headers = vec![
            (Arc::from(LSN_HEADER), Bytes::from(commit_lsn.to_string())),
            (Arc::from(COMMIT_TS_HEADER), commit_ts_text),
        ];
        Transaction {
            commit_lsn,
            commit_ts,
            headers,
            rfc3339_commit_ts,
        }
    }

    /// The commit time.
    pub fn commit_time(&self) -> SystemTime {
        pg_timestamp_to_system_time(self.commit_ts)
    }
}

/// One record to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The Kafka topic.
    pub topic: String,
    /// The Kafka key: the key column's text.
    pub key: Bytes,
    /// The sequence column's text (among the headers too), if the table has one.
    pub seq: Option<Bytes>,
    /// The Kafka value: the payload, as the table holds it.
    pub value: Bytes,
    /// What the value is.
    pub value_kind: ValueKind,
    /// Header name and value: the columns in their order, the CloudEvents
    /// attributes, the trace context, then `lsn` and `commit_ts`.
    pub headers: Vec<(Arc<str>, Bytes)>,
    /// The commit LSN of the transaction it belongs to.
    pub commit_lsn: Lsn,
    /// A trace context in the metadata column that was not valid, and so
    /// not copied.
    pub invalid_trace_context: Option<trace_context::Invalid>,
}

impl Event {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::pgoutput::{Column, ReplicaIdentity};

    fn relation(columns: &[(&str, u32)]) -> Relation {
        Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "events".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|(name, type_oid)| Column {
                    flags: 0,
                    name: (*name).into(),
                    type_oid: *type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn standard() -> Relation {
        relation(&[
            ("aggregate_id", 25),
            ("seq_nr", 20),
            ("event_type", 25),
            ("payload", 3802),
            ("metadata", 3802),
        ])
    }

    fn t(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn txn() -> Transaction {
        // 2026-01-01T00:00:00.000001Z in microseconds since 2000-01-01.
        Transaction::new(Lsn(0x1_0000_00A0), 820_540_800_000_001)
    }

    /// The default columns, publishing to `topic`.
    fn mapping(topic: &str) -> Mapping {
        Mapping::new(Columns::default(), topic.parse().unwrap())
    }

    /// `mapping(topic)` with the columns changed by `change`.
    fn mapping_with(topic: &str, change: impl FnOnce(&mut Columns)) -> Mapping {
        let mut m = mapping(topic);
        change(&mut m.columns);
        m
    }

    fn headers(event: &Event) -> Vec<(&str, &[u8])> {
        event.headers.iter().map(|(n, v)| (&**n, &v[..])).collect()
    }

    #[test]
    fn maps_columns_by_name_into_key_value_and_headers() {
        let layout = EventLayout::new(&standard(), &mapping("events")).unwrap();
        assert_eq!(layout.value_kind(), ValueKind::Json);
        let row = vec![
            t("order-1"),
            t("3"),
            t("OrderPlaced"),
            t("{\"a\": 1}"),
            ColumnValue::Null,
        ];
        let event = layout.event(&txn(), &row).unwrap();
        assert_eq!(event.topic, "events");
        assert_eq!(&event.key[..], b"order-1");
        assert_eq!(&event.value[..], b"{\"a\": 1}");
        assert_eq!(event.seq.as_deref(), Some(&b"3"[..]));
        assert_eq!(
            headers(&event),
            [
                ("seq_nr", &b"3"[..]),
                ("event_type", b"OrderPlaced"),
                ("lsn", b"1/A0"),
                ("commit_ts", b"2026-01-01T00:00:00.000001Z"),
            ],
            "a NULL column (metadata) is left out"
        );
        assert_eq!(event.commit_lsn, Lsn(0x1_0000_00A0));
    }

    #[test]
    fn follows_reordered_and_added_columns() {
        let rel = relation(&[("payload", 25), ("tenant", 25), ("aggregate_id", 25)]);
        let no_seq = mapping_with("e.{tenant}", |c| c.seq = None);
        let layout = EventLayout::new(&rel, &no_seq).unwrap();
        assert_eq!(layout.value_kind(), ValueKind::Text);
        let event = layout
            .event(&txn(), &vec![t("\"p\""), t("acme"), t("k")])
            .unwrap();
        assert_eq!(
            (event.topic.as_str(), &event.key[..]),
            ("e.acme", &b"k"[..])
        );
        assert_eq!(event.header("tenant").map(|v| &v[..]), Some(&b"acme"[..]));
        assert_eq!(event.seq, None);
    }

    #[test]
    fn a_missing_required_column_is_named() {
        let rel = relation(&[("aggregate_id", 25), ("seq_nr", 20)]);
        let err = EventLayout::new(&rel, &mapping("events")).unwrap_err();
        assert!(err.to_string().contains("\"payload\""), "{err}");
        let err = EventLayout::new(&standard(), &mapping("e.{tenant}")).unwrap_err();
        assert!(err.to_string().contains("\"tenant\""), "{err}");
        // Every column a flag names, the sequence column included.
        let rel = relation(&[("aggregate_id", 25), ("payload", 3802)]);
        let err = EventLayout::new(&rel, &mapping("events")).unwrap_err();
        assert!(
            err.to_string().contains("\"seq_nr\"") && err.to_string().contains("--seq-column"),
            "{err}"
        );
        for change in [
            (|c: &mut Columns| c.event_type = Some("kind".into())) as fn(&mut Columns),
            |c| c.header_names = vec![("kind".into(), "type".into())],
            |c| c.key = "kind".into(),
        ] {
            let err = EventLayout::new(&standard(), &mapping_with("events", change)).unwrap_err();
            assert!(err.to_string().contains("\"kind\""), "{err}");
        }
    }

    #[test]
    fn rows_that_cannot_be_events_are_errors() {
        let layout = EventLayout::new(&standard(), &mapping("ev.{event_type}")).unwrap();
        let row = |key, ty, payload| vec![key, t("1"), ty, payload, t("{}")];
        assert_eq!(
            layout
                .event(&txn(), &row(ColumnValue::Null, t("X"), t("{}")))
                .unwrap_err(),
            RowError::Null {
                column: "aggregate_id".into(),
                purpose: "the Kafka key"
            }
        );
        assert_eq!(
            layout
                .event(&txn(), &row(t("k"), ColumnValue::Null, t("{}")))
                .unwrap_err(),
            RowError::Null {
                column: "event_type".into(),
                purpose: "the topic"
            }
        );
        // A NULL payload is no tombstone.
        let err = layout
            .event(&txn(), &row(t("k"), t("X"), ColumnValue::Null))
            .unwrap_err();
        assert_eq!(err, RowError::NullPayload("payload".into()));
        assert!(err.to_string().contains("no tombstones"), "{err}");
        for topic in ["has space", "ü", "a/b"] {
            assert_eq!(
                layout
                    .event(&txn(), &row(t("k"), t(topic), t("{}")))
                    .unwrap_err(),
                RowError::InvalidTopic(format!("ev.{topic}")),
            );
        }
        assert!(matches!(
            layout.event(&txn(), &vec![t("k")]).unwrap_err(),
            RowError::ColumnCount { .. }
        ));
        // The sequence and the type a flag names must be there too.
        let typed = mapping_with("events", |c| c.event_type = Some("event_type".into()));
        let layout = EventLayout::new(&standard(), &typed).unwrap();
        let row = |seq, ty| vec![t("k"), seq, ty, t("{}"), ColumnValue::Null];
        assert_eq!(
            layout
                .event(&txn(), &row(ColumnValue::Null, t("T")))
                .unwrap_err(),
            RowError::Null {
                column: "seq_nr".into(),
                purpose: "the sequence"
            }
        );
        assert_eq!(
            layout
                .event(&txn(), &row(t("1"), ColumnValue::Null))
                .unwrap_err(),
            RowError::Null {
                column: "event_type".into(),
                purpose: "the event type"
            }
        );
    }

    #[test]
    fn topic_names_kafka_refuses_are_invalid() {
        for bad in [".", "..", "", "a b", "ü", &"x".repeat(250)] {
            assert!(!is_valid_topic_name(bad), "{bad:?}");
        }
        for good in ["...", "a.b", "_x-1", &"x".repeat(249)] {
            assert!(is_valid_topic_name(good), "{good:?}");
        }
        // A template whose column makes the whole name . or ..
        let layout = EventLayout::new(&standard(), &mapping("{event_type}")).unwrap();
        let row = |ty| vec![t("k"), t("1"), t(ty), t("{}"), t("{}")];
        for dots in [".", ".."] {
            assert_eq!(
                layout.event(&txn(), &row(dots)).unwrap_err(),
                RowError::InvalidTopic(dots.into())
            );
        }
        assert_eq!(layout.event(&txn(), &row("...")).unwrap().topic, "...");
    }

    #[test]
    fn rows_may_publish_only_to_the_allowed_topics() {
        let mut allowed = mapping("{event_type}");
        allowed.allowed_topics = vec!["orders".parse().unwrap(), "audit.*".parse().unwrap()];
        let layout = EventLayout::new(&standard(), &allowed).unwrap();
        let row = |ty| vec![t("k"), t("1"), t(ty), t("{}"), t("{}")];
        for ok in ["orders", "audit.", "audit.x"] {
            assert_eq!(layout.event(&txn(), &row(ok)).unwrap().topic, ok);
            assert!(allowed.allows(ok));
        }
        for refused in ["orders2", "audit", "__consumer_offsets", "payments"] {
            assert_eq!(
                layout.event(&txn(), &row(refused)).unwrap_err(),
                RowError::TopicNotAllowed(refused.into())
            );
            assert!(!allowed.allows(refused));
        }
        assert!(mapping("{event_type}").allows("anything"));
    }

    #[test]
    fn parses_allowed_topics() {
        for ok in ["orders", "orders.*", "a*", "..."] {
            assert_eq!(ok.parse::<TopicPattern>().unwrap().to_string(), ok);
        }
        for bad in ["*", "", "a*b", "a**", "a b", ".", ".."] {
            assert!(bad.parse::<TopicPattern>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn templates_are_confined_by_a_literal_prefix_ending_in_a_separator() {
        let template = |t: &str| t.parse::<TopicTemplate>().unwrap();
        for confined in [
            "events",
            "events.{event_type}",
            "outbox.event.{aggregatetype}",
            "e_{x}",
            "e-{x}.{y}",
        ] {
            assert!(template(confined).is_confined(), "{confined}");
        }
        for open in ["{event_type}", "{tenant}.events", "events{x}", "e.x{y}"] {
            assert!(!template(open).is_confined(), "{open}");
        }
    }

    #[test]
    fn the_payload_is_published_as_the_table_holds_it() {
        let layout = |payload_type: u32, format: PayloadFormat| {
            let rel = relation(&[
                ("aggregate_id", 20),
                ("seq_nr", 20),
                ("payload", payload_type),
            ]);
            EventLayout::new(&rel, &mapping_with("events", |c| c.payload_format = format)).unwrap()
        };
        let value = |layout: &EventLayout, text: &str| {
            layout
                .event(&txn(), &vec![t("42"), t("1"), t(text)])
                .map(|e| e.value.to_vec())
        };
        // bytea, any bytes (here not UTF-8), in its hex and escape forms.
        let binary = [0x0a_u8, 0x03, 0x00, 0xff, 0x5c, 0x80, b'a'];
        for format in [PayloadFormat::Auto, PayloadFormat::Bytes] {
            let bytea = layout(17, format);
            assert_eq!(bytea.value_kind(), ValueKind::Binary);
            assert_eq!(value(&bytea, "\\x0a0300ff5c8061").unwrap(), binary);
            assert_eq!(value(&bytea, "\\x0A0300FF5C8061").unwrap(), binary);
            assert_eq!(
                value(&bytea, "\\012\\003\\000\\377\\\\\\200a").unwrap(),
                binary
            );
            assert_eq!(value(&bytea, "\\x").unwrap(), b"");
            for bad in ["\\xzz", "\\x0", "\\8", "a\\", "\\x0g"] {
                assert_eq!(
                    value(&bytea, bad).unwrap_err(),
                    RowError::InvalidBytea("payload".into()),
                    "{bad}"
                );
            }
        }
        // Text and JSON as their text, never checked unless asked.
        for (oid, kind) in [(25, ValueKind::Text), (3802, ValueKind::Json)] {
            let auto = layout(oid, PayloadFormat::Auto);
            assert_eq!(auto.value_kind(), kind);
            assert_eq!(value(&auto, "not json").unwrap(), b"not json");
            let bytes = layout(oid, PayloadFormat::Bytes);
            assert_eq!(bytes.value_kind(), ValueKind::Binary);
            assert_eq!(value(&bytes, "ünïcode").unwrap(), "ünïcode".as_bytes());
        }
        // --payload-format json checks every type; bytea after decoding.
        for oid in [25, 17, 3802] {
            assert_eq!(
                layout(oid, PayloadFormat::Json).value_kind(),
                ValueKind::Json
            );
        }
        let json_text = layout(25, PayloadFormat::Json);
        assert_eq!(value(&json_text, "{\"a\": 1}").unwrap(), b"{\"a\": 1}");
        for bad in ["not json", "", "{"] {
            assert_eq!(
                value(&json_text, bad).unwrap_err(),
                RowError::InvalidJson("payload".into())
            );
        }
        let json_bytea = layout(17, PayloadFormat::Json);
        // '{"a":1}' as bytea.
        assert_eq!(
            value(&json_bytea, "\\x7b2261223a317d").unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(
            value(&json_bytea, "\\x0a03").unwrap_err(),
            RowError::InvalidJson("payload".into())
        );
    }

    proptest::proptest! {
        #[test]
        fn bytea_text_in_either_form_decodes_to_its_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            // byteaout's two forms, written the plain way.
            let hex: String = std::iter::once("\\x".to_owned())
                .chain(bytes.iter().map(|b| format!("{b:02x}")))
                .collect();
            let escape: String = bytes
                .iter()
                .map(|&b| match b {
                    b'\\' => "\\\\".to_owned(),
                    0x20..=0x7e => char::from(b).to_string(),
                    _ => format!("\\{b:03o}"),
                })
                .collect();
            let decoded = |text: &str| decode_bytea(text.as_bytes()).map(|b| b.to_vec());
            proptest::prop_assert_eq!(decoded(&hex), Some(bytes.clone()));
            proptest::prop_assert_eq!(decoded(&escape), Some(bytes));
        }
    }

    #[test]
    fn a_debezium_outbox_row_maps_as_the_outbox_event_router_routes_it() {
        // Debezium's outbox table: id uuid, aggregatetype, aggregateid and
        // type varchar, payload jsonb.
        let rel = relation(&[
            ("id", 2950),
            ("aggregatetype", 1043),
            ("aggregateid", 1043),
            ("type", 1043),
            ("payload", 3802),
        ]);
        let outbox = mapping_with("outbox.event.{aggregatetype}", |c| {
            c.key = "aggregateid".into();
            c.seq = None;
            c.event_type = Some("type".into());
            c.header_names = vec![("type".into(), "eventType".into())];
        });
        assert_eq!(
            outbox.needed_columns(),
            ["aggregateid", "payload", "type", "aggregatetype"]
        );
        assert_eq!(outbox.seq_header(), None);
        let layout = EventLayout::new(&rel, &outbox).unwrap();
        let row = vec![
            t("4d47e190-0402-4048-bc2c-89dd54343cdc"),
            t("Order"),
            t("1"),
            t("OrderCreated"),
            t("{\"id\": 1}"),
        ];
        let event = layout.event(&txn(), &row).unwrap();
        assert_eq!(event.topic, "outbox.event.Order");
        assert_eq!(
            (&event.key[..], &event.value[..]),
            (&b"1"[..], &b"{\"id\": 1}"[..])
        );
        assert_eq!(
            headers(&event)[..3],
            [
                ("id", &b"4d47e190-0402-4048-bc2c-89dd54343cdc"[..]),
                ("aggregatetype", b"Order"),
                ("eventType", b"OrderCreated"),
            ]
        );
        // Two columns may not end up as one header.
        let clash = mapping_with("events", |c| {
            c.seq = None;
            c.header_names = vec![("type".into(), "id".into())];
        });
        let rel = relation(&[
            ("aggregate_id", 25),
            ("payload", 25),
            ("id", 25),
            ("type", 25),
        ]);
        let err = EventLayout::new(&rel, &clash).unwrap_err();
        assert!(err.to_string().contains("header \"id\""), "{err}");
    }

    fn cloudevents(topic: &str) -> Mapping {
        let mut m = mapping_with(topic, |c| c.event_type = Some("event_type".into()));
        m.cloudevents = Some(CloudEvents {
            source: "/walrelay/shop/public.events".into(),
            content_type: None,
        });
        m
    }

    #[test]
    fn cloudevents_attributes_are_headers_and_the_id_is_the_key_and_sequence() {
        let rel = relation(&[
            ("aggregate_id", 2950),
            ("seq_nr", 20),
            ("event_type", 25),
            ("payload", 3802),
            ("recorded_at", 1184),
        ]);
        let layout = EventLayout::new(&rel, &cloudevents("events")).unwrap();
        let row = |recorded_at: ColumnValue| {
            vec![
                t("4d47e190-0402-4048-bc2c-89dd54343cdc"),
                t("7"),
                t("OrderPlaced"),
                t("{}"),
                recorded_at,
            ]
        };
        let event = layout
            .event(&txn(), &row(t("2026-11-25 10:18:50.968738+00")))
            .unwrap();
        assert_eq!(
            headers(&event),
            [
                ("seq_nr", &b"7"[..]),
                ("event_type", b"OrderPlaced"),
                ("recorded_at", b"2026-11-25 10:18:50.968738+00"),
                ("ce_specversion", b"1.0"),
                ("ce_source", b"/walrelay/shop/public.events"),
                ("content-type", b"application/json"),
                ("ce_id", b"4d47e190-0402-4048-bc2c-89dd54343cdc:7"),
                ("ce_type", b"OrderPlaced"),
                ("ce_time", b"2026-11-25T10:18:50.968738Z"),
                ("lsn", b"1/A0"),
                ("commit_ts", b"2026-01-01T00:00:00.000001Z"),
            ]
        );
        // No RFC 3339 time in the row: the commit time; none at all: no ce_time.
        for recorded_at in [ColumnValue::Null, t("infinity")] {
            let event = layout.event(&txn(), &row(recorded_at)).unwrap();
            assert_eq!(
                event.header("ce_time").map(|v| &v[..]),
                Some(&b"2026-01-01T00:00:00.000001Z"[..])
            );
        }
        let beyond_9999 = Transaction::new(Lsn(1), 252_455_616_000_000_000);
        let event = layout.event(&beyond_9999, &row(ColumnValue::Null)).unwrap();
        assert_eq!(event.header("ce_time"), None);
        // A bytea payload is octet-stream, unless told.
        let bytea = relation(&[
            ("aggregate_id", 20),
            ("seq_nr", 20),
            ("event_type", 25),
            ("payload", 17),
        ]);
        let octets = EventLayout::new(&bytea, &cloudevents("events")).unwrap();
        let row = vec![t("1"), t("2"), t("T"), t("\\x0a")];
        let event = octets.event(&txn(), &row).unwrap();
        assert_eq!(
            event.header("content-type").map(|v| &v[..]),
            Some(&b"application/octet-stream"[..])
        );
        let mut protobuf = cloudevents("events");
        protobuf.cloudevents.as_mut().unwrap().content_type = Some("application/protobuf".into());
        let event = EventLayout::new(&bytea, &protobuf)
            .unwrap()
            .event(&txn(), &row)
            .unwrap();
        assert_eq!(
            event.header("content-type").map(|v| &v[..]),
            Some(&b"application/protobuf"[..])
        );
        // No time column: the commit time.
        assert_eq!(
            event.header("ce_time").map(|v| &v[..]),
            Some(&b"2026-01-01T00:00:00.000001Z"[..])
        );
    }

    #[test]
    fn cloudevents_headers_belong_to_walrelay() {
        let rel = relation(&[
            ("aggregate_id", 25),
            ("seq_nr", 20),
            ("event_type", 25),
            ("payload", 3802),
            ("ce_id", 25),
        ]);
        let err = EventLayout::new(&rel, &cloudevents("events")).unwrap_err();
        assert!(err.to_string().contains("header \"ce_id\""), "{err}");
        // Renamed, it is any column.
        let mut renamed = cloudevents("events");
        renamed.columns.header_names = vec![("ce_id".into(), "legacy_id".into())];
        assert!(EventLayout::new(&rel, &renamed).is_ok());
        // In the default format a ce_ column is just a header.
        assert!(EventLayout::new(&rel, &mapping("events")).is_ok());
        let mut no_seq = cloudevents("events");
        no_seq.columns.seq = None;
        let err = EventLayout::new(&standard(), &no_seq).unwrap_err();
        assert!(err.to_string().contains("--seq-column"), "{err}");
    }

    #[test]
    fn a_trace_context_in_the_metadata_column_becomes_headers_when_valid() {
        let layout = EventLayout::new(&standard(), &mapping("events")).unwrap();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let row = |metadata: &str| vec![t("k"), t("1"), t("T"), t("{}"), t(metadata)];
        let event = layout
            .event(
                &txn(),
                &row(&format!(
                    r#"{{"traceparent": "{parent}", "tracestate": "rojo=00f067aa0ba902b7"}}"#
                )),
            )
            .unwrap();
        assert_eq!(
            event.header("traceparent").map(|v| &v[..]),
            Some(parent.as_bytes())
        );
        assert_eq!(
            event.header("tracestate").map(|v| &v[..]),
            Some(&b"rojo=00f067aa0ba902b7"[..])
        );
        assert_eq!(event.invalid_trace_context, None);
        // Malformed: left out, and said so; the event is built all the same.
        let event = layout
            .event(
                &txn(),
                &row(
                    r#"{"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}"#,
                ),
            )
            .unwrap();
        assert_eq!(event.header("traceparent"), None);
        assert_eq!(
            event.invalid_trace_context.map(|i| i.header),
            Some(TRACEPARENT)
        );
        // A column that is a traceparent header itself wins over the metadata.
        let rel = relation(&[
            ("aggregate_id", 25),
            ("seq_nr", 20),
            ("payload", 3802),
            ("metadata", 3802),
            ("trace_parent", 25),
        ]);
        let mut renamed = mapping("events");
        renamed.columns.header_names = vec![("trace_parent".into(), "traceparent".into())];
        let layout = EventLayout::new(&rel, &renamed).unwrap();
        let event = layout
            .event(
                &txn(),
                &vec![
                    t("k"),
                    t("1"),
                    t("{}"),
                    t(&format!(r#"{{"traceparent": "{parent}"}}"#)),
                    t("from-the-column"),
                ],
            )
            .unwrap();
        let parents: Vec<&[u8]> = event
            .headers
            .iter()
            .filter(|(n, _)| &**n == "traceparent")
            .map(|(_, v)| &v[..])
            .collect();
        assert_eq!(parents, [&b"from-the-column"[..]]);
    }

    #[test]
    fn parses_topic_templates() {
        for ok in [
            "events",
            "events.{event_type}",
            "{event_type}",
            "a-{x}_{y}.z",
        ] {
            let parsed: TopicTemplate = ok.parse().unwrap();
            assert_eq!(parsed.to_string(), ok);
        }
        assert_eq!(
            "events".parse::<TopicTemplate>().unwrap().fixed(),
            Some("events")
        );
        assert_eq!("e.{x}".parse::<TopicTemplate>().unwrap().fixed(), None);
        for bad in ["", "a{", "a}", "{}", "a{b{c}}", "bad topic", "ü"] {
            assert!(bad.parse::<TopicTemplate>().is_err(), "{bad:?} parsed");
        }
    }

    /// Days from 1970-01-01 to a proleptic Gregorian date (the inverse of
    /// `civil_from_days`, counted the plain way: whole years, then months).
    fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        // Whole 400-year cycles first (146,097 days each), then single years.
        let cycles = (year - 1970).div_euclid(400);
        let mut days = cycles * 146_097;
        let mut y = 1970 + cycles * 400;
        while y < year {
            days += if leap(y) { 366 } else { 365 };
            y += 1;
        }
        let lengths = [
            31,
            if leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        days + lengths[..usize::try_from(month - 1).unwrap()]
            .iter()
            .sum::<i64>()
            + day
            - 1
    }

    /// Reads a `commit_ts` header back into PostgreSQL microseconds.
    fn parse_commit_ts(text: &str) -> i64 {
        let (year, rest) = if text.starts_with(['+', '-']) {
            assert_eq!(&text[7..8], "-", "{text}");
            (text[..7].parse::<i64>().unwrap(), &text[8..])
        } else {
            assert_eq!(&text[4..5], "-", "{text}");
            (text[..4].parse::<i64>().unwrap(), &text[5..])
        };
        assert_eq!(rest.len(), "MM-DDTHH:MM:SS.ffffffZ".len(), "{text}");
        let n = |r: std::ops::Range<usize>| rest[r].parse::<i64>().unwrap();
        let (month, day) = (n(0..2), n(3..5));
        assert!(
            (1..=12).contains(&month) && (1..=31).contains(&day),
            "{text}"
        );
        let of_day = ((n(6..8) * 60 + n(9..11)) * 60 + n(12..14)) * 1_000_000 + n(15..21);
        (days_from_civil(year, month, day) - UNIX_TO_PG_EPOCH_DAYS) * MICROS_PER_DAY + of_day
    }

    #[test]
    fn commit_ts_reads_as_rfc3339_and_beyond_its_years_as_expanded_iso_8601() {
        let cases = [
            (0, "2000-01-01T00:00:00.000000Z"),
            (-1, "1999-12-31T23:59:59.999999Z"),
            (820_540_800_000_001, "2026-01-01T00:00:00.000001Z"),
            // 1969-12-31T23:59:59Z, before the Unix epoch.
            (-946_684_801_000_000, "1969-12-31T23:59:59.000000Z"),
            // 0000-01-01 (1 BC) and the day before it.
            (-63_113_904_000_000_000, "0000-01-01T00:00:00.000000Z"),
            (-63_113_904_000_000_001, "-000001-12-31T23:59:59.999999Z"),
            // 9999-12-31T23:59:59.999999Z and a microsecond later.
            (252_455_615_999_999_999, "9999-12-31T23:59:59.999999Z"),
            (252_455_616_000_000_000, "+010000-01-01T00:00:00.000000Z"),
            // 2000-02-29 exists, 2100-02-29 does not.
            (59 * MICROS_PER_DAY, "2000-02-29T00:00:00.000000Z"),
            (i64::MAX, "infinity"),
            (i64::MIN, "-infinity"),
        ];
        for (micros, text) in cases {
            assert_eq!(format_commit_ts(micros), text, "{micros}");
        }
        // The extremes, checked with Python's calendar shifted by 400-year cycles.
        assert_eq!(
            format_commit_ts(i64::MAX - 1),
            "+294277-01-09T04:00:54.775806Z"
        );
        assert_eq!(
            format_commit_ts(i64::MIN + 1),
            "-290278-12-22T19:59:05.224193Z"
        );
    }

    #[test]
    fn events_of_transactions_committed_before_1970_or_after_9999_are_built() {
        let layout = EventLayout::new(&standard(), &mapping("events")).unwrap();
        let row = vec![t("k"), t("1"), t("T"), t("{}"), ColumnValue::Null];
        for micros in [
            -946_684_801_000_000,
            252_455_616_000_000_000,
            i64::MIN,
            i64::MAX,
        ] {
            let event = layout
                .event(&Transaction::new(Lsn(1), micros), &row)
                .unwrap();
            assert_eq!(
                event.header(COMMIT_TS_HEADER).map(|v| &v[..]),
                Some(format_commit_ts(micros).as_bytes())
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        #[test]
        fn every_commit_ts_formats_and_reads_back(micros in proptest::prelude::any::<i64>()) {
            let text = format_commit_ts(micros);
            if micros != i64::MAX && micros != i64::MIN {
                proptest::prop_assert_eq!(parse_commit_ts(&text), micros, "{}", text);
            }
        }

        #[test]
        fn commit_ts_agrees_with_humantime_from_1970_to_9999(
            micros in -946_684_800_000_000i64..252_455_616_000_000_000,
        ) {
            let expected = humantime::format_rfc3339_micros(pg_timestamp_to_system_time(micros));
            proptest::prop_assert_eq!(format_commit_ts(micros), expected.to_string());
        }
    }

    #[test]
    fn a_template_resolves_to_the_topics_its_rows_can_name() {
        let template = |t: &str| t.parse::<TopicTemplate>().unwrap();
        assert!(template("events").can_resolve_to("events"));
        assert!(!template("events").can_resolve_to("events.dlq"));
        assert!(template("events.{event_type}").can_resolve_to("events.dlq"));
        // An empty column value leaves the literal parts alone.
        assert!(template("events.{event_type}").can_resolve_to("events."));
        assert!(!template("events.{event_type}").can_resolve_to("dlq"));
        assert!(template("{tenant}.events").can_resolve_to("acme.events"));
        assert!(template("a{x}b{y}c").can_resolve_to("a-b.b_c"));
        assert!(!template("a{x}b{y}c").can_resolve_to("a-c"));
        assert!(!template("e.{x}").can_resolve_to("e.a b"));
        assert_eq!(
            template("e.{event_type}.{aggregate_id}.{tenant}")
                .columns_besides("aggregate_id")
                .collect::<Vec<_>>(),
            ["event_type", "tenant"]
        );
        assert_eq!(
            template("e.{aggregate_id}")
                .columns_besides("aggregate_id")
                .count(),
            0
        );
        assert_eq!(
            template("e.{aggregateid}")
                .columns_besides("aggregateid")
                .count(),
            0
        );
    }

    #[test]
    fn parses_table_names() {
        let t: TableName = "events".parse().unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "events"));
        let t: TableName = "es.events".parse().unwrap();
        assert_eq!(t.to_string(), "es.events");
        for bad in ["", ".x", "x.", "a.b.c"] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?} parsed");
        }
    }
}
