//! The librdkafka producer properties the user passes through
//! (`--kafka-property`, `WALRELAY_KAFKA_PROPERTY`, `[kafka_properties]` of
//! the configuration file): taken as given, checked, and never shown with a
//! secret in them.
//!
//! librdkafka takes any of its properties by name. Most tune the producer;
//! a few matter beyond that, and each kind is handled on purpose:
//! - those that would break walrelay's guarantees (`acks`,
//!   `enable.idempotence`, ...) are refused;
//! - secrets (`sasl.password`, `ssl.key.pem`, anything named like a password
//!   or secret): their values appear in no `Debug` output and no error;
//! - those that load code into walrelay or run commands
//!   (`plugin.library.paths`, `sasl.kerberos.kinit.cmd`, ...) are refused
//!   unless `--allow-unsafe-kafka-property NAME` names them;
//! - those that weaken TLS (`enable.ssl.certificate.verification=false`, ...)
//!   are allowed, and reported: a warning at start, a finding of `check`.
//!
//! Values are never trimmed: a password may end in a space. Property names
//! are case-sensitive, as librdkafka matches them; the values of its boolean
//! and enumerated properties are not, so neither are the checks below.
use std::collections::BTreeMap;
use std::fmt;

use rdkafka::error::KafkaError;
use serde::Deserialize;

/// What stands in for a secret wherever a value could be printed.
pub const REDACTED: &str = "********";

/// A property whose other values would break walrelay's guarantees.
struct Guard {
    /// Its name, or one of librdkafka's aliases for it.
    name: &'static str,
    /// The values that keep the guarantees (compared without case).
    allowed: &'static [&'static str],
    /// Why the others are refused.
    why: &'static str,
}

/// Why a finite message timeout is refused.
const MESSAGE_TIMEOUT: &str = "a message timeout makes the producer give up on an event, which \
    walrelay never does: during a broker outage longer than the timeout, events would be refused \
    and (with --on-poison dead-letter) replaced by dead-letter records while they never reached \
    the topic, and librdkafka's gap-less guarantee does not cover timeouts, so a later event of an \
    aggregate could be delivered before an earlier one that timed out. 0 (the default) retries \
    for ever: an outage delays events (walrelay_inflight_events and walrelay_source_lag_bytes \
    show it), it never drops them";

/// The property that makes a refused batch a fatal producer error, so that
/// nothing behind it is sent; walrelay sets it with `--on-poison halt`.
pub const GAPLESS: &str = "enable.gapless.guarantee";

/// Settings that would break walrelay's guarantees, with why.
const GUARDS: &[Guard] = &[
    Guard {
        name: "acks",
        allowed: &["all", "-1"],
        why: "only acks=all (or -1) makes an acknowledgement mean the event is safe",
    },
    Guard {
        // librdkafka's name for acks, of which `acks` is the alias.
        name: "request.required.acks",
        allowed: &["all", "-1"],
        why: "only acks=all (or -1) makes an acknowledgement mean the event is safe",
    },
    Guard {
        name: "enable.idempotence",
        allowed: &["true"],
        why: "without idempotence, retries can reorder or duplicate events within an aggregate",
    },
    Guard {
        name: "delivery.report.only.error",
        allowed: &["false"],
        why: "walrelay confirms the slot from the delivery reports of successful events",
    },
    // murmur2 and murmur2_random differ only for a NULL key, which walrelay
    // never sends (a NULL aggregate_id is a poison row); an empty key hashes
    // the same under both.
    Guard {
        name: "partitioner",
        allowed: &["murmur2_random", "murmur2"],
        why: "each aggregate must stay in the one partition its earlier events went to, the one \
              the Java client and Kafka Streams choose for its key (murmur2); random spreads an \
              aggregate over partitions, consistent_random does so for an empty aggregate_id, and \
              any other hash moves aggregates to other partitions, where consumers see their \
              events out of order",
    },
    // librdkafka's default is 300000 (five minutes); walrelay's is 0.
    Guard {
        name: "message.timeout.ms",
        allowed: &["0"],
        why: MESSAGE_TIMEOUT,
    },
    Guard {
        // An alias of message.timeout.ms.
        name: "delivery.timeout.ms",
        allowed: &["0"],
        why: MESSAGE_TIMEOUT,
    },
    Guard {
        name: "queuing.strategy",
        allowed: &["fifo"],
        why: "lifo sends later events of an aggregate before earlier ones",
    },
];

/// Properties that load code into walrelay or run commands (librdkafka's
/// CONFIGURATION.md), with what they do. Whoever can set them can run
/// anything as walrelay, with its credentials at hand.
pub const UNSAFE: &[(&str, &str)] = &[
    (
        "plugin.library.paths",
        "loads shared libraries into walrelay (as soon as it is set)",
    ),
    (
        "sasl.kerberos.kinit.cmd",
        "runs a shell command, when the producer starts and periodically",
    ),
    (
        "ssl.engine.location",
        "loads an OpenSSL engine, a shared library, into walrelay",
    ),
    (
        "ssl.providers",
        "loads OpenSSL providers, which may be shared libraries from any path",
    ),
];

/// Whether `key`'s value is a secret: librdkafka's sensitive properties
/// (`sasl.password`, `ssl.key.password`, `ssl.keystore.password`,
/// `ssl.key.pem`, `sasl.oauthbearer.client.secret`,
/// `sasl.oauthbearer.config`, ...) and anything named like one.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "passphrase", "credential", "token"]
        .iter()
        .any(|word| key.contains(word))
        || std::path::Path::new(&key)
            .extension()
            .is_some_and(|e| e == "pem")
        || key == "sasl.oauthbearer.config"
}

/// A value that names the file holding it: `file:/run/secrets/kafka`.
pub const FILE_PREFIX: &str = "file:";
/// A value taken as it stands after this prefix, so that one may begin with
/// `file:` (`literal:file:x` is `file:x`).
pub const LITERAL_PREFIX: &str = "literal:";

/// The logical lines of a Java properties text, as
/// `java.util.Properties.load` reads them, each as (line number where it
/// begins, key, value):
/// - natural lines end in `\n`, `\r` or `\r\n`; one that ends in an odd
///   number of backslashes goes on in the next, whose leading blanks are
///   dropped;
/// - a line whose first non-blank character is `#` or `!` is a comment (it
///   does not go on), a blank line is skipped;
/// - the key ends at the first unescaped `=`, `:` or blank; blanks, then one
///   `=` or `:`, then blanks separate it from the value, which keeps
///   trailing blanks;
/// - in keys and values, `\t`, `\n`, `\r`, `\f` and `\uXXXX` are escapes,
///   and a backslash before any other character stands for that character.
///
/// Errors name the line, never its text.
pub fn parse_properties(text: &str) -> Result<Vec<(usize, String, String)>, PropertyError> {
    let blank = |c: char| matches!(c, ' ' | '\t' | '\u{c}');
    let mut natural = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\n', '\r']).unwrap_or(rest.len());
        natural.push(&rest[..end]);
        rest = &rest[end..];
        if let Some(after) = rest.strip_prefix("\r\n") {
            rest = after;
        } else if !rest.is_empty() {
            rest = &rest[1..];
        }
    }
    let mut found = Vec::new();
    let mut lines = natural.into_iter().enumerate();
    while let Some((index, line)) = lines.next() {
        let trimmed = line.trim_start_matches(blank);
        if trimmed.is_empty() || trimmed.starts_with(['#', '!']) {
            continue;
        }
        let mut logical = String::new();
        let mut part = trimmed;
        loop {
            let trailing = part.len() - part.trim_end_matches('\\').len();
            if trailing % 2 == 0 {
                logical.push_str(part);
                break;
            }
            logical.push_str(&part[..part.len() - 1]);
            match lines.next() {
                Some((_, next)) => part = next.trim_start_matches(blank),
                None => break,
            }
        }
        let line_number = index + 1;
        let (key, value) = split_property(&logical, blank);
        let unescape = |raw: &str| {
            unescape(raw).ok_or(PropertyError::PropertiesFile {
                origin: Origin::PropertiesFile(line_number),
                what: "a malformed \\uXXXX escape",
            })
        };
        found.push((line_number, unescape(key)?, unescape(value)?));
    }
    Ok(found)
}

/// Splits a logical line into its raw (still escaped) key and value.
fn split_property(line: &str, blank: impl Fn(char) -> bool) -> (&str, &str) {
    let mut escaped = false;
    let mut key_end = line.len();
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '=' || c == ':' || blank(c) {
            key_end = i;
            break;
        }
    }
    let key = &line[..key_end];
    let mut value = line[key_end..].trim_start_matches(&blank);
    if let Some(after) = value.strip_prefix(['=', ':']) {
        value = after.trim_start_matches(&blank);
    }
    (key, value)
}

/// Resolves the escapes of a key or value; `None` for a malformed `\u`.
fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // A lone backslash at the very end stands for nothing.
            None => {}
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if hex.len() != 4 {
                    return None;
                }
                let unit = u16::from_str_radix(&hex, 16).ok()?;
                // A surrogate pair is two escapes in a row.
                if (0xD800..0xDC00).contains(&unit) {
                    let low = chars.as_str().strip_prefix("\\u")?.get(..4)?;
                    let low = u16::from_str_radix(low, 16).ok()?;
                    for _ in 0..6 {
                        chars.next();
                    }
                    out.push(char::decode_utf16([unit, low]).next()?.ok()?);
                } else {
                    out.push(char::from_u32(u32::from(unit))?);
                }
            }
            Some(other) => out.push(other),
        }
    }
    Some(out)
}

/// Splits `key=value` at the first `=`: the key loses surrounding blanks and
/// must look like a property name (letters, digits, `.`, `_`, `-`), the
/// value is kept exactly. A name of other characters is most likely a
/// mistyped separator with part of the value in it (`sasl.password:x=y`).
fn split(pair: &str) -> Option<(&str, &str)> {
    let (key, value) = pair.split_once('=')?;
    let key = key.trim();
    let name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    (!key.is_empty() && key.bytes().all(name)).then_some((key, value))
}

/// Where a property came from, so that an error can point at it without
/// quoting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The n-th `--kafka-property` flag (from 1).
    Flag(usize),
    /// Line n of `WALRELAY_KAFKA_PROPERTY` (from 1).
    Environment(usize),
    /// `[kafka_properties]` of the configuration file.
    File,
    /// Line n of `--kafka-properties-file` (from 1; where the property begins).
    PropertiesFile(usize),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(n) => write!(f, "--kafka-property (occurrence {n})"),
            Origin::Environment(n) => write!(f, "WALRELAY_KAFKA_PROPERTY (line {n})"),
            Origin::File => f.write_str("[kafka_properties] of --config"),
            Origin::PropertiesFile(n) => write!(f, "--kafka-properties-file (line {n})"),
        }
    }
}

/// A producer property that cannot be used. No variant holds a value.
#[derive(Debug, thiserror::Error)]
pub enum PropertyError {
    /// Not `key=value`.
    #[error(
        "{origin}: expected key=value with a property name as key (the text is not shown: it may hold a secret)"
    )]
    Syntax {
        /// Where it came from.
        origin: Origin,
    },
    /// A property that would break the guarantees.
    #[error("--kafka-property {key}: not allowed but as {allowed}: {why}")]
    Forbidden {
        /// The property.
        key: String,
        /// The values allowed.
        allowed: String,
        /// Why.
        why: &'static str,
    },
    /// A property that loads code or runs a command, not allowed by name.
    #[error(
        "--kafka-property {key}: {what}; walrelay refuses it unless you mean it: --allow-unsafe-kafka-property {key}"
    )]
    Unsafe {
        /// The property.
        key: String,
        /// What it does.
        what: &'static str,
    },
    /// `--allow-unsafe-kafka-property` naming a property that needs no allowance.
    #[error(
        "--allow-unsafe-kafka-property {name}: not one of the properties that need it ({})",
        unsafe_names()
    )]
    NotGated {
        /// The name given.
        name: String,
    },
    /// A `--kafka-properties-file` line that is not a property.
    #[error("{origin}: {what} (the text is not shown: it may hold a secret)")]
    PropertiesFile {
        /// Where.
        origin: Origin,
        /// What is wrong.
        what: &'static str,
    },
    /// librdkafka refused a property (an unknown name, a bad value).
    #[error("--kafka-property {key}: {reason}")]
    Rejected {
        /// The property.
        key: String,
        /// librdkafka's words, without the value.
        reason: String,
    },
}

fn unsafe_names() -> String {
    UNSAFE
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The properties given, by name: later ones win. `Debug` redacts secrets.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if is_secret(k) { REDACTED } else { v.as_str() })),
            )
            .finish()
    }
}

impl KafkaProperties {
    /// Parses `key=value` texts. The key loses surrounding blanks; the value
    /// is kept exactly (everything after the first `=`).
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (Origin, &'a str)>,
    ) -> Result<Self, PropertyError> {
        let mut properties = KafkaProperties::default();
        for (origin, pair) in pairs {
            let (key, value) = split(pair).ok_or(PropertyError::Syntax { origin })?;
            properties.insert(key.to_owned(), value.to_owned())?;
        }
        Ok(properties)
    }

    /// The lines of `WALRELAY_KAFKA_PROPERTY`: one `key=value` per line
    /// (a `\r` before the newline is dropped, empty lines are skipped).
    pub fn parse_lines(text: &str) -> Result<Self, PropertyError> {
        Self::parse(
            text.split('\n')
                .map(|line| line.strip_suffix('\r').unwrap_or(line))
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(i, line)| (Origin::Environment(i + 1), line)),
        )
    }

    /// Checks properties read from the configuration file as the others.
    pub fn checked(self) -> Result<Self, PropertyError> {
        let mut properties = KafkaProperties::default();
        for (key, value) in self.0 {
            properties.insert(key, value)?;
        }
        Ok(properties)
    }

    fn insert(&mut self, key: String, value: String) -> Result<(), PropertyError> {
        if let Some(guard) = GUARDS.iter().find(|g| g.name == key) {
            if !guard.allowed.iter().any(|a| value.eq_ignore_ascii_case(a)) {
                let (allowed, why) = (guard.allowed.join(" or "), guard.why);
                return Err(PropertyError::Forbidden { key, allowed, why });
            }
        }
        self.0.insert(key, value);
        Ok(())
    }

    /// Refuses what breaks `--on-poison halt`'s promise when `halting`:
    /// `enable.gapless.guarantee=false` (librdkafka's bool forms: `false`,
    /// `f`, `0`) would let events queued behind a refused one reach the
    /// broker before it.
    pub fn check_halt_mode(&self, halting: bool) -> Result<(), PropertyError> {
        let off = self.get(GAPLESS).is_some_and(|v| {
            ["false", "f", "0"]
                .iter()
                .any(|x| v.eq_ignore_ascii_case(x))
        });
        if halting && off {
            return Err(PropertyError::Forbidden {
                key: GAPLESS.to_owned(),
                allowed: "true (walrelay's setting with --on-poison halt)".to_owned(),
                why: "with --on-poison halt, a refused event must stop the producer before \
                      anything queued behind it reaches the broker, or the first deliveries of \
                      an aggregate come out of seq_nr order across the halt and the restart",
            });
        }
        Ok(())
    }

    /// Adds `other`'s properties, which win.
    pub fn extend(&mut self, other: KafkaProperties) {
        self.0.extend(other.0);
    }

    /// A property's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every property, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether none is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any property holds a secret (a secret one whose value is
    /// not a `file:` reference to where the secret is).
    pub fn holds_secret(&self) -> bool {
        self.0
            .iter()
            .any(|(k, v)| is_secret(k) && !v.starts_with(FILE_PREFIX))
    }

    /// The properties of a `--kafka-properties-file` (Java properties format,
    /// as Kafka's own `client.properties`): see [`parse_properties`].
    pub fn parse_properties_file(text: &str) -> Result<Self, PropertyError> {
        let mut properties = KafkaProperties::default();
        for (line, key, value) in parse_properties(text)? {
            let key = key.trim().to_owned();
            let name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
            if key.is_empty() || !key.bytes().all(name) {
                return Err(PropertyError::PropertiesFile {
                    origin: Origin::PropertiesFile(line),
                    what: "expected a property name (letters, digits, '.', '_', '-')",
                });
            }
            properties.insert(key, value)?;
        }
        Ok(properties)
    }

    /// Replaces each value by what `resolve` makes of it (`None`: unchanged).
    pub fn resolve<E>(
        &mut self,
        mut resolve: impl FnMut(&str, &str) -> Result<Option<String>, E>,
    ) -> Result<(), E> {
        for (key, value) in &mut self.0 {
            if let Some(resolved) = resolve(key, value)? {
                *value = resolved;
            }
        }
        Ok(())
    }

    /// Refuses a property that loads code or runs a command unless `allowed`
    /// names it; returns the ones allowed and set, with what they do.
    pub fn check_unsafe(
        &self,
        allowed: &[String],
    ) -> Result<Vec<(&'static str, &'static str)>, PropertyError> {
        if let Some(name) = allowed
            .iter()
            .find(|name| !UNSAFE.iter().any(|(u, _)| u == name))
        {
            return Err(PropertyError::NotGated { name: name.clone() });
        }
        let mut used = Vec::new();
        for (name, what) in UNSAFE {
            if !self.0.contains_key(*name) {
                continue;
            }
            if !allowed.iter().any(|a| a == name) {
                return Err(PropertyError::Unsafe {
                    key: (*name).to_owned(),
                    what,
                });
            }
            used.push((*name, *what));
        }
        Ok(used)
    }

    /// The settings that weaken the broker connection's protection, each with
    /// its fix.
    pub fn weakenings(&self) -> Vec<Weakening> {
        let mut found = Vec::new();
        let is = |key: &str, values: &[&str]| {
            self.get(key)
                .is_some_and(|v| values.iter().any(|x| v.eq_ignore_ascii_case(x)))
        };
        if is("enable.ssl.certificate.verification", &["false", "f", "0"]) {
            found.push(Weakening {
                setting: "enable.ssl.certificate.verification=false",
                risk: "the broker's certificate is not verified: anyone on the network path can pose as the broker and read every event and the SASL credentials",
                fix: "remove it, and point ssl.ca.location at the CA that signed the brokers' certificates",
            });
        }
        if is("ssl.endpoint.identification.algorithm", &["none"]) {
            found.push(Weakening {
                setting: "ssl.endpoint.identification.algorithm=none",
                risk: "the broker's host name is not checked against its certificate: any certificate of the CA passes for any broker",
                fix: "remove it (the default, https, checks the host name)",
            });
        }
        let sasl = [
            "sasl.username",
            "sasl.password",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.client.credentials.client.secret",
        ]
        .iter()
        .any(|k| self.0.contains_key(*k));
        // librdkafka's default is plaintext.
        let protocol = self.get("security.protocol").unwrap_or("plaintext");
        if sasl && protocol.eq_ignore_ascii_case("sasl_plaintext") {
            found.push(Weakening {
                setting: "security.protocol=sasl_plaintext",
                risk: "SASL credentials go to the broker without TLS (a PLAIN password in clear), and so does every event",
                fix: "security.protocol=sasl_ssl",
            });
        } else if sasl && protocol.eq_ignore_ascii_case("plaintext") {
            found.push(Weakening {
                setting: "security.protocol=plaintext",
                risk: "SASL credentials are set, but the connection uses neither TLS nor SASL: every event goes in clear to whoever answers",
                fix: "security.protocol=sasl_ssl",
            });
        }
        found
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (key, value) in &self.0 {
            if is_secret(key) && !value.is_empty() {
                text = text.replace(value.as_str(), REDACTED);
            }
        }
        text
    }

    /// Turns librdkafka's refusal of a property into an error without the
    /// value (librdkafka quotes it: `Invalid value "..." for configuration
    /// property "..."`).
    pub fn rejected(&self, error: &KafkaError) -> PropertyError {
        match error {
            KafkaError::ClientConfig(_, reason, key, value) => {
                let mut reason = self.redact(reason);
                if !value.is_empty() {
                    reason = reason.replace(&format!("\"{value}\""), "(the value given)");
                }
                PropertyError::Rejected {
                    key: key.clone(),
                    reason,
                }
            }
            other => PropertyError::Rejected {
                key: "?".to_owned(),
                reason: self.redact(&other.to_string()),
            },
        }
    }
}

/// A property that weakens the broker connection's protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weakening {
    /// The setting, as `key=value`.
    pub setting: &'static str,
    /// What it exposes.
    pub risk: &'static str,
    /// How to fix it.
    pub fix: &'static str,
}

impl fmt::Display for Weakening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--kafka-property {}: {}", self.setting, self.risk)
    }
}

/// One `--kafka-property` as given on the command line. Its `Debug` hides a
/// secret value; a text that is not `key=value` is hidden whole.
#[derive(Clone, PartialEq, Eq)]
pub struct PropertyArg(pub String);

impl From<String> for PropertyArg {
    fn from(text: String) -> Self {
        PropertyArg(text)
    }
}

impl fmt::Debug for PropertyArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match split(&self.0) {
            Some((key, _)) if is_secret(key) => write!(f, "\"{key}={REDACTED}\""),
            Some((key, value)) => write!(f, "{:?}", format!("{key}={value}")),
            None => f.write_str("\"<not key=value; hidden>\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[&str]) -> Result<KafkaProperties, PropertyError> {
        KafkaProperties::parse(
            pairs
                .iter()
                .enumerate()
                .map(|(i, p)| (Origin::Flag(i + 1), *p)),
        )
    }

    const SECRET: &str = "s3cr;t =value ";

    #[test]
    fn secret_looking_properties_are_recognised() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "ssl.certificate.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.client.credentials.client.secret",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.oauthbearer.config",
            "some.future.Secret.thing",
            "my.PASSWORD",
        ] {
            assert!(is_secret(key), "{key}");
        }
        for key in ["linger.ms", "sasl.mechanism", "ssl.ca.location", "acks"] {
            assert!(!is_secret(key), "{key}");
        }
    }

    #[test]
    fn values_are_kept_exactly_and_only_the_first_equals_sign_splits() {
        let p = parse(&[&format!(" sasl.password ={SECRET}"), "a=b=c", "empty="]).unwrap();
        assert_eq!(p.get("sasl.password"), Some(SECRET));
        assert_eq!(p.get("a"), Some("b=c"));
        assert_eq!(p.get("empty"), Some(""));
    }

    #[test]
    fn debug_redacts_secret_values() {
        let p = parse(&[
            &format!("sasl.password={SECRET}"),
            &format!("ssl.key.pem={SECRET}"),
            &format!("sasl.oauthbearer.client.secret={SECRET}"),
            "linger.ms=5",
        ])
        .unwrap();
        let text = format!("{p:?}");
        assert!(!text.contains("s3cr"), "{text}");
        assert!(text.contains("\"linger.ms\": \"5\""), "{text}");
        assert!(text.contains(REDACTED), "{text}");
        for arg in [
            format!("sasl.password={SECRET}"),
            "sasl.password s3cr;t".to_owned(),
            format!("sasl.password:{SECRET}"),
        ] {
            let text = format!("{:?}", PropertyArg(arg));
            assert!(!text.contains("s3cr"), "{text}");
        }
        assert_eq!(
            format!("{:?}", PropertyArg("linger.ms=5".into())),
            "\"linger.ms=5\""
        );
    }

    #[test]
    fn errors_never_quote_the_value() {
        for bad in [
            "sasl.password s3cr;t".to_owned(),
            format!("=sasl.password{SECRET}"),
            // A mistyped separator: the name would hold part of the secret.
            format!("sasl.password:{SECRET}"),
        ] {
            let e = parse(&["linger.ms=1", &bad]).unwrap_err().to_string();
            assert!(!e.contains("s3cr"), "{e}");
            assert!(e.contains("occurrence 2") && e.contains("key=value"), "{e}");
        }
        let e = parse(&[&format!("acks={SECRET}")]).unwrap_err().to_string();
        assert!(!e.contains("s3cr") && e.contains("acks=all"), "{e}");
        let e = KafkaProperties::parse_lines(&format!("linger.ms=1\n\nnot a pair {SECRET}\n"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn librdkafka_refusals_lose_the_value() {
        // librdkafka's own errors: an unknown name, and a value it refuses.
        for pair in [
            format!("sasl.pasword={SECRET}"),
            format!("linger.ms={SECRET}"),
            format!("security.protocol={SECRET}"),
        ] {
            let p = parse(&[&pair]).unwrap();
            let mut config = rdkafka::ClientConfig::new();
            for (k, v) in p.iter() {
                config.set(k, v);
            }
            let error = config.create_native_config().err().expect("refused");
            assert!(error.to_string().contains("s3cr"), "librdkafka quotes it");
            let e = p.rejected(&error).to_string();
            let key = pair.split_once('=').unwrap().0;
            assert!(!e.contains("s3cr") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn the_guarantees_cannot_be_weakened_by_an_alias() {
        for bad in [
            "acks=1",
            "request.required.acks=0",
            "enable.idempotence=false",
            "message.timeout.ms=60000",
            "delivery.timeout.ms=300000",
        ] {
            assert!(
                matches!(parse(&[bad]), Err(PropertyError::Forbidden { .. })),
                "{bad}"
            );
        }
        for fine in [
            "acks=all",
            "acks=-1",
            "request.required.acks=-1",
            "acks=ALL",
            "message.timeout.ms=0",
            "delivery.timeout.ms=0",
        ] {
            assert!(parse(&[fine]).is_ok(), "{fine}");
        }
        let e = parse(&["message.timeout.ms=60000"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("give up on an event"), "{e}");
    }

    #[test]
    fn halting_keeps_the_gapless_guarantee() {
        for off in [
            "enable.gapless.guarantee=false",
            "enable.gapless.guarantee=F",
            "enable.gapless.guarantee=0",
        ] {
            let p = parse(&[off]).unwrap();
            let e = p.check_halt_mode(true).unwrap_err().to_string();
            assert!(
                e.contains("enable.gapless.guarantee") && e.contains("--on-poison halt"),
                "{e}"
            );
            // With dead-letter records the producer does not need it.
            assert!(p.check_halt_mode(false).is_ok(), "{off}");
        }
        for fine in ["enable.gapless.guarantee=true", "linger.ms=5"] {
            assert!(
                parse(&[fine]).unwrap().check_halt_mode(true).is_ok(),
                "{fine}"
            );
        }
    }

    #[test]
    fn unsafe_properties_need_to_be_named() {
        for (name, _) in UNSAFE {
            let p = parse(&[&format!("{name}=/tmp/x")]).unwrap();
            let e = p.check_unsafe(&[]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("--allow-unsafe-kafka-property {name}"))
                    && !e.contains("/tmp/x"),
                "{e}"
            );
            assert_eq!(
                p.check_unsafe(&[(*name).to_owned()]).unwrap().len(),
                1,
                "{name}"
            );
        }
        let p = parse(&["linger.ms=1"]).unwrap();
        assert!(p.check_unsafe(&[]).unwrap().is_empty());
        assert!(matches!(
            p.check_unsafe(&["linger.ms".to_owned()]),
            Err(PropertyError::NotGated { .. })
        ));
    }

    #[test]
    fn the_properties_file_format_is_javas() {
        let text = "# Kafka's client.properties\n\
                    ! also a comment \\\n\
                    security.protocol=SASL_SSL\n\
                    sasl.mechanism : SCRAM-SHA-512\r\n\
                    \tsasl.username   walrelay\r\
                    sasl.jaas.config=first \\\n\
                    \t  second\\\\\n\
                    key\\:with\\=escapes=tab\\there\\u00e9\\uD83D\\uDE00 \n\
                    \n   \n\
                    empty.value=\n\
                    only.key\n\
                    ends.with.backslash=x\\";
        let parsed = parse_properties(text).unwrap();
        let got: Vec<(usize, &str, &str)> = parsed
            .iter()
            .map(|(n, k, v)| (*n, k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (3, "security.protocol", "SASL_SSL"),
                (4, "sasl.mechanism", "SCRAM-SHA-512"),
                (5, "sasl.username", "walrelay"),
                // Continued: the next line's leading blanks dropped; an
                // even number of backslashes does not continue.
                (6, "sasl.jaas.config", "first second\\"),
                (8, "key:with=escapes", "tab\there\u{e9}\u{1F600} "),
                (11, "empty.value", ""),
                (12, "only.key", ""),
                (13, "ends.with.backslash", "x"),
            ]
        );
    }

    #[test]
    fn a_bad_properties_file_is_refused_by_line_without_its_text() {
        for (text, line) in [
            ("linger.ms=1\nsasl.password=\\u12G4 s3cr;t\n", 2),
            ("a=1\n\n\\u00e9t\u{e9}=s3cr;t\n", 3),
            ("acks=s3cr;t\n", 0),
        ] {
            let e = KafkaProperties::parse_properties_file(text)
                .unwrap_err()
                .to_string();
            assert!(!e.contains("s3cr"), "{e}");
            if line > 0 {
                assert!(
                    e.contains(&format!("--kafka-properties-file (line {line})")),
                    "{e}"
                );
            }
        }
        let p = KafkaProperties::parse_properties_file(&format!(
            "sasl.password={SECRET}\nlinger.ms=5\n"
        ))
        .unwrap();
        assert_eq!(p.get("sasl.password"), Some(SECRET));
        assert!(p.holds_secret());
        // A reference to the file holding the secret is no secret.
        let p = KafkaProperties::parse_properties_file("sasl.password=file:/run/secrets/kafka\n")
            .unwrap();
        assert!(!p.holds_secret());
    }

    #[test]
    fn tls_weakenings_are_found() {
        let found = |pairs: &[&str]| -> Vec<&'static str> {
            parse(pairs)
                .unwrap()
                .weakenings()
                .iter()
                .map(|w| w.setting)
                .collect()
        };
        assert!(found(&["security.protocol=SASL_SSL", "sasl.password=x"]).is_empty());
        assert!(found(&["linger.ms=1"]).is_empty(), "plaintext without SASL");
        assert_eq!(
            found(&["enable.ssl.certificate.verification=FALSE"]),
            ["enable.ssl.certificate.verification=false"]
        );
        assert_eq!(
            found(&["ssl.endpoint.identification.algorithm=None"]),
            ["ssl.endpoint.identification.algorithm=none"]
        );
        assert_eq!(
            found(&["security.protocol=SASL_PLAINTEXT", "sasl.username=u"]),
            ["security.protocol=sasl_plaintext"]
        );
        assert_eq!(
            found(&["sasl.password=x"]),
            ["security.protocol=plaintext"],
            "librdkafka's default protocol"
        );
    }
}
