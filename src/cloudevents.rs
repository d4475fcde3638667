//! `--format cloudevents`: records in CloudEvents' Kafka protocol binding,
//! binary content mode (CloudEvents 1.0, kafka-protocol-binding.md, 3.2).
//!
//! In binary mode the Kafka value is the event's data and every attribute is
//! a header named `ce_<attribute>`, its value the attribute's string form in
//! UTF-8; `datacontenttype` is the `content-type` header. So a record keeps
//! walrelay's value (the payload as the table holds it) and key, and gains:
//!
//! | header | attribute | from |
//! |---|---|---|
//! | `ce_specversion` | specversion | `1.0` |
//! | `ce_id` | id | `<key>:<sequence>`, the same on every replay of the row |
//! | `ce_source` | source | `--cloudevents-source`, by default `/walrelay/<database>/<schema>.<table>` |
//! | `ce_type` | type | the type column |
//! | `ce_time` | time | the time column (`recorded_at`) as RFC 3339, else the commit time |
//! | `content-type` | datacontenttype | by what the value is, or `--cloudevents-content-type` |
//!
//! The headers of the default format (the other columns, `lsn`,
//! `commit_ts`) stay, so consumers that deduplicate on `seq_nr` are not
//! disturbed: the binding lets a record carry headers that are no attributes.

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::event::{TableName, ValueKind};

/// The CloudEvents version walrelay speaks.
pub const SPEC_VERSION: &str = "1.0";
/// The header of `specversion`.
pub const SPEC_VERSION_HEADER: &str = "ce_specversion";
/// The header of `id`.
pub const ID_HEADER: &str = "ce_id";
/// The header of `source`.
pub const SOURCE_HEADER: &str = "ce_source";
/// The header of `type`.
pub const TYPE_HEADER: &str = "ce_type";
/// The header of `time`.
pub const TIME_HEADER: &str = "ce_time";
/// The header of `datacontenttype`.
pub const CONTENT_TYPE_HEADER: &str = "content-type";
/// The prefix of every attribute's header, which no column may take.
pub const ATTRIBUTE_PREFIX: &str = "ce_";

/// The attributes walrelay takes from its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudEvents {
    /// `source`: a URI-reference naming where the events come from.
    pub source: String,
    /// `datacontenttype`, when not the one the value's kind implies.
    pub content_type: Option<String>,
}

impl CloudEvents {
    /// The `datacontenttype` of values of `kind`: JSON is
    /// `application/json`, text `text/plain; charset=utf-8`, and bytes
    /// `application/octet-stream` (walrelay cannot know whether they are
    /// Protobuf, Avro or anything else: `--cloudevents-content-type` says).
    pub fn content_type(&self, kind: ValueKind) -> &str {
        self.content_type.as_deref().unwrap_or(match kind {
            ValueKind::Json => "application/json",
            ValueKind::Text => "text/plain; charset=utf-8",
            ValueKind::Binary => "application/octet-stream",
        })
    }
}

/// Characters escaped in one segment of the default source's path: those a
/// URI path segment may not hold as they are.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The default `source`: `/walrelay/<database>/<schema>.<table>`, each
/// segment percent-encoded, so two databases or tables never share one.
pub fn default_source(database: &str, table: &TableName) -> String {
    format!(
        "/walrelay/{}/{}",
        utf8_percent_encode(database, SEGMENT),
        utf8_percent_encode(&table.to_string(), SEGMENT)
    )
}

/// Whether `source` can be a `source` attribute: a non-empty URI-reference,
/// here printable ASCII without spaces (a URI-reference has none; anything
/// else must be percent-encoded).
pub fn is_valid_source(source: &str) -> bool {
    !source.is_empty() && source.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `content_type` can be a `content-type` header: a media type,
/// printable ASCII (spaces allowed after the type).
pub fn is_valid_content_type(content_type: &str) -> bool {
    content_type.contains('/')
        && content_type
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
        && !content_type.starts_with(' ')
}

/// The RFC 3339 form of a PostgreSQL `timestamptz` or `timestamp` text in
/// ISO style (`2026-11-25 10:18:50.968738+00`, what the replication and
/// snapshot sessions' `DateStyle=ISO, TimeZone=UTC` produce; a `timestamp`
/// without time zone is taken as UTC): `2026-11-25T10:18:50.968738Z`.
/// `None` for what RFC 3339 cannot express: `infinity`, years BC or past
/// 9999, an offset with seconds; and for any other type's text.
pub fn rfc3339_from_pg(text: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(text).ok()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    // YYYY-MM-DD HH:MM:SS, by position.
    if text.len() < 19 || !text.is_char_boundary(19) {
        return None;
    }
    let (date_time, rest) = text.split_at(19);
    let b = date_time.as_bytes();
    let shape = [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b' '
        && [13, 16].iter().all(|&i| b[i] == b':')
        && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19]
            .into_iter()
            .all(|r| digits(&date_time[r]));
    if !shape {
        return None;
    }
    let mut out = String::with_capacity(32);
    out.push_str(&date_time[..10]);
    out.push('T');
    out.push_str(&date_time[11..]);
    let offset_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (fraction, offset) = rest.split_at(offset_at);
    if !fraction.is_empty() {
        let digits_part = fraction.strip_prefix('.')?;
        if !digits(digits_part) {
            return None;
        }
        out.push_str(fraction);
    }
    match offset.len() {
        // timestamp without time zone: UTC, as the session's TimeZone.
        0 => out.push('Z'),
        3 if digits(&offset[1..]) => {
            if &offset[1..] == "00" {
                out.push('Z');
            } else {
                let _ = write!(out, "{offset}:00");
            }
        }
        6 if digits(&offset[1..3]) && &offset[3..4] == ":" && digits(&offset[4..]) => {
            out.push_str(offset);
        }
        // Seconds in the offset (local mean times before 1900), " BC", text.
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_timestamps_read_as_rfc3339() {
        for (pg, rfc) in [
            (
                "2026-11-25 10:18:50.968738+00",
                "2026-11-25T10:18:50.968738Z",
            ),
            ("2026-11-25 10:18:50+00", "2026-11-25T10:18:50Z"),
            ("2026-11-25 10:18:50.5+00", "2026-11-25T10:18:50.5Z"),
            ("2026-11-25 10:18:50.5", "2026-11-25T10:18:50.5Z"),
            ("2026-11-25 10:18:50-03", "2026-11-25T10:18:50-03:00"),
            ("2026-11-25 10:18:50+05:30", "2026-11-25T10:18:50+05:30"),
            ("0099-01-01 00:00:00+00", "0099-01-01T00:00:00Z"),
        ] {
            assert_eq!(rfc3339_from_pg(pg.as_bytes()).as_deref(), Some(rfc), "{pg}");
        }
        for not in [
            "infinity",
            "-infinity",
            "0044-03-15 00:00:00+00 BC",
            "10000-01-01 00:00:00+00",
            "1850-01-01 00:00:00+00:53:28",
            "2026-11-25",
            "10:18:50",
            "2026-11-25T10:18:50Z",
            "2026-11-25 10:18:50.+00",
            "2026-11-25 10:18:50+0",
            "2026-11-25 1ü:18:50+00",
            "yesterday",
            "",
        ] {
            assert_eq!(rfc3339_from_pg(not.as_bytes()), None, "{not}");
        }
    }

    #[test]
    fn the_default_source_names_the_database_and_table() {
        let table = |t: &str| t.parse::<TableName>().unwrap();
        assert_eq!(
            default_source("shop", &table("public.events")),
            "/walrelay/shop/public.events"
        );
        assert_eq!(
            default_source("my db/1", &table("es.Ev?nts")),
            "/walrelay/my%20db%2F1/es.Ev%3Fnts"
        );
        assert!(is_valid_source(&default_source("my db/1", &table("x"))));
        assert!(is_valid_source("https://shop.example/orders"));
        for bad in ["", "a b", "ü", "a\n"] {
            assert!(!is_valid_source(bad), "{bad:?}");
        }
    }

    #[test]
    fn content_types_follow_the_value_unless_told() {
        let ce = CloudEvents {
            source: "/s".into(),
            content_type: None,
        };
        assert_eq!(ce.content_type(ValueKind::Json), "application/json");
        assert_eq!(
            ce.content_type(ValueKind::Text),
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            ce.content_type(ValueKind::Binary),
            "application/octet-stream"
        );
        let protobuf = CloudEvents {
            content_type: Some("application/protobuf".into()),
            ..ce
        };
        assert_eq!(
            protobuf.content_type(ValueKind::Binary),
            "application/protobuf"
        );
        for ok in ["application/json", "text/plain; charset=utf-8"] {
            assert!(is_valid_content_type(ok), "{ok}");
        }
        for bad in ["", "json", " a/b", "a/b\n", "a/ü"] {
            assert!(!is_valid_content_type(bad), "{bad:?}");
        }
    }
}
