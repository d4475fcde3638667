//! `--format cloudevents`, read back by the CloudEvents SDK for Rust; and
//! the W3C trace context copied from the metadata column.
use std::collections::BTreeMap;
use std::time::Duration;

use cloudevents::event::SpecVersion;
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Error as CeError, MessageAttributeValue,
    Result as CeResult,
};
use cloudevents::{AttributesReader, Data};
use nix::sys::signal::Signal;

use super::delivery::{current_lsn, wait_confirmed};
use crate::support::kafka::{Kafka, Record};
use crate::support::postgres::{DATABASE, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, metric, wait_halted};

const WAIT: Duration = Duration::from_secs(60);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// A record as the CloudEvents Kafka protocol binding reads one in binary
/// content mode (kafka-protocol-binding.md, 3.2): `ce_specversion` picks
/// the version, `content-type` is `datacontenttype`, every other `ce_`
/// header is the attribute (or extension) of its name, the value is the
/// data. The SDK's own event builder checks what it is given: required
/// attributes, `time` as RFC 3339, and so on. (The SDK's rdkafka binding
/// does the same, but needs rdkafka 0.38.)
struct Binary<'a>(&'a Record);

impl BinaryDeserializer for Binary<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(self, mut visitor: V) -> CeResult<R> {
        let text = |value: &Option<Vec<u8>>| {
            String::from_utf8(value.clone().unwrap_or_default()).map_err(|e| CeError::Other {
                source: Box::new(e),
            })
        };
        let headers: BTreeMap<&str, String> = self
            .0
            .raw_headers
            .iter()
            .map(|(name, value)| Ok((name.as_str(), text(value)?)))
            .collect::<CeResult<_>>()?;
        let version = headers
            .get("ce_specversion")
            .ok_or(CeError::WrongEncoding {})?;
        let version = SpecVersion::try_from(version.as_str())?;
        let attributes = version.attribute_names();
        visitor = visitor.set_spec_version(version)?;
        if let Some(content_type) = headers.get("content-type") {
            visitor = visitor.set_attribute(
                "datacontenttype",
                MessageAttributeValue::String(content_type.clone()),
            )?;
        }
        for (name, value) in &headers {
            let Some(attribute) = name.strip_prefix("ce_") else {
                continue;
            };
            let value = MessageAttributeValue::String(value.clone());
            visitor = match attribute {
                "specversion" => visitor,
                a if attributes.contains(&a) => visitor.set_attribute(a, value)?,
                a => visitor.set_extension(a, value)?,
            };
        }
        visitor.end_with_data(self.0.raw_value.clone().unwrap_or_default())
    }
}

fn parse(record: &Record) -> cloudevents::Event {
    BinaryDeserializer::into_event(Binary(record))
        .unwrap_or_else(|e| panic!("not a CloudEvent in binary mode ({e}): {record:?}"))
}

/// The CloudEvents-relevant part of a record: the `ce_*` and `content-type`
/// headers.
fn attribute_headers(record: &Record) -> Vec<(String, String)> {
    record
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("ce_") || *name == "content-type")
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

fn insert(aggregate: &str, seq: i32, event_type: &str, payload: &str) -> String {
    format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
         VALUES ('{aggregate}', {seq}, '{event_type}', '{payload}');"
    )
}

#[tokio::test]
async fn cloudevents_records_parse_with_the_sdk_and_keep_their_id_across_a_replay() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    kafka.cluster().create_topic("events.Ok", 1, 1).unwrap();
    let args = [
        "--format",
        "cloudevents",
        "--topic",
        "events.{event_type}",
        "--allow-aggregate-across-topics",
    ];
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    pg.psql(&format!(
        "{}{}",
        insert("a", 1, "Ok", r#"{"n": 1}"#),
        insert("b", 1, "Ok", r#"{"n": 2}"#)
    ))
    .await;
    // One transaction: a/2 is handed to the producer, then a/3 names a topic
    // that does not exist, which halts walrelay before the transaction is
    // confirmed; the next start publishes a/2 again.
    pg.psql(&format!(
        "BEGIN;{}{}COMMIT;",
        insert("a", 2, "Ok", r#"{"n": 3}"#),
        insert("a", 3, "Missing", r#"{"n": 4}"#)
    ))
    .await;
    // A halt: the instance stays up, not ready, until stopped (exit code 3).
    wait_halted(metrics, "poison_row", WAIT).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(3));
    // a/2's first copy is on the topic before the restart.
    let offset = |r: &Record| (r.partition, r.offset);
    kafka.read_by("events.Ok", 3, WAIT, offset);
    kafka
        .cluster()
        .create_topic("events.Missing", 1, 1)
        .unwrap();
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let ok = kafka.read_by("events.Ok", 4, WAIT, offset);
    let missing = kafka.read_by("events.Missing", 1, WAIT, offset);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));

    // Every record is a CloudEvent with the attributes the table gives it.
    let recorded_at = |aggregate: &str, seq: i32| {
        let pg = &pg;
        let sql = format!(
            "SELECT (extract(epoch FROM recorded_at) * 1000000)::bigint FROM events \
             WHERE aggregate_id = '{aggregate}' AND seq_nr = {seq}"
        );
        async move { pg.psql(&sql).await.parse::<i64>().unwrap() }
    };
    let source = format!("/walrelay/{DATABASE}/public.events");
    let mut ids = Vec::new();
    for record in ok.iter().chain(&missing) {
        let event = parse(record);
        let (aggregate, seq) = (record.key.as_str(), record.seq_nr());
        assert_eq!(event.specversion(), SpecVersion::V10);
        assert_eq!(event.id(), format!("{aggregate}:{seq}"));
        assert_eq!(*event.source(), source);
        assert_eq!(event.ty(), record.header("event_type"));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        let time = event.time().expect("ce_time").timestamp_micros();
        assert_eq!(time, recorded_at(aggregate, seq.try_into().unwrap()).await);
        let Some(Data::Binary(data)) = event.data() else {
            panic!("no data: {event}");
        };
        assert_eq!(Some(data), record.raw_value.as_ref());
        // walrelay's own headers stay beside the attributes.
        assert!(record.headers.contains_key("lsn"), "{record:?}");
        ids.push(event.id().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["a:1", "a:2", "a:2", "a:3", "b:1"]);
    // The replay is the same CloudEvent: consumers deduplicate on ce_id.
    let copies: Vec<&Record> = ok.iter().filter(|r| r.header("ce_id") == "a:2").collect();
    assert_eq!(attribute_headers(copies[0]), attribute_headers(copies[1]));
    assert_eq!(copies[0].raw_value, copies[1].raw_value);
    assert_eq!(
        copies[0].header("lsn"),
        copies[1].header("lsn"),
        "one transaction"
    );
}

#[tokio::test]
async fn cloudevents_flags_are_checked_before_connecting() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--format", "cloudevents", "--seq-column", "none"],
            "needs a sequence column",
        ),
        (
            &["--format", "cloudevents", "--cloudevents-source", "a b"],
            "not a URI-reference",
        ),
        (
            &[
                "--format",
                "cloudevents",
                "--cloudevents-content-type",
                "json",
            ],
            "not a media type",
        ),
        (&["--cloudevents-source", "/x"], "need --format cloudevents"),
    ];
    for (args, expected) in cases {
        // Nothing listens there: a configuration error comes first.
        let mut relay = Walrelay::start(
            "postgres://walrelay@127.0.0.1:1/db?sslmode=disable",
            "127.0.0.1:1",
            args,
        );
        assert_eq!(relay.wait(WAIT).await.code(), Some(2), "{args:?}");
        let logs = relay.stderr_text();
        assert!(logs.contains(expected), "{args:?}: {logs}");
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn insert_with_metadata(aggregate: &str, metadata: &str) -> String {
    format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload, metadata) \
         VALUES ('{aggregate}', 1, 'T', '{{}}', '{metadata}');"
    )
}

#[tokio::test]
async fn a_valid_trace_context_is_copied_and_a_malformed_one_is_counted_not_fatal() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let long_state = format!("k={}", "v".repeat(600));
    pg.psql(&format!(
        "{}{}{}{}{}",
        insert_with_metadata(
            "valid",
            &format!(r#"{{"user": "ada", "traceparent": "{TRACEPARENT}", "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"}}"#),
        ),
        insert_with_metadata(
            "zero-trace-id",
            r#"{"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}"#,
        ),
        insert_with_metadata(
            "version-ff",
            r#"{"traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
        ),
        insert_with_metadata(
            "long-state",
            &format!(r#"{{"traceparent": "{TRACEPARENT}", "tracestate": "{long_state}"}}"#),
        ),
        insert_with_metadata("none", r#"{"user": "ada"}"#),
    ))
    .await;
    let records = kafka.read("events", 5, WAIT);
    let by_key = |key: &str| records.iter().find(|r| r.key == key).unwrap();
    let trace = |key: &str| {
        let r = by_key(key);
        (
            r.headers.get("traceparent").map(String::as_str),
            r.headers.get("tracestate").map(String::as_str),
        )
    };
    assert_eq!(
        trace("valid"),
        (
            Some(TRACEPARENT),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        )
    );
    assert_eq!(trace("zero-trace-id"), (None, None));
    assert_eq!(trace("version-ff"), (None, None));
    // The parent goes without the state that is too long.
    assert_eq!(trace("long-state"), (Some(TRACEPARENT), None));
    assert_eq!(trace("none"), (None, None));
    // Every event is published, its metadata as a header all the same.
    assert!(by_key("zero-trace-id").headers["metadata"].contains("traceparent"));
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(
        metric(
            metrics,
            "walrelay_trace_context_invalid_total{header=\"traceparent\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            metrics,
            "walrelay_trace_context_invalid_total{header=\"tracestate\"}"
        ),
        1
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    let logs = relay.stderr_text();
    assert!(
        logs.contains("malformed trace context") && !logs.contains(&long_state),
        "{logs}"
    );
}
