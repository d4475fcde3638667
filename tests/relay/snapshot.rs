//! First start over a table that already holds events: those rows first,
//! then the stream, with no gap and nothing twice.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;
use crate::support::workload::{EventId, Written, check, write_mixed};

const WAIT: Duration = Duration::from_secs(120);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// Inserts `per` events for each of `aggregates` aggregates named `{prefix}-{n}`.
async fn existing(pg: &PgServer, prefix: &str, aggregates: usize, per: usize) -> Vec<EventId> {
    pg.psql(&format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
         SELECT '{prefix}-' || a, s, 'Old', jsonb_build_object('a', a, 's', s)
           FROM generate_series(0, {}) AS a, generate_series(1, {per}) AS s;",
        aggregates - 1
    ))
    .await;
    (0..aggregates)
        .flat_map(|a| (1..=per).map(move |s| (format!("{prefix}-{a}"), i64::try_from(s).unwrap())))
        .collect()
}

#[tokio::test]
async fn existing_rows_then_live_ones_arrive_exactly_once() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let mut committed = existing(&pg, "old", 500, 10).await;

    let mut relay = Walrelay::spawn(
        &[
            "run",
            "--postgres-url",
            &url(&pg),
            "--kafka-brokers",
            &kafka.bootstrap(),
            "--metrics-addr",
            &crate::support::walrelay::free_local_addr().to_string(),
        ],
        &[],
    );
    relay
        .wait_for_stderr("created the replication slot", WAIT)
        .await;
    // Live writes race with the snapshot being published.
    let mut client = pg.client().await;
    let mut seqs: HashMap<String, i64> = (0..500).map(|a| (format!("old-{a}"), 11)).collect();
    committed.extend(
        write_mixed(&mut client, "old", 500, 1000, 0, &mut seqs)
            .await
            .into_iter()
            .map(|w| w.id),
    );
    relay
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;

    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert_eq!(records.len(), committed.len(), "exactly once");
    // The marker of an unfinished snapshot is gone.
    assert_eq!(
        pg.psql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots")
            .await,
        "walrelay"
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn snapshot_never_starts_with_what_commits_next() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    existing(&pg, "old", 10, 3).await;
    let (mut relay, _) =
        Walrelay::run(&url(&pg), &kafka.bootstrap(), &["--snapshot", "never"]).await;
    let committed = write_mixed(&mut pg.client().await, "new", 5, 10, 0, &mut HashMap::new()).await;
    let records = kafka.read("events", committed.len(), Duration::from_secs(60));
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn an_interrupted_snapshot_starts_again_and_loses_nothing() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let committed = existing(&pg, "old", 1000, 50).await;
    let args = [
        "run",
        "--postgres-url",
        &url(&pg),
        "--kafka-brokers",
        &kafka.bootstrap(),
    ];
    // Each round trip to the broker takes a second, so the snapshot is
    // still under way when its first rows have been acknowledged.
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::from_secs(1))
        .unwrap();
    let metrics = crate::support::walrelay::free_local_addr();
    let mut first = Walrelay::spawn(
        &[&args[..], &["--metrics-addr", &metrics.to_string()]].concat(),
        &[],
    );
    first.wait_for_stderr("publishing the rows", WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while crate::support::walrelay::metric(metrics, "walrelay_events_published_total") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no row acknowledged:\n{}",
            first.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.stop_with(Signal::SIGKILL).await;
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    assert_eq!(
        slots(&pg).await,
        "walrelay,walrelay_init",
        "killed before or after the snapshot: {}",
        first.stderr_text()
    );

    let mut second = Walrelay::spawn(
        &[
            &args[..],
            &[
                "--metrics-addr",
                &crate::support::walrelay::free_local_addr().to_string(),
            ],
        ]
        .concat(),
        &[],
    );
    second
        .wait_for_stderr("was interrupted; starting it again", WAIT)
        .await;
    second
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(true, &second.stderr_text());
    assert_eq!(
        pg.psql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots")
            .await,
        "walrelay"
    );
    assert_eq!(second.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// `walrelay run` against `pg` and `kafka` with `extra` flags, not waited for.
fn spawn_run(pg: &PgServer, kafka: &Kafka, extra: &[&str]) -> Walrelay {
    let metrics = crate::support::walrelay::free_local_addr().to_string();
    let url = url(pg);
    let brokers = kafka.bootstrap();
    let mut args = vec![
        "run",
        "--postgres-url",
        &url,
        "--kafka-brokers",
        &brokers,
        "--metrics-addr",
        &metrics,
    ];
    args.extend_from_slice(extra);
    Walrelay::spawn(&args, &[])
}

/// The slots of the cluster, sorted, comma-separated.
async fn slots(pg: &PgServer) -> String {
    pg.psql("SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pg_replication_slots")
        .await
}

#[tokio::test]
async fn a_cut_replication_connection_does_not_strand_the_snapshot() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let committed = existing(&pg, "old", 100, 20).await;
    // Acknowledgements take seconds, so the snapshot is still being published
    // when the connection is cut.
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    let mut relay = spawn_run(&pg, &kafka, &[]);
    relay.wait_for_stderr("publishing the rows", WAIT).await;
    // The replication connection that created the slot is closed once the
    // snapshot is imported: no walsender of walrelay's is left for a NAT or a
    // load balancer to cut while the rows are published.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let walsenders = pg
            .psql(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE backend_type = 'walsender' AND application_name = 'walrelay'",
            )
            .await;
        assert!(
            !relay.stderr_text().contains("initial snapshot published"),
            "the snapshot ended before the check"
        );
        if walsenders == "0" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a walsender of walrelay's stays open during the snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_stat_replication").await,
        "0"
    );
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    relay
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;
    assert_eq!(slots(&pg).await, "walrelay", "the marker is left behind");
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    relay.wait_for_stderr("streaming", WAIT).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn the_servers_session_timeouts_do_not_end_a_snapshot_waiting_on_a_slow_broker() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let committed = existing(&pg, "old", 50, 10).await;
    // Timeouts far shorter than the snapshot's waits on the broker, for
    // walrelay's role: inside the snapshot's transaction (a full producer
    // queue), and after it while the acknowledgements come in.
    pg.psql(&format!(
        "ALTER ROLE {SCRAM_USER} SET idle_in_transaction_session_timeout = '1s';
         ALTER ROLE {SCRAM_USER} SET statement_timeout = '1s';
         ALTER ROLE {SCRAM_USER} SET idle_session_timeout = '2s';"
    ))
    .await;
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::from_secs(2))
        .unwrap();
    let mut relay = spawn_run(
        &pg,
        &kafka,
        &["--kafka-property", "queue.buffering.max.messages=100"],
    );
    relay
        .wait_for_stderr("initial snapshot published", Duration::from_secs(90))
        .await;
    assert_eq!(slots(&pg).await, "walrelay", "the marker is left behind");
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert!(
        !relay.stderr_text().contains("25P03") && !relay.stderr_text().contains("57014"),
        "{}",
        relay.stderr_text()
    );
    relay.wait_for_stderr("streaming", WAIT).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Writes 300 transactions over 100 aggregates named `{prefix}-{n}` on a task
/// of its own; the task returns the committed events.
async fn spawn_writer(
    pg: &PgServer,
    prefix: &'static str,
) -> tokio::task::JoinHandle<Vec<Written>> {
    let mut client = pg.client().await;
    tokio::spawn(
        async move { write_mixed(&mut client, prefix, 100, 300, 0, &mut HashMap::new()).await },
    )
}

/// Waits until `condition` holds for the logs of `relays`, all of which must stay up.
async fn until_logs(relays: &mut [Walrelay], what: &str, condition: impl Fn(&[String]) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let logs: Vec<String> = relays.iter().map(Walrelay::stderr_text).collect();
        if condition(&logs) {
            return;
        }
        let exited = relays.iter_mut().any(|r| r.exited().is_some());
        assert!(
            !exited && tokio::time::Instant::now() < deadline,
            "never: {what}\n{}",
            logs.join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn instances_started_together_wait_for_one_first_start_and_lose_nothing() {
    const WAITING: &str = "waiting for another instance's first start";
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let mut committed = existing(&pg, "old", 1000, 20).await;
    // The broker is away at first: whichever instance creates the slot holds
    // its first start open until the broker is back, however the processes
    // get scheduled.
    kafka.set_all_brokers(false);
    // Writes go on while the instances start: some commit before the slot's
    // consistent point (snapshot rows), some after (streamed).
    let early = spawn_writer(&pg, "early").await;
    let mut relays = vec![spawn_run(&pg, &kafka, &[]), spawn_run(&pg, &kafka, &[])];
    until_logs(
        &mut relays,
        "one creates the slot, the other waits",
        |logs| {
            logs.iter()
                .any(|l| l.contains("created the replication slot"))
                && logs.iter().any(|l| l.contains(WAITING))
        },
    )
    .await;
    // One more, started while the snapshot is under way (the marker is
    // there, inactive), waits too, and still answers SIGTERM at once.
    let mut late = [spawn_run(&pg, &kafka, &[])];
    until_logs(&mut late, "the late instance waits", |logs| {
        logs[0].contains(WAITING)
    })
    .await;
    let [mut late] = late;
    assert_eq!(
        late.stop_with(Signal::SIGTERM).await.code(),
        Some(0),
        "{}",
        late.stderr_text()
    );

    // And while the snapshot is published and the instances settle.
    let late_writes = spawn_writer(&pg, "late").await;
    kafka.set_all_brokers(true);
    committed.extend(early.await.unwrap().into_iter().map(|w| w.id));
    committed.extend(late_writes.await.unwrap().into_iter().map(|w| w.id));

    until_logs(
        &mut relays,
        "one instance streams, the other stands by",
        |logs| {
            logs.iter().any(|l| l.contains("streaming"))
                && logs.iter().any(|l| l.contains("standing by"))
        },
    )
    .await;
    let records = kafka.read("events", committed.len(), WAIT);
    let logs = [&relays[0], &relays[1], &late]
        .map(Walrelay::stderr_text)
        .join("\n----\n");
    check(&committed, &records).assert_clean(true, &logs);
    assert!(!logs.contains("interrupted"), "{logs}");
    // The instance that waited found the slot and resumed from it.
    assert!(logs.contains("resuming from the slot"), "{logs}");
    assert_eq!(slots(&pg).await, "walrelay", "{logs}");
    for mut relay in relays {
        assert!(relay.exited().is_none(), "{}", relay.stderr_text());
        assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    }
}

#[tokio::test]
async fn the_marker_stays_until_a_refused_rows_dead_letter_record_is_acknowledged() {
    let pg = PgServer::start_default().await;
    // The dead-letter topic lives on a broker of its own, which is down: its
    // records wait in the producer while the main topic's are acknowledged.
    let kafka = Kafka::start(2, 1);
    let cluster = kafka.cluster();
    cluster.partition_leader("events", 0, Some(1)).unwrap();
    cluster.create_topic("dead", 1, 1).unwrap();
    cluster.partition_leader("dead", 0, Some(2)).unwrap();
    cluster.broker_down(2).unwrap();
    let committed = existing(&pg, "old", 3, 2).await;
    // The broker refuses the first produce request for good: its rows go to
    // the dead-letter topic instead.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let mut relay = spawn_run(
        &pg,
        &kafka,
        &["--on-poison", "dead-letter", "--dead-letter-topic", "dead"],
    );
    relay
        .wait_for_stderr("sending it to the dead-letter topic", WAIT)
        .await;
    // Still waiting for acknowledgements, or done too early.
    until_logs(
        std::slice::from_mut(&mut relay),
        "the snapshot is done or waits",
        |logs| {
            logs[0].contains("waiting for the broker to acknowledge the snapshot")
                || logs[0].contains("initial snapshot published")
        },
    )
    .await;
    assert_eq!(
        slots(&pg).await,
        "walrelay,walrelay_init",
        "the marker went before the dead-letter record was acknowledged:\n{}",
        relay.stderr_text()
    );
    assert!(!relay.stderr_text().contains("initial snapshot published"));

    cluster.broker_up(2).unwrap();
    relay
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;
    assert_eq!(slots(&pg).await, "walrelay");
    // Every row is on the topic or described on the dead-letter topic.
    let published = kafka.read("events", 0, Duration::from_secs(2));
    let dead = kafka.read("dead", committed.len() - published.len(), WAIT);
    let mut seen: Vec<EventId> = published
        .iter()
        .map(|r| (r.key.clone(), r.seq_nr()))
        .chain(dead.iter().map(|r| {
            let v: serde_json::Value = serde_json::from_str(r.value.as_deref().unwrap()).unwrap();
            (
                v["aggregate_id"].as_str().unwrap().to_owned(),
                v["seq_nr"].as_str().unwrap().parse().unwrap(),
            )
        }))
        .collect();
    seen.sort();
    seen.dedup();
    let mut expected = committed.clone();
    expected.sort();
    assert!(!dead.is_empty());
    assert_eq!(seen, expected, "{}", relay.stderr_text());
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
