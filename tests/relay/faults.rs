//! Broker trouble: an outage pauses delivery and never lets the slot pass an
//! unacknowledged event; a refused event stops walrelay with its name.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use walrelay::pg::lsn::Lsn;

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get, metric};
use crate::support::workload::{check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

#[tokio::test]
async fn a_broker_outage_holds_the_slot_and_delivers_everything_afterwards() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "before", 10, 20, 0, &mut seqs).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;

    kafka.set_all_brokers(false);
    let held_at = slot_confirmed(&pg, "walrelay").await;
    committed.extend(write_mixed(&mut client, "during", 10, 30, 0, &mut seqs).await);
    let end = current_lsn(&pg).await;
    // Several status-update rounds while the broker is away: the slot stays put.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = slot_confirmed(&pg, "walrelay").await;
        assert!(
            now < end,
            "slot confirmed to {now} while the events up to {end} were unacknowledged"
        );
        assert!(now >= held_at);
        assert!(
            relay.exited().is_none(),
            "walrelay gave up during the outage:\n{}",
            relay.stderr_text()
        );
    }
    assert_eq!(
        http_get(metrics, "/readyz").0,
        503,
        "ready while the broker is down"
    );

    kafka.set_all_brokers(true);
    let records = kafka.read("events", committed.len(), WAIT);
    let report = check(&committed, &records);
    // Idempotent production: retries leave no duplicates either.
    report.assert_clean(false, &relay.stderr_text());
    wait_confirmed(&pg, "walrelay", end).await;
    // The broker's outage is no reason to drop the replication connection.
    assert_eq!(
        metric(metrics, r#"walrelay_reconnects_total{target="postgres"}"#),
        0
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn transient_produce_errors_are_retried_not_surfaced() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 6],
    );
    let mut client = pg.client().await;
    let committed = write_mixed(&mut client, "agg", 10, 40, 5, &mut HashMap::new()).await;
    // The producer retries; walrelay neither stops nor reports an error, and
    // confirms the slot once every event is acknowledged.
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(
        metric(metrics, "walrelay_events_published_total"),
        committed.len() as u64
    );
    assert_eq!(metric(metrics, "walrelay_publish_errors_total"), 0);
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    // What the topic holds is not compared here: librdkafka's mock broker
    // does not check idempotent sequence numbers, and the idempotent producer
    // relies on a broker that does, so under injected errors the mock's log
    // can miss events the producer saw acknowledged (about one run in ten on
    // a loaded machine). The outage and end-to-end tests, which inject no
    // produce errors, read everything back.
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Asserts the topic holds exactly `events` (key, `seq_nr`), once each.
fn assert_only(kafka: &Kafka, events: &[(&str, i64)]) {
    let records = kafka.read("events", events.len(), WAIT);
    let got: Vec<(&str, i64)> = records
        .iter()
        .map(|r| (r.key.as_str(), r.seq_nr()))
        .collect();
    assert_eq!(got, events, "{records:#?}");
}

/// Writes one good event, then a transaction whose event the broker will refuse.
async fn good_then_poison(pg: &PgServer, payload_bytes: usize) -> (Lsn, Lsn) {
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('good', 1, 'Ok', '{}');")
        .await;
    let good_end = current_lsn(pg).await;
    pg.psql(&format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
         VALUES ('poison', 7, 'Huge', jsonb_build_object('blob', repeat('x', {payload_bytes})));"
    ))
    .await;
    let poison_end = current_lsn(pg).await;
    (good_end, poison_end)
}

async fn assert_halted_at_poison(
    pg: &PgServer,
    relay: &mut Walrelay,
    good_end: Lsn,
    poison_end: Lsn,
) {
    // Halted, exiting at once (--exit-on-halt).
    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(3),
        "{}",
        relay.stderr_text()
    );
    let logs = relay.stderr_text();
    assert!(
        logs.contains("\"poison\"")
            && logs.contains("seq_nr 7")
            && logs.contains("could not be published"),
        "the failure does not name the event:\n{logs}"
    );
    let confirmed = slot_confirmed(pg, "walrelay").await;
    assert!(
        confirmed >= good_end,
        "the good event before it was not confirmed: {confirmed}"
    );
    assert!(
        confirmed < poison_end,
        "slot confirmed past the refused event: {confirmed}"
    );
}

#[tokio::test]
async fn an_event_too_large_for_the_producer_halts_without_confirming_past_it() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, _) = Walrelay::run(
        &url(&pg),
        &kafka.bootstrap(),
        &[
            "--kafka-property",
            "message.max.bytes=20000",
            "--exit-on-halt",
        ],
    )
    .await;
    let (good_end, poison_end) = good_then_poison(&pg, 50_000).await;
    assert_halted_at_poison(&pg, &mut relay, good_end, poison_end).await;
    assert_only(&kafka, &[("good", 1)]);
}

#[tokio::test]
async fn an_event_the_broker_refuses_halts_without_confirming_past_it() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &["--exit-on-halt"]).await;
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('warm', 1, 'Ok', '{}');").await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    // The next produce requests are answered "too large", a permanent error.
    kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 50],
    );
    let warm_end = current_lsn(&pg).await;
    let (_, poison_end) = good_then_poison(&pg, 10).await;
    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(3),
        "{}",
        relay.stderr_text()
    );
    // Both later events were refused; the failure names one of them.
    let logs = relay.stderr_text();
    assert!(
        logs.contains("could not be published")
            && (logs.contains("\"good\" seq_nr 1") || logs.contains("\"poison\" seq_nr 7")),
        "{logs}"
    );
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        warm_end <= confirmed && confirmed < poison_end,
        "slot confirmed to {confirmed}, not between {warm_end} and {poison_end}"
    );
    assert_only(&kafka, &[("warm", 1)]);
}

#[tokio::test]
async fn a_missing_topic_is_a_clear_error() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    let mut relay = Walrelay::start(
        &url(&pg),
        &kafka.bootstrap(),
        &[
            "--topic",
            "no_such_topic",
            "--kafka-property",
            "allow.auto.create.topics=false",
        ],
    );
    assert_eq!(relay.wait(WAIT).await.code(), Some(1));
    let logs = relay.stderr_text();
    assert!(
        logs.contains("topic \"no_such_topic\" does not exist"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_broker_that_stops_answering_holds_the_slot_until_it_answers_again() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "before", 10, 10, 0, &mut seqs).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;

    // Every answer now takes 12 s: the broker is frozen, not gone.
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::from_secs(12))
        .unwrap();
    let held_at = slot_confirmed(&pg, "walrelay").await;
    committed.extend(write_mixed(&mut client, "frozen", 10, 20, 0, &mut seqs).await);
    let end = current_lsn(&pg).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = slot_confirmed(&pg, "walrelay").await;
        assert!(
            now < end && now >= held_at,
            "slot at {now} while the broker was frozen"
        );
    }
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    wait_confirmed(&pg, "walrelay", end).await;
    assert!(relay.exited().is_none());
    // Acknowledgements held back for 12 s, then all at once, on an idle
    // server: the replication connection must not look stalled meanwhile.
    assert_eq!(
        metric(metrics, r#"walrelay_reconnects_total{target="postgres"}"#),
        0,
        "{}",
        relay.stderr_text()
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
