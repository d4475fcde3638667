//! From a decoded Insert and its Relation to the record walrelay publishes.
//!
//! The message contract (DESIGN.md): the `aggregate_id` column is the key, the
//! `payload` column the value, every other non-NULL column a header by its
//! name, plus `lsn` (the transaction's commit LSN, `X/Y`) and `commit_ts`
//! (the commit time, RFC 3339 UTC). Columns are found by name in the latest
//! Relation message, so adding, dropping or reordering columns while
//! streaming needs nothing but that message; losing the key or payload column
//! is an error naming it.
//!
//! Values are the text PostgreSQL's output functions produce, in the session
//! settings the replication connection pins (UTF-8, ISO dates, UTC), and are
//! kept as slices of the received buffer.
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::pg::lsn::Lsn;
use crate::pg::pgoutput::{ColumnValue, Relation, TupleData, pg_timestamp_to_system_time};

/// The column whose text is the Kafka key.
pub const KEY_COLUMN: &str = "aggregate_id";
/// The column whose text is the Kafka value.
pub const VALUE_COLUMN: &str = "payload";
/// The per-aggregate sequence number column.
pub const SEQ_NR_COLUMN: &str = "seq_nr";
/// The header that carries the transaction's commit LSN.
pub const LSN_HEADER: &str = "lsn";
/// The header that carries the transaction's commit time.
pub const COMMIT_TS_HEADER: &str = "commit_ts";

/// OIDs of `json` and `jsonb`, whose text is JSON already.
const JSON_TYPE_OIDS: [u32; 2] = [114, 3802];
/// OID of `bytea`, whose text form is `\x` and hexadecimal digits.
const BYTEA_TYPE_OID: u32 = 17;

/// What the value column holds, and so how its text becomes the Kafka value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueKind {
    /// `json` or `jsonb`: the text is JSON, published as it is.
    Json,
    /// `bytea`: the bytes, which must be JSON.
    Bytea,
    /// Anything else: the text, which must be JSON.
    Text,
}
/// The longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

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

    /// The columns other than the key column that the template names: each
    /// can send the events of one aggregate to more than one topic.
    pub fn columns_besides_key(&self) -> impl Iterator<Item = &str> {
        self.columns().filter(|c| *c != KEY_COLUMN)
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

/// The events table lacks a column the contract needs.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A required column is not in the Relation message.
    #[error(
        "table {table} has no column {column:?}, which walrelay needs for {purpose}; \
         restore the column (see sql/001_events.sql) or fix --topic"
    )]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
        /// Key, value or topic.
        purpose: &'static str,
    },
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
    key: usize,
    value: usize,
    value_kind: ValueKind,
    headers: Vec<(Arc<str>, usize)>,
    topic: Vec<TopicPart>,
}

impl EventLayout {
    /// Maps `relation`'s columns by name.
    pub fn new(relation: &Relation, topic: &TopicTemplate) -> Result<Self, LayoutError> {
        let find = |column: &str, purpose: &'static str| {
            relation
                .column_index(column)
                .ok_or_else(|| LayoutError::MissingColumn {
                    table: format!("{}.{}", relation.schema(), relation.name),
                    column: column.to_owned(),
                    purpose,
                })
        };
        let key = find(KEY_COLUMN, "the Kafka key")?;
        let value = find(VALUE_COLUMN, "the Kafka value")?;
        let topic = topic
            .parts
            .iter()
            .map(|part| match part {
                Part::Literal(l) => Ok(TopicPart::Literal(l.clone())),
                Part::Column(c) => find(c, "the topic name").map(TopicPart::Column),
            })
            .collect::<Result<_, _>>()?;
        let headers = relation
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != key && *i != value)
            .map(|(i, c)| (Arc::from(c.name.as_str()), i))
            .collect();
        Ok(EventLayout {
            relation_oid: relation.oid,
            key,
            value,
            value_kind: match relation.columns[value].type_oid {
                oid if JSON_TYPE_OIDS.contains(&oid) => ValueKind::Json,
                BYTEA_TYPE_OID => ValueKind::Bytea,
                _ => ValueKind::Text,
            },
            headers,
            topic,
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

    /// The position of a header column in a row.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.headers
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, i)| *i)
    }

    /// Whether the value column's text is JSON (`json` or `jsonb`).
    pub fn value_is_json(&self) -> bool {
        self.value_kind == ValueKind::Json
    }

    /// Builds the event for one inserted row of transaction `txn`.
    pub fn event(&self, txn: &Transaction, row: &TupleData) -> Result<Event, RowError> {
        if row.len() < self.headers.len() + 2 {
            return Err(RowError::ColumnCount {
                expected: self.headers.len() + 2,
                got: row.len(),
            });
        }
        let text = |i: usize, column: &str| match &row[i] {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => Ok(Some(b.clone())),
            ColumnValue::Null => Ok(None),
            ColumnValue::UnchangedToast => Err(RowError::UnchangedToast(column.to_owned())),
        };
        let key = text(self.key, KEY_COLUMN)?.ok_or(RowError::NullKey)?;
        let value = match text(self.value, VALUE_COLUMN)? {
            None => None,
            Some(v) if self.value_kind == ValueKind::Json => Some(v),
            Some(v) => {
                let v = if self.value_kind == ValueKind::Bytea {
                    decode_bytea(&v)?
                } else {
                    v
                };
                if serde_json::from_slice::<serde::de::IgnoredAny>(&v).is_err() {
                    return Err(RowError::InvalidJson);
                }
                Some(v)
            }
        };
        let mut headers = Vec::with_capacity(self.headers.len() + 2);
        for (name, i) in &self.headers {
            if let Some(v) = text(*i, name)? {
                headers.push((Arc::clone(name), v));
            }
        }
        let topic = self.topic(row)?;
        headers.push((Arc::clone(&txn.lsn_name), txn.lsn_text.clone()));
        headers.push((Arc::clone(&txn.commit_ts_name), txn.commit_ts_text.clone()));
        Ok(Event {
            topic,
            key,
            value,
            headers,
            commit_lsn: txn.commit_lsn,
        })
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
                        return Err(RowError::TopicColumnNull);
                    }
                },
            }
        }
        if topic.is_empty() || topic.len() > MAX_TOPIC_LEN || !topic.chars().all(is_topic_char) {
            return Err(RowError::InvalidTopic(topic));
        }
        Ok(topic)
    }
}

/// A row that cannot become an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    /// The key column is NULL.
    #[error("the {KEY_COLUMN} column is NULL")]
    NullKey,
    /// An Insert never has unchanged TOAST values; this one does.
    #[error("column {0:?} arrived without its value (unchanged TOAST)")]
    UnchangedToast(String),
    /// A column named in the topic template is NULL.
    #[error("a column named in the topic template is NULL")]
    TopicColumnNull,
    /// The topic template produced a name Kafka would refuse.
    #[error("the topic template produced {0:?}, which is not a valid Kafka topic name")]
    InvalidTopic(String),
    /// The value column's text is not JSON.
    #[error("the {VALUE_COLUMN} column is not valid JSON")]
    InvalidJson,
    /// A `bytea` value column whose text is not `\x` and hexadecimal digits.
    #[error("the {VALUE_COLUMN} column is not bytea in hex format")]
    InvalidBytea,
    /// The row has fewer values than the Relation has columns.
    #[error("the row has {got} values, but the table has {expected} columns")]
    ColumnCount {
        /// From the Relation.
        expected: usize,
        /// In the row.
        got: usize,
    },
}

/// Decodes bytea's hex text form (`\x48656c6c6f`).
fn decode_bytea(text: &[u8]) -> Result<Bytes, RowError> {
    let digits = text.strip_prefix(b"\\x").ok_or(RowError::InvalidBytea)?;
    if digits.len() % 2 != 0 {
        return Err(RowError::InvalidBytea);
    }
    let nibble = |c: u8| (c as char).to_digit(16).ok_or(RowError::InvalidBytea);
    digits
        .chunks_exact(2)
        .map(|pair| Ok(u8::try_from(nibble(pair[0])? * 16 + nibble(pair[1])?).unwrap_or(0)))
        .collect::<Result<Vec<u8>, _>>()
        .map(Bytes::from)
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
    lsn_name: Arc<str>,
    lsn_text: Bytes,
    commit_ts_name: Arc<str>,
    commit_ts_text: Bytes,
}

impl Transaction {
    /// The shared part of the events of the transaction a Begin announced.
    pub fn new(commit_lsn: Lsn, commit_ts: i64) -> Self {
        let ts = format_commit_ts(commit_ts);
        Transaction {
            commit_lsn,
            commit_ts,
            lsn_name: Arc::from(LSN_HEADER),
            lsn_text: Bytes::from(commit_lsn.to_string()),
            commit_ts_name: Arc::from(COMMIT_TS_HEADER),
            commit_ts_text: Bytes::from(ts),
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
    /// The Kafka key: the aggregate ID's text.
    pub key: Bytes,
    /// The Kafka value: the payload's text, `None` when the payload is NULL.
    pub value: Option<Bytes>,
    /// Header name and value, in column order, then `lsn` and `commit_ts`.
    pub headers: Vec<(Arc<str>, Bytes)>,
    /// The commit LSN of the transaction it belongs to.
    pub commit_lsn: Lsn,
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

    #[test]
    fn maps_columns_by_name_into_key_value_and_headers() {
        let layout = EventLayout::new(&standard(), &"events".parse().unwrap()).unwrap();
        assert!(layout.value_is_json());
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
        assert_eq!(event.value.as_deref(), Some(&b"{\"a\": 1}"[..]));
        let headers: Vec<(&str, &[u8])> =
            event.headers.iter().map(|(n, v)| (&**n, &v[..])).collect();
        assert_eq!(
            headers,
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
        let layout = EventLayout::new(&rel, &"e.{tenant}".parse().unwrap()).unwrap();
        assert!(!layout.value_is_json());
        let event = layout
            .event(&txn(), &vec![t("\"p\""), t("acme"), t("k")])
            .unwrap();
        assert_eq!(
            (event.topic.as_str(), &event.key[..]),
            ("e.acme", &b"k"[..])
        );
        assert_eq!(event.header("tenant").map(|v| &v[..]), Some(&b"acme"[..]));
    }

    #[test]
    fn a_missing_required_column_is_named() {
        let rel = relation(&[("aggregate_id", 25), ("seq_nr", 20)]);
        let err = EventLayout::new(&rel, &"events".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("\"payload\""), "{err}");
        let err = EventLayout::new(&standard(), &"e.{tenant}".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("\"tenant\""), "{err}");
    }

    #[test]
    fn rows_that_cannot_be_events_are_errors() {
        let layout = EventLayout::new(&standard(), &"ev.{event_type}".parse().unwrap()).unwrap();
        let row = |key, ty| vec![key, t("1"), ty, t("{}"), t("{}")];
        assert_eq!(
            layout
                .event(&txn(), &row(ColumnValue::Null, t("X")))
                .unwrap_err(),
            RowError::NullKey
        );
        assert_eq!(
            layout
                .event(&txn(), &row(t("k"), ColumnValue::Null))
                .unwrap_err(),
            RowError::TopicColumnNull
        );
        assert!(matches!(
            layout
                .event(&txn(), &row(t("k"), t("has space")))
                .unwrap_err(),
            RowError::InvalidTopic(_)
        ));
        assert!(matches!(
            layout.event(&txn(), &vec![t("k")]).unwrap_err(),
            RowError::ColumnCount { .. }
        ));
    }

    #[test]
    fn text_and_bytea_payloads_must_be_json() {
        let text = EventLayout::new(
            &relation(&[("aggregate_id", 25), ("payload", 25)]),
            &"events".parse().unwrap(),
        )
        .unwrap();
        assert!(text.event(&txn(), &vec![t("k"), t("{\"a\": 1}")]).is_ok());
        assert_eq!(
            text.event(&txn(), &vec![t("k"), t("not json")])
                .unwrap_err(),
            RowError::InvalidJson
        );
        let bytea = EventLayout::new(
            &relation(&[("aggregate_id", 25), ("payload", 17)]),
            &"events".parse().unwrap(),
        )
        .unwrap();
        // '{"a":1}' as bytea.
        let event = bytea
            .event(&txn(), &vec![t("k"), t("\\x7b2261223a317d")])
            .unwrap();
        assert_eq!(event.value.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(
            bytea
                .event(&txn(), &vec![t("k"), t("\\x6e6f")])
                .unwrap_err(),
            RowError::InvalidJson
        );
        assert_eq!(
            bytea.event(&txn(), &vec![t("k"), t("\\xzz")]).unwrap_err(),
            RowError::InvalidBytea
        );
        assert_eq!(
            bytea.event(&txn(), &vec![t("k"), t("plain")]).unwrap_err(),
            RowError::InvalidBytea
        );
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
        let layout = EventLayout::new(&standard(), &"events".parse().unwrap()).unwrap();
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
                .columns_besides_key()
                .collect::<Vec<_>>(),
            ["event_type", "tenant"]
        );
        assert_eq!(
            template("e.{aggregate_id}").columns_besides_key().count(),
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
