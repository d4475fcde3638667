//! W3C Trace Context carried from the metadata column into Kafka headers.
//!
//! A request that writes an event often records its trace in the row's
//! metadata, `{"traceparent": "00-<trace-id>-<parent-id>-<flags>",
//! "tracestate": "vendor=value,..."}`. walrelay copies both into headers of
//! the same names, so that the trace goes on in the consumers (OpenTelemetry's
//! Kafka instrumentations read exactly these headers).
//!
//! A value is copied only when it is valid as W3C Trace Context (Level 1,
//! sections 3.2 and 3.3) defines it: a consumer that received a malformed
//! `traceparent` would have to discard it anyway, and one that received a
//! malformed `tracestate` may drop the whole trace. What is not valid is
//! left out, counted and logged without its value; it never stops the relay,
//! since the event itself is fine. Following the specification, `tracestate`
//! is copied only with a valid `traceparent`.

/// The header (and metadata key) of the trace's parent.
pub const TRACEPARENT: &str = "traceparent";
/// The header (and metadata key) of the vendors' trace state.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` walrelay copies: the length the specification
/// asks every vendor to propagate; a longer one may be cut by whole entries
/// only, which would change what its vendors read, so it is left out.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// The most list members a `tracestate` may have.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The trace context a metadata value holds, each part checked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TraceContext<'a> {
    /// A valid `traceparent` to copy.
    pub traceparent: Option<&'a str>,
    /// A valid `tracestate` to copy (only with a valid `traceparent`).
    pub tracestate: Option<&'a str>,
    /// The part that was present but not valid, if any, and why.
    pub invalid: Option<Invalid>,
}

/// A trace context value that was not copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The header it would have been: [`TRACEPARENT`] or [`TRACESTATE`].
    pub header: &'static str,
    /// Why, without the value.
    pub reason: &'static str,
}

/// The keys of a metadata object this module reads, borrowed where JSON
/// needs no unescaping.
#[derive(serde::Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    traceparent: Option<Field<'a>>,
    #[serde(borrow, default)]
    tracestate: Option<Field<'a>>,
}

/// A metadata value: a string as it is in the JSON text, or anything else
/// (which is not valid: a string with escapes included, since no valid
/// value needs one).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Field<'a> {
    Plain(&'a str),
    Other(serde::de::IgnoredAny),
}

impl<'a> Field<'a> {
    /// The string of an optional field, or why it is not valid.
    fn string(field: Option<&Field<'a>>, header: &'static str) -> Result<Option<&'a str>, Invalid> {
        match field {
            None => Ok(None),
            Some(Field::Plain(s)) => Ok(Some(s)),
            Some(Field::Other(_)) => Err(Invalid {
                header,
                reason: "is not a string without JSON escapes",
            }),
        }
    }
}

/// The trace context in `metadata`, a JSON object's text, by its top-level
/// keys `traceparent` and `tracestate`. A value that is not a JSON object,
/// or has no `traceparent`, holds none.
pub fn from_metadata(metadata: &[u8]) -> TraceContext<'_> {
    // Most metadata holds no trace: skip the parse.
    if !contains(metadata, TRACEPARENT.as_bytes()) && !contains(metadata, TRACESTATE.as_bytes()) {
        return TraceContext::default();
    }
    // An object, not an array that serde would read as the struct's fields.
    if metadata.trim_ascii_start().first() != Some(&b'{') {
        return TraceContext::default();
    }
    let Ok(parsed) = serde_json::from_slice::<Metadata<'_>>(metadata) else {
        return TraceContext::default();
    };
    let invalid = |invalid| TraceContext {
        invalid: Some(invalid),
        ..TraceContext::default()
    };
    let traceparent = match Field::string(parsed.traceparent.as_ref(), TRACEPARENT) {
        Ok(Some(value)) => value,
        // No parent: a state alone means nothing to a consumer.
        Ok(None) => return TraceContext::default(),
        Err(e) => return invalid(e),
    };
    if let Err(reason) = check_traceparent(traceparent) {
        return invalid(Invalid {
            header: TRACEPARENT,
            reason,
        });
    }
    let mut context = TraceContext {
        traceparent: Some(traceparent),
        ..TraceContext::default()
    };
    match Field::string(parsed.tracestate.as_ref(), TRACESTATE) {
        Ok(None) => {}
        Ok(Some(state)) => match check_tracestate(state) {
            Ok(()) => context.tracestate = Some(state),
            Err(reason) => {
                context.invalid = Some(Invalid {
                    header: TRACESTATE,
                    reason,
                });
            }
        },
        Err(e) => context.invalid = Some(e),
    }
    context
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks a `traceparent`: `version-traceid-parentid-flags`, lower-case
/// hexadecimal of 2, 32, 16 and 2 digits; version `ff` is invalid, and so
/// are all-zero IDs. Version `00` is exactly 55 characters; a later version
/// may be longer, with what follows the flags behind a `-` (Level 1, 3.2.4).
pub fn check_traceparent(value: &str) -> Result<(), &'static str> {
    const LEN: usize = 55;
    if value.len() < LEN || !value.is_ascii() {
        return Err("is shorter than 55 characters or not ASCII");
    }
    let (version, trace_id, parent_id, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = [2, 35, 52].iter().all(|&i| value.as_bytes()[i] == b'-');
    if !dashes
        || !is_lower_hex(version)
        || !is_lower_hex(trace_id)
        || !is_lower_hex(parent_id)
        || !is_lower_hex(flags)
    {
        return Err("is not version-traceid-parentid-flags in lower-case hexadecimal");
    }
    if version == "ff" {
        return Err("has version ff, which is invalid");
    }
    if version == "00" && value.len() != LEN {
        return Err("is version 00 but longer than 55 characters");
    }
    if value.len() > LEN && value.as_bytes()[LEN] != b'-' {
        return Err("has more after the flags without a '-'");
    }
    if trace_id.bytes().all(|b| b == b'0') {
        return Err("has an all-zero trace-id");
    }
    if parent_id.bytes().all(|b| b == b'0') {
        return Err("has an all-zero parent-id");
    }
    Ok(())
}

/// Checks a `tracestate`: at most 512 characters (see
/// [`MAX_TRACESTATE_LEN`]), at most 32 comma-separated `key=value` members
/// (empty ones allowed, spaces and tabs around the commas), keys unique,
/// each key and value as Level 1, 3.3.1.3 defines them.
pub fn check_tracestate(value: &str) -> Result<(), &'static str> {
    if value.len() > MAX_TRACESTATE_LEN {
        return Err("is longer than 512 characters");
    }
    let mut keys: Vec<&str> = Vec::new();
    for member in value.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let Some((key, val)) = member.split_once('=') else {
            return Err("has a list member that is not key=value");
        };
        if !is_tracestate_key(key) {
            return Err("has an invalid key");
        }
        if !is_tracestate_value(val) {
            return Err("has an invalid value");
        }
        if keys.contains(&key) {
            return Err("has a key twice");
        }
        keys.push(key);
        if keys.len() > MAX_TRACESTATE_MEMBERS {
            return Err("has more than 32 list members");
        }
    }
    Ok(())
}

/// `lcalpha / DIGIT / "_" / "-" / "*" / "/"`.
fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// A simple key (`lcalpha` then up to 255 key characters) or a
/// multi-tenant one (`tenant@system`: a tenant of a letter or digit then up
/// to 240 key characters, a system of a letter then up to 13).
fn is_tracestate_key(key: &str) -> bool {
    let part = |s: &str, first: fn(u8) -> bool, max_rest: usize| {
        let b = s.as_bytes();
        !b.is_empty()
            && first(b[0])
            && b.len() - 1 <= max_rest
            && b[1..].iter().all(|&c| is_key_char(c))
    };
    match key.split_once('@') {
        None => part(key, |b| b.is_ascii_lowercase(), 255),
        Some((tenant, system)) => {
            part(
                tenant,
                |b| b.is_ascii_lowercase() || b.is_ascii_digit(),
                240,
            ) && part(system, |b| b.is_ascii_lowercase(), 13)
        }
    }
}

/// Up to 256 printable ASCII characters but `,` and `=`, the last not a space.
fn is_tracestate_value(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b[b.len() - 1] != b' '
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_accepted() {
        for ok in [
            VALID,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            // A later version may carry more, behind a dash.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
            "fe-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
        ] {
            assert_eq!(check_traceparent(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for (bad, why) in [
            ("", "shorter"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                "shorter",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "lower-case",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "lower-case",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                "lower-case",
            ),
            (
                "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "lower-case",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "all-zero trace-id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "all-zero parent-id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "longer than 55",
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                "without a '-'",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0ü",
                "not ASCII",
            ),
        ] {
            let err = check_traceparent(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tracestate_follows_the_list_rules() {
        for ok in [
            "",
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            " rojo=1 ,\tcongo=2\t",
            "a=1,,b=2",
            // Spaces around the commas are no part of the value.
            "k=v ,j=a b ",
            "fw529a3039@dt=ZmYzYzYz,3@x-y_z*/=a b~!",
            &format!("a{}=v", "b".repeat(255)),
            &format!("{}@{}=v", "t".repeat(241), "s".repeat(14)),
            &format!("k={}", "v".repeat(256)),
            &(0..32)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(","),
        ] {
            assert_eq!(check_tracestate(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("congo", "not key=value"),
            ("Congo=1", "invalid key"),
            ("1congo=1", "invalid key"),
            ("a b=1", "invalid key"),
            (&format!("a{}=v", "b".repeat(256)), "invalid key"),
            (&format!("{}@s=v", "t".repeat(242)), "invalid key"),
            (&format!("t@{}=v", "s".repeat(15)), "invalid key"),
            ("t@1s=v", "invalid key"),
            ("k=", "invalid value"),
            ("k=a=b", "invalid value"),
            ("k=caf\u{e9}", "invalid value"),
            (&format!("k={}", "v".repeat(257)), "invalid value"),
            ("k=1,k=2", "twice"),
            (
                &(0..33)
                    .map(|i| format!("k{i}=v"))
                    .collect::<Vec<_>>()
                    .join(","),
                "more than 32",
            ),
            (
                &format!("k={},j=1", "v".repeat(256)).repeat(2),
                "longer than 512",
            ),
        ] {
            let err = check_tracestate(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let exactly_512 = format!("a={},b={}", "v".repeat(254), "w".repeat(253));
        assert_eq!(exactly_512.len(), 512);
        assert_eq!(check_tracestate(&exactly_512), Ok(()));
        assert!(check_tracestate(&format!("{exactly_512}x")).is_err());
    }

    #[test]
    fn the_metadata_column_gives_a_checked_trace_context() {
        let meta = |json: &str| {
            let context = from_metadata(json.as_bytes());
            (
                context.traceparent.map(str::to_owned),
                context.tracestate.map(str::to_owned),
                context.invalid,
            )
        };
        let parent = Some(VALID.to_owned());
        assert_eq!(
            meta(&format!(
                r#"{{"user": "ada", "traceparent": "{VALID}", "tracestate": "rojo=1"}}"#
            )),
            (parent.clone(), Some("rojo=1".to_owned()), None)
        );
        assert_eq!(
            meta(&format!(r#"{{"traceparent": "{VALID}"}}"#)),
            (parent.clone(), None, None)
        );
        // Nothing to copy, nothing wrong.
        for none in [
            "{}",
            "null",
            "not json",
            r#"{"user": "ada"}"#,
            r#"["traceparent"]"#,
            r#"{"nested": {"traceparent": "x"}}"#,
            r#"{"tracestate": "rojo=1"}"#,
        ] {
            assert_eq!(meta(none), (None, None, None), "{none}");
        }
        let invalid = |header, reason| Some(Invalid { header, reason });
        assert_eq!(
            meta(r#"{"traceparent": "00-xyz", "tracestate": "rojo=1"}"#),
            (
                None,
                None,
                invalid(TRACEPARENT, "is shorter than 55 characters or not ASCII")
            ),
            "no state without a valid parent"
        );
        assert_eq!(
            meta(r#"{"traceparent": 42}"#),
            (
                None,
                None,
                invalid(TRACEPARENT, "is not a string without JSON escapes")
            )
        );
        assert_eq!(
            meta(
                r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-\u0030\u0031"}"#
            ),
            (
                None,
                None,
                invalid(TRACEPARENT, "is not a string without JSON escapes")
            )
        );
        assert_eq!(
            meta(&format!(
                r#"{{"traceparent": "{VALID}", "tracestate": "Bad=1"}}"#
            )),
            (parent, None, invalid(TRACESTATE, "has an invalid key")),
            "a valid parent goes without the malformed state"
        );
    }
}
