//! Any event table, mapped by the column flags: a classic event store with a
//! binary payload, Debezium's outbox table, and rows whose topic is not
//! allowed or does not exist.
use std::time::Duration;

use nix::sys::signal::Signal;

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::{Kafka, Record};
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, metric, wait_halted};

const WAIT: Duration = Duration::from_secs(60);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// `bytes` as PostgreSQL's `decode(hex, 'hex')`.
fn bytea_literal(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let hex = bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    });
    format!("decode('{hex}', 'hex')")
}

/// Each record's key, `seq_nr` header and raw value, sorted.
fn published(records: &[Record]) -> Vec<(String, i64, Vec<u8>)> {
    let mut out: Vec<(String, i64, Vec<u8>)> = records
        .iter()
        .map(|r| (r.key.clone(), r.seq_nr(), r.raw_value.clone().unwrap()))
        .collect();
    out.sort();
    out
}

/// Asserts that the events are `expected`, byte for byte, naming the first
/// difference rather than printing every byte of a large value.
fn assert_published(records: &[Record], expected: &[(&str, i64, &[u8])]) {
    let got = published(records);
    let mut expected = expected.to_vec();
    expected.sort();
    let got_ids: Vec<(&str, i64, usize)> = got
        .iter()
        .map(|(k, s, v)| (k.as_str(), *s, v.len()))
        .collect();
    let expected_ids: Vec<(&str, i64, usize)> =
        expected.iter().map(|(k, s, v)| (*k, *s, v.len())).collect();
    assert_eq!(got_ids, expected_ids, "events (key, seq_nr, value length)");
    for ((key, seq, value), (_, _, want)) in got.iter().zip(&expected) {
        let differs = value.iter().zip(*want).position(|(a, b)| a != b);
        assert_eq!(differs, None, "{key}/{seq}: first differing byte");
    }
}

#[tokio::test]
async fn a_binary_bytea_payload_is_published_byte_for_byte() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    // The classic event store, with a bigint key and a binary payload
    // (Protobuf, Avro, ...): bytes that are not UTF-8, NUL, a backslash, and
    // text that looks like bytea's own hex prefix.
    let first = vec![0x0a, 0x03, 0x00, 0xff, 0x5c, 0x80];
    let tricky = b"\\x0\x00\xfe".to_vec();
    // Beyond PostgreSQL's TOAST threshold, and every byte value.
    let mut rng = fastrand::Rng::with_seed(7);
    let large: Vec<u8> = (0..100_000).map(|_| rng.u8(..)).collect();
    pg.psql(&format!(
        "CREATE TABLE store (aggregate_id bigint NOT NULL, seq_nr bigint NOT NULL, tags varchar,
                             payload bytea NOT NULL, PRIMARY KEY (aggregate_id, seq_nr));
         GRANT SELECT ON store TO scram_user;
         CREATE PUBLICATION store_pub FOR TABLE store WITH (publish = 'insert');
         INSERT INTO store VALUES (42, 1, 'a,b', {});",
        bytea_literal(&first)
    ))
    .await;
    let args = ["--table", "public.store", "--publication", "store_pub"];
    // The first row comes from the initial snapshot (read as ::text), the
    // others from the stream (pgoutput's text form).
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    pg.psql(&format!(
        "INSERT INTO store VALUES (42, 2, NULL, {}), (7, 1, 'x', {}), (7, 2, 'empty', '');",
        bytea_literal(&tricky),
        bytea_literal(&large)
    ))
    .await;
    let records = kafka.read("events", 4, WAIT);
    let mut expected: Vec<(&str, i64, &[u8])> = vec![
        ("42", 1, &first),
        ("42", 2, &tricky),
        ("7", 1, &large),
        ("7", 2, &[]),
    ];
    assert_published(&records, &expected);
    let first_record = records.iter().find(|r| r.key == "42" && r.seq_nr() == 1);
    let headers = &first_record.unwrap().headers;
    assert_eq!(headers.get("tags").map(String::as_str), Some("a,b"));
    assert!(!headers.contains_key("payload") && !headers.contains_key("aggregate_id"));

    // A server (here the role) that renders bytea in the escape format
    // (`bytea_output = escape`): the same bytes.
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    pg.psql("ALTER ROLE scram_user SET bytea_output = 'escape';")
        .await;
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    pg.psql(&format!(
        "INSERT INTO store VALUES (42, 3, NULL, {}), (7, 3, NULL, {});",
        bytea_literal(&tricky),
        bytea_literal(&first)
    ))
    .await;
    let records = kafka.read("events", 6, WAIT);
    expected.extend([("42", 3, &tricky[..]), ("7", 3, &first[..])]);
    assert_published(&records, &expected);
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Debezium's outbox table, as its documentation shapes it.
const OUTBOX_TABLE: &str = "CREATE TABLE outboxevent (
        id uuid NOT NULL PRIMARY KEY,
        aggregatetype varchar(255) NOT NULL,
        aggregateid varchar(255) NOT NULL,
        type varchar(255) NOT NULL,
        payload jsonb);
    GRANT SELECT ON outboxevent TO scram_user;";

/// The flags that publish [`OUTBOX_TABLE`] as Debezium's Outbox Event Router
/// does by default (route.by.field=aggregatetype,
/// route.topic.replacement=outbox.event.${routedByValue},
/// table.field.event.key=aggregateid, table.field.event.payload=payload),
/// with table.fields.additional.placement=type:header:eventType.
const OUTBOX_FLAGS: [&str; 16] = [
    "--table",
    "public.outboxevent",
    "--publication",
    "outbox_pub",
    "--key-column",
    "aggregateid",
    "--seq-column",
    "none",
    "--type-column",
    "type",
    "--header-name",
    "type=eventType",
    "--topic",
    "outbox.event.{aggregatetype}",
    "--allow-aggregate-across-topics",
    "--snapshot=initial",
];

#[tokio::test]
async fn a_debezium_outbox_table_is_published_as_the_outbox_event_router_publishes_it() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    kafka
        .cluster()
        .create_topic("outbox.event.Order", 3, 1)
        .unwrap();
    kafka
        .cluster()
        .create_topic("outbox.event.Customer", 1, 1)
        .unwrap();
    // An event written before walrelay's first start: the initial snapshot.
    pg.psql(&format!(
        "{OUTBOX_TABLE}
         CREATE PUBLICATION outbox_pub FOR TABLE outboxevent WITH (publish = 'insert');
         INSERT INTO outboxevent VALUES ('4d47e190-0402-4048-bc2c-89dd54343cdc', 'Order', '1',
             'OrderCreated', '{{\"id\": 1, \"lineItems\": [{{\"item\": \"Debezium in Action\"}}]}}');"
    ))
    .await;
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &OUTBOX_FLAGS).await;
    // The usual outbox writer: insert, and delete at once, keeping the table
    // empty (the publication decodes inserts only, as Debezium's router
    // drops deletes).
    pg.psql(
        "BEGIN;
         INSERT INTO outboxevent VALUES ('406c07f3-26f0-4eea-a50c-109940064b8f', 'Order', '1',
             'OrderShipped', '{\"id\":1,\"status\":\"SHIPPED\"}');
         INSERT INTO outboxevent VALUES ('9a8b7c6d-0000-4000-8000-000000000123', 'Customer', '123',
             'CustomerCreated', '{\"name\":\"Ada\"}');
         DELETE FROM outboxevent;
         COMMIT;",
    )
    .await;
    let by_id = |r: &Record| r.header("id").to_owned();
    let orders = kafka.read_by("outbox.event.Order", 2, WAIT, by_id);
    let customers = kafka.read_by("outbox.event.Customer", 1, WAIT, by_id);
    // The value is the payload column's text, exactly.
    let jsonb = |text: &str| {
        let pg = &pg;
        let sql = format!("SELECT '{text}'::jsonb::text");
        async move { pg.psql(&sql).await }
    };
    let summary = |r: &Record| {
        (
            r.key.clone(),
            r.header("id").to_owned(),
            r.header("eventType").to_owned(),
            r.header("aggregatetype").to_owned(),
            r.value.clone().unwrap(),
        )
    };
    assert_eq!(
        orders.iter().map(summary).collect::<Vec<_>>(),
        [
            (
                "1".to_owned(),
                "4d47e190-0402-4048-bc2c-89dd54343cdc".to_owned(),
                "OrderCreated".to_owned(),
                "Order".to_owned(),
                jsonb(r#"{"id": 1, "lineItems": [{"item": "Debezium in Action"}]}"#).await,
            ),
            (
                "1".to_owned(),
                "406c07f3-26f0-4eea-a50c-109940064b8f".to_owned(),
                "OrderShipped".to_owned(),
                "Order".to_owned(),
                jsonb(r#"{"id":1,"status":"SHIPPED"}"#).await,
            ),
        ],
        "one aggregate's events in one partition, in commit order"
    );
    assert_eq!(
        customers.iter().map(summary).collect::<Vec<_>>(),
        [(
            "123".to_owned(),
            "9a8b7c6d-0000-4000-8000-000000000123".to_owned(),
            "CustomerCreated".to_owned(),
            "Customer".to_owned(),
            jsonb(r#"{"name":"Ada"}"#).await,
        )]
    );
    // No sequence column: consumers deduplicate on the id header; the
    // renamed type column keeps no header of its own name.
    for record in orders.iter().chain(&customers) {
        let names: Vec<&str> = record.headers.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["aggregatetype", "commit_ts", "eventType", "id", "lsn"],
            "{record:?}"
        );
    }
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn check_and_run_need_the_columns_the_flags_name_from_the_publication() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    // A column list that leaves out the type column.
    pg.psql(&format!(
        "{OUTBOX_TABLE}
         CREATE PUBLICATION outbox_pub FOR TABLE outboxevent (id, aggregatetype, aggregateid, payload)
             WITH (publish = 'insert');"
    ))
    .await;
    let url = url(&pg);
    let brokers = kafka.bootstrap();
    let mut args = vec!["check", "--postgres-url", &url, "--kafka-brokers", &brokers];
    args.extend_from_slice(&OUTBOX_FLAGS);
    let mut check = Walrelay::spawn(&args, &[]);
    assert_eq!(check.wait(WAIT).await.code(), Some(2));
    let output = check.stdout_lines().join("\n");
    assert!(
        output.contains("has a column list for public.outboxevent that leaves out [\"type\"]"),
        "{output}"
    );
    assert!(
        output.contains(
            "ok       table: public.outboxevent has the columns aggregateid, payload, type, aggregatetype"
        ),
        "{output}"
    );
    let mut relay = Walrelay::start(&url, &brokers, &OUTBOX_FLAGS);
    assert_eq!(relay.wait(WAIT).await.code(), Some(1));
    assert!(
        relay.stderr_text().contains("leaves out [\"type\"]"),
        "{}",
        relay.stderr_text()
    );
}

/// `--topic events.{event_type}`: rows choose the topic.
const BY_TYPE: [&str; 3] = [
    "--topic",
    "events.{event_type}",
    "--allow-aggregate-across-topics",
];

fn insert(aggregate: &str, seq: i32, event_type: &str) -> String {
    format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
         VALUES ('{aggregate}', {seq}, '{event_type}', '{{}}');"
    )
}

/// Whether the cluster has `topic`.
fn topic_exists(kafka: &Kafka, topic: &str) -> bool {
    use rdkafka::consumer::Consumer as _;
    let metadata = kafka
        .consumer()
        .fetch_metadata(Some(topic), WAIT)
        .expect("metadata");
    metadata.topics()[0].error().is_none()
}

#[tokio::test]
async fn a_row_routed_to_a_missing_topic_halts_without_confirming_past_it() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    kafka.cluster().create_topic("events.Ok", 1, 1).unwrap();
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &BY_TYPE).await;
    pg.psql(&insert("a", 1, "Ok")).await;
    let good_end = current_lsn(&pg).await;
    pg.psql(&insert("a", 2, "Missing")).await;
    let bad_end = current_lsn(&pg).await;
    // A halt: the instance stays up, not ready, until stopped (exit code 3).
    wait_halted(metrics, "poison_row", WAIT).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(3));
    let logs = relay.stderr_text();
    assert!(
        logs.contains("aggregate Some(\"a\") seq_nr 2")
            && logs
                .contains("topic \"events.Missing\", which the row's columns name, does not exist")
            && logs.contains("halted"),
        "{logs}"
    );
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed >= good_end && confirmed < bad_end,
        "{confirmed} not between {good_end} and {bad_end}"
    );
    let published = kafka.read("events.Ok", 1, WAIT);
    assert_eq!(published.len(), 1, "{published:?}");
    // Nothing created it on the way (allow.auto.create.topics=false).
    assert!(!topic_exists(&kafka, "events.Missing"));

    // Once it exists, a restart publishes the row.
    kafka
        .cluster()
        .create_topic("events.Missing", 1, 1)
        .unwrap();
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &BY_TYPE).await;
    wait_confirmed(&pg, "walrelay", bad_end).await;
    let published = kafka.read("events.Missing", 1, WAIT);
    assert_eq!(published[0].seq_nr(), 2);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn rows_routed_to_missing_disallowed_or_invalid_topics_are_dead_lettered_and_streaming_goes_on()
 {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    for topic in ["events.Ok", "events.Secret", "dead"] {
        kafka.cluster().create_topic(topic, 1, 1).unwrap();
    }
    // Before the first start: a row of the initial snapshot with no topic.
    pg.psql(&insert("s", 1, "Gone")).await;
    let mut args = BY_TYPE.to_vec();
    args.extend([
        "--allowed-topic",
        "events.Ok",
        "--allowed-topic",
        "events.Gone*",
        "--on-poison",
        "dead-letter",
        "--dead-letter-topic",
        "dead",
    ]);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    pg.psql(&format!(
        "{}{}{}{}{}",
        insert("a", 1, "Ok"),
        insert("a", 2, "Gone2"),
        // It exists, but no --allowed-topic allows it.
        insert("a", 3, "Secret"),
        insert("a", 4, "a b"),
        insert("a", 5, "Ok"),
    ))
    .await;
    let end = current_lsn(&pg).await;
    let published = kafka.read("events.Ok", 2, WAIT);
    assert_eq!(
        published
            .iter()
            .map(|r| (r.key.as_str(), r.seq_nr()))
            .collect::<Vec<_>>(),
        [("a", 1), ("a", 5)]
    );
    let dead: Vec<serde_json::Value> = kafka
        .read("dead", 4, WAIT)
        .iter()
        .map(|r| serde_json::from_str(r.value.as_deref().unwrap()).unwrap())
        .collect();
    let reasons: Vec<(&str, &str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["aggregate_id"].as_str().unwrap(),
                d["seq_nr"].as_str().unwrap(),
                d["error"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 4, "{dead:?}");
    for ((aggregate, seq, error), (want_aggregate, want_seq, want_error)) in reasons.iter().zip([
        (
            "s",
            "1",
            "topic \"events.Gone\", which the row's columns name, does not exist",
        ),
        (
            "a",
            "2",
            "topic \"events.Gone2\", which the row's columns name, does not exist",
        ),
        (
            "a",
            "3",
            "\"events.Secret\", which no --allowed-topic allows",
        ),
        (
            "a",
            "4",
            "\"events.a b\", which is not a valid Kafka topic name",
        ),
    ]) {
        assert_eq!((*aggregate, *seq), (want_aggregate, want_seq), "{dead:?}");
        assert!(error.contains(want_error), "{error}");
    }
    assert_eq!(
        kafka.watermarks("events.Secret", WAIT),
        Some(vec![(0, 0)]),
        "published to a topic no --allowed-topic allows"
    );
    // Handled, so the slot moves past them.
    wait_confirmed(&pg, "walrelay", end).await;
    assert_eq!(metric(metrics, "walrelay_dead_lettered_total"), 4);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
