//! Rows that cannot be published, and changes the append-only table should
//! never see: a clear outcome, and nothing lost.
use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get, metric, wait_for_metric, wait_halted};

const WAIT: Duration = Duration::from_secs(60);

/// A table whose payload is text and whose key may be NULL, published by
/// `loose_pub`: rows walrelay must refuse can exist there (with
/// `--payload-format json`, a payload that is not JSON too).
async fn loose_table(pg: &PgServer) {
    pg.psql(
        "CREATE TABLE loose (aggregate_id text, seq_nr bigint, event_type text, payload text);
         GRANT SELECT ON loose TO scram_user;
         CREATE PUBLICATION loose_pub FOR TABLE loose WITH (publish = 'insert');",
    )
    .await;
}

/// The loose table's URL and flags; its text payload is checked to be JSON.
fn loose_args(pg: &PgServer) -> (String, Vec<&'static str>) {
    (
        pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable"),
        vec![
            "--table",
            "public.loose",
            "--publication",
            "loose_pub",
            "--payload-format",
            "json",
        ],
    )
}

/// How many times PostgreSQL refused the slot to another process so far.
fn slot_refusals(pg: &PgServer) -> usize {
    std::fs::read_to_string(pg.log_path())
        .unwrap_or_default()
        .matches("replication slot \"walrelay\" is active for PID")
        .count()
}

/// Waits until the instance at `addr` halted on a poison row.
async fn halted_on_a_poison_row(addr: std::net::SocketAddr) {
    wait_halted(addr, "poison_row", WAIT).await;
}

/// The PID of the walsender that holds the slot, if any.
async fn slot_holder(pg: &PgServer) -> String {
    pg.psql("SELECT coalesce(active_pid::text, '') FROM pg_replication_slots WHERE slot_name = 'walrelay'")
        .await
}

#[tokio::test]
async fn a_row_that_is_not_json_halts_an_instance_that_stays_up_keeps_the_slot_and_exits_3_on_sigterm()
 {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    loose_table(&pg).await;
    let (url, args) = loose_args(&pg);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &args).await;
    let mut standby = Walrelay::start(&url, &kafka.bootstrap(), &args);
    let standby_addr = standby.metrics_addr().await;
    standby.wait_for_stderr("standing by", WAIT).await;
    pg.psql("INSERT INTO loose VALUES ('a', 1, 'Ok', '{}');")
        .await;
    let good_end = current_lsn(&pg).await;
    wait_confirmed(&pg, "walrelay", good_end).await;
    let holder = slot_holder(&pg).await;
    pg.psql("INSERT INTO loose VALUES ('a', 2, 'Bad', 'not json');")
        .await;
    let bad_end = current_lsn(&pg).await;

    // Halted: up, live, not ready, not active, the reason exported, and one
    // error line saying why.
    halted_on_a_poison_row(metrics).await;
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert_eq!(metric(metrics, "walrelay_halted"), 1);
    assert_eq!(metric(metrics, "walrelay_active"), 0);
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    let (status, body) = http_get(metrics, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("halted: poison_row"), "{body}");
    assert_eq!(http_get(metrics, "/active").0, 503);
    relay.wait_for_stderr("halted: fix the cause", WAIT).await;
    let logs = relay.stderr_text();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{logs}");
    assert!(
        errors[0].contains("halted")
            && errors[0].contains("aggregate Some(\"a\") seq_nr 2")
            && errors[0].contains("not valid JSON"),
        "{logs}"
    );

    // It keeps the slot: the standby tries it again and again, and stays a
    // ready standby meanwhile, rather than take over and halt on the same row.
    let refused = slot_refusals(&pg);
    let deadline = tokio::time::Instant::now() + WAIT;
    while slot_refusals(&pg) < refused + 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby stopped trying"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        slot_holder(&pg).await,
        holder,
        "the halted instance let the slot go"
    );
    assert_eq!(metric(standby_addr, "walrelay_standby"), 1);
    assert_eq!(http_get(standby_addr, "/readyz").0, 200);
    assert_eq!(http_get(standby_addr, "/active").0, 503);
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed >= good_end && confirmed < bad_end,
        "{confirmed} not between {good_end} and {bad_end}"
    );

    // SIGTERM ends it at once with the halt's code; the standby then takes
    // the slot and meets the same row.
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(3));
    halted_on_a_poison_row(standby_addr).await;
    assert_eq!(standby.stop_with(Signal::SIGTERM).await.code(), Some(3));

    // With --exit-on-halt, it exits with the halt's code by itself.
    let mut exits = Walrelay::start(
        &url,
        &kafka.bootstrap(),
        &[&args[..], &["--exit-on-halt"]].concat(),
    );
    assert_eq!(
        exits.wait(WAIT).await.code(),
        Some(3),
        "{}",
        exits.stderr_text()
    );
    assert!(
        exits.stderr_text().contains("halted"),
        "{}",
        exits.stderr_text()
    );

    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(confirmed < bad_end, "{confirmed} past {bad_end}");
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
    let args = [
        "--on-poison",
        "dead-letter",
        "--dead-letter-topic",
        "dead",
        "--exit-on-halt",
    ];
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
    // A halt, whatever --on-poison says (exit code 3 at once with --exit-on-halt).
    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(3),
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
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &["--exit-on-halt"]).await;
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'Ok', '{}');")
        .await;
    let good_end = current_lsn(&pg).await;
    pg.psql(bypass).await;
    let bad_end = current_lsn(&pg).await;
    assert_eq!(relay.wait(WAIT).await.code(), Some(3));
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
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &["--exit-on-halt"]).await;
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
        Some(3),
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
