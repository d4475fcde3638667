//! The bank under crashes: concurrent clients run commands while walrelay
//! and the consumer are each killed with SIGKILL and started again, several
//! times. Afterwards every balance is the one the events table adds up to,
//! every event was applied exactly once, and the clients that waited read
//! their own writes and saw their events published.
//!
//! Why it proves the point: walrelay's kills replay events it had published
//! but not confirmed (the test checks the topic holds duplicates), the
//! consumer's kills lose offset commits and database transactions in flight,
//! and the clients race for the same accounts (the test checks that some
//! lost the race for a `seq_nr`). The checks after the run are the test's
//! own SQL over the events table, not the example's `verify` (which must
//! agree).
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::bank::BankEnv;
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, TRUST_USER};
use crate::support::walrelay::{Walrelay, free_local_addr, wait_for_metric};

const WAIT: Duration = Duration::from_secs(60);

/// Kills of each process.
const KILLS: usize = 3;

/// The consumer, as the test runs it: a session timeout shorter than the
/// example's 6 s, so that the group gives a killed consumer's partitions to
/// the next one sooner. Not below 4 s: the mock cluster holds a new group's
/// first JoinGroup for 3 s, and drops a member whose session times out
/// meanwhile (its JoinGroup then goes unanswered).
const CONSUME: [&str; 5] = [
    "consume",
    "--kafka-property",
    "session.timeout.ms=4000",
    "--kafka-property",
    "heartbeat.interval.ms=1000",
];

/// The clients: two that only run commands (20 a second at most, which
/// the consumer keeps up with), two that also wait until each
/// event is published and then read their own write. They share three
/// accounts, so they race.
const FAST_LOAD: [&str; 8] = [
    "load",
    "--clients=2",
    "--accounts=3",
    "--prefix=acc",
    "--duration=10m",
    "--pause=50ms",
    "--seed=1",
    "--max-attempts=20",
];
const CAREFUL_LOAD: [&str; 11] = [
    "load",
    "--clients=2",
    "--accounts=3",
    "--prefix=acc",
    "--duration=10m",
    "--seed=2",
    "--max-attempts=20",
    "--read-your-writes",
    "--read-timeout=60s",
    "--wait-published",
    "--publish-timeout=60s",
];

async fn count(pg: &PgServer, sql: &str) -> i64 {
    pg.psql(sql)
        .await
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits until the consumer has applied another event.
async fn applies_more(pg: &PgServer, consumer: &Walrelay) {
    let applied = "SELECT count(*) FROM balances_applied";
    let before = count(pg, applied).await;
    let deadline = Instant::now() + WAIT;
    while count(pg, applied).await <= before {
        assert!(
            Instant::now() < deadline,
            "the consumer applies nothing:\n{}",
            consumer.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a load (SIGTERM) and returns its summary line.
async fn summary(mut load: Walrelay) -> serde_json::Value {
    let status = load.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    let stdout = load.stdout_lines();
    assert!(
        status.success(),
        "{status}\n{stdout:?}\n{}",
        load.stderr_text()
    );
    serde_json::from_str(stdout.last().expect("a summary")).expect("a JSON summary")
}

/// Each event's signed amount, by aggregate and seq_nr, from the events
/// table: the test's own reading of it.
const DELTAS: &str = "SELECT aggregate_id, seq_nr, CASE event_type \
       WHEN 'MoneyDeposited' THEN (payload->>'amount')::bigint \
       WHEN 'MoneyWithdrawn' THEN -(payload->>'amount')::bigint ELSE 0 END AS delta FROM events";

#[tokio::test]
async fn balances_match_the_events_and_each_event_is_applied_once_through_sigkills_of_walrelay_and_the_consumer()
 {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 8);
    let relay_url = pg.url(TRUST_USER, None, "sslmode=disable");
    // One address for every walrelay started, so that the clients waiting
    // on /progress find the next one.
    let metrics = free_local_addr();
    let metrics_arg = metrics.to_string();
    let brokers = kafka.bootstrap();
    let relay_args = [
        "run",
        "--postgres-url",
        &relay_url,
        "--kafka-brokers",
        &brokers,
        "--metrics-addr",
        &metrics_arg,
    ];
    let start_relay = || async {
        let mut relay = Walrelay::spawn(&relay_args, &[]);
        relay.wait_for_stderr("streaming", WAIT).await;
        relay
    };
    let bank = BankEnv {
        postgres_url: pg.superuser_url(),
        kafka_brokers: kafka.bootstrap(),
        walrelay_url: format!("http://{metrics}"),
    };
    bank.ok(&["setup"]).await;
    let mut relay = start_relay().await;
    // Acknowledgements come late: events are in flight when walrelay dies.
    kafka.set_round_trip_time(Duration::from_millis(20));
    let mut consumer = bank.spawn(&CONSUME);
    let fast = bank.spawn(&FAST_LOAD);
    let careful = bank.spawn(&CAREFUL_LOAD);

    let mut rng = fastrand::Rng::with_seed(12);
    for _ in 0..KILLS {
        // The consumer dies while it applies: it has applied something
        // since it started (and joined the group).
        applies_more(&pg, &consumer).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..300))).await;
        consumer.kill().await;
        consumer = bank.spawn(&CONSUME);

        // walrelay dies with events in flight, while the new consumer joins.
        tokio::time::sleep(Duration::from_millis(rng.u64(200..800))).await;
        wait_for_metric(metrics, "walrelay_inflight_events", |n| n > 0, WAIT).await;
        relay.kill().await;
        relay = start_relay().await;
    }
    // The last ones work too: events pass through them to the read model.
    applies_more(&pg, &consumer).await;
    let fast = summary(fast).await;
    let careful = summary(careful).await;
    let events = assert_applied_once_and_balanced(&pg, &consumer).await;

    // The example's own check agrees.
    let verified = bank.json(&["verify", "--timeout", "60s"]).await;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["events"], events);

    // The clients that waited published and read every write of theirs.
    assert!(careful["appended"].as_u64().unwrap() > 0, "{careful}");
    assert_eq!(careful["reads_failed"], 0, "{careful}");
    assert_eq!(careful["publish_failed"], 0, "{careful}");
    assert_eq!(careful["reads_checked"], careful["appended"], "{careful}");
    assert_eq!(careful["published"], careful["appended"], "{careful}");

    // The premises: the clients raced, some withdrawals were refused for
    // the balance, and walrelay's kills replayed events that the consumer
    // then had to skip.
    let conflicts = fast["conflicts"].as_u64().unwrap() + careful["conflicts"].as_u64().unwrap();
    assert!(
        conflicts > 0,
        "no client lost a race for a seq_nr: {fast} {careful}"
    );
    let overdrafts = fast["overdrafts_refused"].as_u64().unwrap()
        + careful["overdrafts_refused"].as_u64().unwrap();
    assert!(
        overdrafts > 0,
        "no withdrawal was refused for the balance: {fast} {careful}"
    );
    let mut reader = kafka.reader("events");
    reader.catch_up(WAIT);
    let mut copies: HashMap<(String, i64), usize> = HashMap::new();
    for record in &reader.records {
        *copies
            .entry((record.key.clone(), record.seq_nr()))
            .or_default() += 1;
    }
    assert_eq!(
        i64::try_from(copies.len()).unwrap(),
        events,
        "events missing from the topic"
    );
    let replayed = copies.values().filter(|n| **n > 1).count();
    assert!(replayed > 0, "walrelay's kills replayed nothing");
    eprintln!(
        "{events} events, {} records ({replayed} events replayed), {conflicts} races lost, \
         {overdrafts} overdrafts refused; clients: {fast} {careful}",
        reader.records.len()
    );
}

/// Waits until every event of the events table was applied, then checks the
/// read model against the table with the test's own SQL; returns the number
/// of events.
async fn assert_applied_once_and_balanced(pg: &PgServer, consumer: &Walrelay) -> i64 {
    // Everything reaches the read model: every event applied.
    let applied = "SELECT count(*) FROM balances_applied";
    let unapplied = "SELECT count(*) FROM events e WHERE NOT EXISTS \
        (SELECT FROM balances_applied a WHERE a.aggregate_id = e.aggregate_id AND a.seq_nr = e.seq_nr)";
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(pg, unapplied).await > 0 {
        assert!(
            Instant::now() < deadline,
            "events left unapplied:\n{}",
            consumer.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every balance as the events add up, never below zero on the way, and
    // every aggregate's seq_nrs 1, 2, 3, ... without a hole.
    let wrong_balances = count(
        pg,
        &format!(
            "SELECT count(*) FROM (SELECT aggregate_id, sum(delta) AS balance FROM ({DELTAS}) d \
             GROUP BY aggregate_id) c FULL JOIN balances b ON b.account_id = c.aggregate_id \
             WHERE c.balance IS DISTINCT FROM b.balance"
        ),
    )
    .await;
    assert_eq!(
        wrong_balances,
        0,
        "balances differ from the events table:\n{}",
        pg.psql(&format!(
            "SELECT c.aggregate_id, c.balance, b.balance FROM (SELECT aggregate_id, sum(delta) AS balance \
             FROM ({DELTAS}) d GROUP BY aggregate_id) c FULL JOIN balances b ON b.account_id = c.aggregate_id"
        ))
        .await
    );
    let overdrawn = count(
        pg,
        &format!(
            "SELECT count(*) FROM (SELECT sum(delta) OVER (PARTITION BY aggregate_id ORDER BY seq_nr) \
             AS running FROM ({DELTAS}) d) r WHERE running < 0"
        ),
    )
    .await;
    assert_eq!(overdrawn, 0, "a withdrawal took an account below zero");
    let holes = count(
        pg,
        "SELECT count(*) FROM (SELECT aggregate_id FROM events GROUP BY aggregate_id \
         HAVING max(seq_nr) <> count(*)) h",
    )
    .await;
    assert_eq!(holes, 0);

    // Applied exactly once: one application per event, none of anything else.
    let twice = count(
        pg,
        "SELECT count(*) FROM (SELECT FROM balances_applied GROUP BY aggregate_id, seq_nr \
         HAVING count(*) > 1) t",
    )
    .await;
    assert_eq!(twice, 0, "events applied more than once");

    let events = count(pg, "SELECT count(*) FROM events").await;
    assert_eq!(count(pg, applied).await, events);
    events
}
