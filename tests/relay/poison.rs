//! Rows that cannot be published, and changes the append-only table should
//! never see: a clear outcome, and nothing lost.
use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, metric, wait_for_metric};

const WAIT: Duration = Duration::from_secs(60);

/// A table whose payload is text and whose key may be NULL, published by
/// `loose_pub`: rows walrelay must refuse can exist there.
async fn loose_table(pg: &PgServer) {
    pg.psql(
        "CREATE TABLE loose (aggregate_id text, seq_nr bigint, event_type text, payload text);
         GRANT SELECT ON loose TO scram_user;
         CREATE PUBLICATION loose_pub FOR TABLE loose WITH (publish = 'insert');",
    )
    .await;
}

fn loose_args(pg: &PgServer) -> (String, Vec<&'static str>) {
    (
        pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable"),
        vec!["--table", "public.loose", "--publication", "loose_pub"],
    )
}

#[tokio::test]
async fn a_row_that_is_not_json_halts_by_default_without_confirming_past_it() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    loose_table(&pg).await;
    let (url, args) = loose_args(&pg);
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    pg.psql("INSERT INTO loose VALUES ('a', 1, 'Ok', '{}');")
        .await;
    let good_end = current_lsn(&pg).await;
    pg.psql("INSERT INTO loose VALUES ('a', 2, 'Bad', 'not json');")
        .await;
    let bad_end = current_lsn(&pg).await;
    assert_eq!(relay.wait(WAIT).await.code(), Some(1));
    let logs = relay.stderr_text();
    assert!(
        logs.contains("aggregate Some(\"a\") seq_nr 2") && logs.contains("not valid JSON"),
        "{logs}"
    );
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed >= good_end && confirmed < bad_end,
        "{confirmed} not between {good_end} and {bad_end}"
    );
    let published = kafka.read("events", 1, WAIT);
    assert_eq!(
        published
            .iter()
            .map(|r| (r.key.as_str(), r.seq_nr(), r.value.as_deref()))
            .collect::<Vec<_>>(),
        [("a", 1, Some("{}"))]
    );
}

#[tokio::test]
async fn dead_letter_describes_bad_rows_and_refused_events_and_goes_on() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    kafka.cluster().create_topic("dead", 1, 1).unwrap();
    loose_table(&pg).await;
    let (url, mut args) = loose_args(&pg);
    args.extend([
        "--on-poison",
        "dead-letter",
        "--dead-letter-topic",
        "dead",
        "--kafka-property",
        "message.max.bytes=20000",
    ]);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    pg.psql(
        "INSERT INTO loose VALUES ('a', 1, 'Ok', '{}');
         INSERT INTO loose VALUES ('a', 2, 'Bad', 'not json');
         INSERT INTO loose VALUES (NULL, 3, 'NoKey', '{}');
         INSERT INTO loose VALUES ('b', 1, 'Huge', json_build_object('blob', repeat('x', 50000))::text);
         INSERT INTO loose VALUES ('a', 3, 'Ok', '{}');",
    )
    .await;
    let end = current_lsn(&pg).await;
    let published = kafka.read("events", 2, WAIT);
    assert_eq!(
        published
            .iter()
            .map(|r| (r.key.as_str(), r.seq_nr()))
            .collect::<Vec<_>>(),
        [("a", 1), ("a", 3)]
    );
    let dead = kafka.read("dead", 3, WAIT);
    let reasons: Vec<serde_json::Value> = dead
        .iter()
        .map(|r| serde_json::from_str(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0]["error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
            && reasons[0]["seq_nr"] == "2"
    );
    assert!(reasons[1]["error"].as_str().unwrap().contains("NULL") && reasons[1]["seq_nr"] == "3");
    assert_eq!(reasons[2]["aggregate_id"], "b");
    assert_eq!(reasons[2]["reason"], "refused");
    assert!(
        reasons
            .iter()
            .all(|r| r["lsn"].as_str().unwrap().contains('/'))
    );
    // Handled, so the slot moves past them.
    wait_confirmed(&pg, "walrelay", end).await;
    assert_eq!(metric(metrics, "walrelay_dead_lettered_total"), 3);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_refusal_of_the_delivery_halts_even_with_dead_letter_and_the_event_arrives_after_the_restart()
 {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    kafka.cluster().create_topic("dead", 1, 1).unwrap();
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let args = ["--on-poison", "dead-letter", "--dead-letter-topic", "dead"];
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    let row = |seq: i32| {
        format!(
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', {seq}, 'Ok', '{{}}');"
        )
    };
    pg.psql(&row(1)).await;
    let good_end = current_lsn(&pg).await;
    wait_confirmed(&pg, "walrelay", good_end).await;
    // The topic is not authorised for the next produce request: nothing is
    // wrong with the event, so it must not be dead-lettered.
    kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    pg.psql(&row(2)).await;
    let bad_end = current_lsn(&pg).await;
    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(1),
        "{}",
        relay.stderr_text()
    );
    let logs = relay.stderr_text();
    assert!(
        logs.contains("not about the event itself") && logs.contains("whatever --on-poison says"),
        "{logs}"
    );
    assert!(
        kafka.read("dead", 1, Duration::from_secs(2)).is_empty(),
        "a valid event was dead-lettered"
    );
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed >= good_end && confirmed < bad_end,
        "{confirmed} not between {good_end} and {bad_end}"
    );
    // The cause is gone: the restart publishes it.
    kafka.cluster().clear_request_errors(RDKafkaApiKey::Produce);
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    wait_confirmed(&pg, "walrelay", bad_end).await;
    let seqs: Vec<i64> = kafka
        .read("events", 2, WAIT)
        .iter()
        .map(crate::support::kafka::Record::seq_nr)
        .collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn sigterm_stops_a_dead_letter_record_waiting_for_room_in_the_producer() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    kafka.cluster().create_topic("dead", 1, 1).unwrap();
    loose_table(&pg).await;
    let (url, mut args) = loose_args(&pg);
    args.extend([
        "--on-poison",
        "dead-letter",
        "--dead-letter-topic",
        "dead",
        "--kafka-property",
        "queue.buffering.max.messages=3",
        "--shutdown-timeout",
        "2s",
    ]);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    // The broker goes away; three events fill the producer's queue, and the
    // record describing the bad row behind them waits for room.
    kafka.set_all_brokers(false);
    pg.psql(
        "INSERT INTO loose VALUES ('a', 1, 'Ok', '{}'), ('a', 2, 'Ok', '{}'), ('a', 3, 'Ok', '{}'),
                                  ('a', 4, 'Bad', 'not json');",
    )
    .await;
    wait_for_metric(metrics, "walrelay_inflight_events", |v| v == 3, WAIT).await;
    relay
        .wait_for_stderr("sending it to the dead-letter topic", WAIT)
        .await;
    assert_eq!(
        relay.stop_with(Signal::SIGTERM).await.code(),
        Some(0),
        "{}",
        relay.stderr_text()
    );
}

#[tokio::test]
async fn an_update_that_slipped_past_the_guard_halts_or_is_skipped_but_never_published() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    // The shipped publication decodes inserts only, so an update never reaches
    // walrelay; one that publishes everything shows walrelay catching them.
    pg.psql(
        "ALTER PUBLICATION walrelay_events SET (publish = 'insert, update, delete, truncate');",
    )
    .await;
    let bypass = "ALTER TABLE events DISABLE TRIGGER ALL;
         UPDATE events SET event_type = 'Changed';
         ALTER TABLE events ENABLE TRIGGER ALL;";

    // Default: halt, naming the change, with the slot before it.
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'Ok', '{}');")
        .await;
    let good_end = current_lsn(&pg).await;
    pg.psql(bypass).await;
    let bad_end = current_lsn(&pg).await;
    assert_eq!(relay.wait(WAIT).await.code(), Some(1));
    assert!(
        relay.stderr_text().contains("saw a UPDATE"),
        "{}",
        relay.stderr_text()
    );
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed >= good_end && confirmed < bad_end,
        "{confirmed} not between {good_end} and {bad_end}"
    );

    // Skip: counted, logged, and the stream goes on.
    let (mut relay, metrics) = Walrelay::run(
        &url,
        &kafka.bootstrap(),
        &["--on-unexpected-change", "skip"],
    )
    .await;
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 2, 'Ok', '{}');").await;
    let records = kafka.read("events", 2, WAIT);
    assert_eq!(
        records
            .iter()
            .map(|r| (r.seq_nr(), r.header("event_type")))
            .collect::<Vec<_>>(),
        [(1, "Ok"), (2, "Ok")],
        "the update was published"
    );
    assert_eq!(metric(metrics, "walrelay_unexpected_changes_total"), 1);
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_table_renamed_while_streaming_stops_walrelay_naming_both_names_and_loses_nothing() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let row = |table: &str, seq: i32| {
        format!(
            "INSERT INTO {table} (aggregate_id, seq_nr, event_type, payload) VALUES ('a', {seq}, 'Ok', '{{}}');"
        )
    };
    pg.psql(&row("events", 1)).await;
    let before = current_lsn(&pg).await;
    wait_confirmed(&pg, "walrelay", before).await;
    pg.psql("ALTER TABLE events RENAME TO events_v2;").await;
    pg.psql(&row("events_v2", 2)).await;
    let after = current_lsn(&pg).await;

    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(1),
        "{}",
        relay.stderr_text()
    );
    let logs = relay.stderr_text();
    assert!(
        logs.contains("the events table public.events (OID ")
            && logs.contains("is named public.events_v2")
            && logs.contains("restart with --table public.events_v2"),
        "{logs}"
    );
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed >= before && confirmed < after,
        "{confirmed} not between {before} and {after}"
    );

    // The fix the error gives: the held-back row arrives, nothing is lost.
    let (mut relay, _) =
        Walrelay::run(&url, &kafka.bootstrap(), &["--table", "public.events_v2"]).await;
    wait_confirmed(&pg, "walrelay", after).await;
    let records = kafka.read("events", 2, WAIT);
    let seqs: Vec<i64> = records
        .iter()
        .map(crate::support::kafka::Record::seq_nr)
        .collect();
    assert_eq!(seqs, [1, 2], "{records:?}");
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_table_that_lost_the_name_while_walrelay_was_down_is_not_published_after_the_restart() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let row = |table: &str, key: &str, seq: i32| {
        format!(
            "INSERT INTO {table} (aggregate_id, seq_nr, event_type, payload) VALUES ('{key}', {seq}, 'Ok', '{{}}');"
        )
    };
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    pg.psql(&row("events", "a", 1)).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));

    // While walrelay is down: an event it has not published yet, then the
    // table is renamed, a new events table takes its place, and writers
    // keep inserting into the old one.
    pg.psql(&row("events", "a", 2)).await;
    pg.psql("ALTER TABLE events RENAME TO events_old;").await;
    pg.apply_schema().await;
    pg.psql(&format!("GRANT SELECT ON events TO {SCRAM_USER};"))
        .await;
    pg.psql(&row("events_old", "old", 1)).await;
    pg.psql(&row("events", "new", 1)).await;

    // The restart replays the rename: the old table's rows after it are
    // another table's.
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    pg.psql(&row("events_old", "old", 2)).await;
    pg.psql(&row("events", "new", 2)).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let mut published: Vec<(String, i64)> = kafka
        .read("events", 4, WAIT)
        .iter()
        .map(|r| (r.key.clone(), r.seq_nr()))
        .collect();
    published.sort();
    assert_eq!(
        published,
        [
            ("a".to_owned(), 1),
            ("a".to_owned(), 2),
            ("new".to_owned(), 1),
            ("new".to_owned(), 2)
        ],
        "{}",
        relay.stderr_text()
    );
    assert!(
        kafka.read("events", 5, Duration::from_secs(2)).len() == 4,
        "a row of events_old was published"
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn bad_rows_of_the_initial_snapshot_are_dead_lettered_too() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    kafka.cluster().create_topic("dead", 1, 1).unwrap();
    loose_table(&pg).await;
    // Rows that exist before walrelay's first start, bad ones among them.
    pg.psql(
        "INSERT INTO loose VALUES ('a', 1, 'Ok', '{}'), ('a', 2, 'Bad', 'not json'),
                                  (NULL, 3, 'NoKey', '{}'), ('b', 1, 'Ok', '{}');",
    )
    .await;
    let (url, mut args) = loose_args(&pg);
    args.extend(["--on-poison", "dead-letter", "--dead-letter-topic", "dead"]);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    assert!(
        relay.stderr_text().contains("initial snapshot published"),
        "{}",
        relay.stderr_text()
    );
    // The stream goes on after the snapshot.
    pg.psql("INSERT INTO loose VALUES ('b', 2, 'Ok', '{}');")
        .await;
    let mut published: Vec<(String, i64)> = kafka
        .read("events", 3, WAIT)
        .iter()
        .map(|r| (r.key.clone(), r.seq_nr()))
        .collect();
    published.sort();
    assert_eq!(
        published,
        [("a".into(), 1), ("b".into(), 1), ("b".into(), 2)]
    );
    let dead: Vec<serde_json::Value> = kafka
        .read("dead", 2, WAIT)
        .iter()
        .map(|r| serde_json::from_str(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead[0]["aggregate_id"] == "a"
            && dead[0]["seq_nr"] == "2"
            && dead[0]["error"]
                .as_str()
                .unwrap()
                .contains("not valid JSON"),
        "{dead:?}"
    );
    assert!(
        dead[1]["seq_nr"] == "3" && dead[1]["error"].as_str().unwrap().contains("NULL"),
        "{dead:?}"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots")
            .await,
        "walrelay",
        "the snapshot's marker is left"
    );
    assert_eq!(metric(metrics, "walrelay_dead_lettered_total"), 2);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
