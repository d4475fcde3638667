//! The query side: read-your-writes across walrelay and the consumer, and
//! what the consumer does with a replay and with a gap in an aggregate's
//! `seq_nr`s (records produced by the test, standing for a broken upstream).
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::support::bank::{BankEnv, code};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, TRUST_USER};
use crate::support::walrelay::Walrelay;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_query_can_wait_until_the_read_model_has_applied_its_own_write() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let walrelay_url = pg.url(TRUST_USER, None, "sslmode=disable");
    let (_relay, metrics) = Walrelay::run(&walrelay_url, &kafka.bootstrap(), &[]).await;
    let bank = BankEnv {
        postgres_url: pg.superuser_url(),
        kafka_brokers: kafka.bootstrap(),
        walrelay_url: format!("http://{metrics}"),
    };
    bank.ok(&["setup"]).await;

    bank.json(&["open", "acc"]).await;
    let deposited = bank
        .json(&["deposit", "acc", "100", "--wait-published"])
        .await;
    assert_eq!(deposited["published"], true);
    assert_eq!(deposited["seq_nr"], 2);
    // --wait-published returned: the event is on the topic already.
    let mut reader = kafka.reader("events");
    reader.catch_up(WAIT);
    assert!(
        reader
            .records
            .iter()
            .any(|r| r.key == "acc" && r.seq_nr() == 2),
        "the deposit is not on the topic"
    );

    // No consumer yet: a bounded wait ends, saying what it saw.
    let output = bank
        .run(&["balance", "acc", "--at-least-seq", "2", "--timeout", "1s"])
        .await;
    assert_eq!(code(&output), 5);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("up to seq_nr 0, not yet 2"), "{stderr}");

    // A reader waiting for its write, then the consumer: it reads it.
    let mut reading = bank.spawn(&["balance", "acc", "--at-least-seq", "2", "--timeout", "60s"]);
    let _consumer = bank.spawn(&["consume"]);
    let status = reading.wait(WAIT).await;
    assert!(status.success(), "{}", reading.stderr_text());
    let read: serde_json::Value = serde_json::from_str(&reading.stdout_lines().join("")).unwrap();
    assert_eq!(
        read,
        serde_json::json!({"account_id": "acc", "balance": 100, "seq_nr": 2})
    );
}

/// Produces one record of `aggregate`'s event `seq` to `partition`, as
/// walrelay would publish it.
async fn produce(
    producer: &FutureProducer,
    partition: i32,
    aggregate: &str,
    seq: i64,
    event_type: &str,
    payload: &str,
) {
    let seq = seq.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "seq_nr",
            value: Some(&seq),
        })
        .insert(Header {
            key: "event_type",
            value: Some(event_type),
        })
        .insert(Header {
            key: "lsn",
            value: Some("0/1"),
        });
    producer
        .send(
            FutureRecord::to("events")
                .partition(partition)
                .key(aggregate)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("produced");
}

/// PostgreSQL with the read model, a topic `events` of `partitions`
/// partitions, a producer to stand for walrelay, and the bank's environment.
async fn without_walrelay(partitions: i32) -> (PgServer, Kafka, FutureProducer, BankEnv) {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, partitions);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .unwrap();
    let bank = BankEnv {
        postgres_url: pg.superuser_url(),
        kafka_brokers: kafka.bootstrap(),
        ..BankEnv::default()
    };
    bank.ok(&["setup"]).await;
    (pg, kafka, producer, bank)
}

/// Polls `sql` (one value) until it reads `expected`.
async fn wait_for(pg: &PgServer, sql: &str, expected: &str, consumer: &Walrelay) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = pg.psql(sql).await;
        if value == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {value:?}, not {expected:?}\n{}",
            consumer.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The group's committed offset of a partition of `events` (`None`: none).
fn committed(kafka: &Kafka, partition: i32) -> Option<i64> {
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "bank-balances")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition("events", partition);
    let offsets = group
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    match offsets
        .find_partition("events", partition)
        .unwrap()
        .offset()
    {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

#[tokio::test]
async fn a_gap_stops_its_partition_until_the_missing_event_arrives_and_a_replay_is_skipped() {
    let (pg, kafka, producer, bank) = without_walrelay(2).await;
    let deposit = |amount: i64| format!("{{\"amount\": {amount}}}");

    // Partition 0: a's event 2 is missing before its 3, and b's first
    // event waits behind it. Partition 1 goes on meanwhile.
    produce(&producer, 0, "a", 1, "AccountOpened", "{}").await;
    produce(&producer, 0, "a", 3, "MoneyDeposited", &deposit(30)).await;
    produce(&producer, 0, "b", 1, "AccountOpened", "{}").await;
    produce(&producer, 1, "c", 1, "AccountOpened", "{}").await;
    let consumer = bank.spawn(&["consume", "--stuck-retry", "300ms"]);
    let position = |id: &str| {
        format!(
            "SELECT coalesce((SELECT last_seq_nr FROM balances_position WHERE aggregate_id = '{id}'), 0)"
        )
    };
    wait_for(&pg, &position("c"), "1", &consumer).await;
    wait_for(&pg, &position("a"), "1", &consumer).await;
    wait_for(
        &pg,
        "SELECT kafka_partition || ' ' || kafka_offset || ' ' || aggregate_id || ' ' || seq_nr \
         FROM balances_stuck",
        "0 1 a 3",
        &consumer,
    )
    .await;
    // Several tries later (every 300 ms), still stopped: nothing of a past
    // its event 1, nothing of b, no offset committed past the gap.
    let mut retried = consumer;
    retried
        .wait_for_stderr_count("the partition stops here", 3, WAIT)
        .await;
    assert!(
        retried
            .stderr_text()
            .contains("seq_nr gap: a has events applied up to 1"),
        "{}",
        retried.stderr_text()
    );
    assert_eq!(pg.psql(&position("a")).await, "1");
    assert_eq!(pg.psql(&position("b")).await, "0");
    assert!(committed(&kafka, 0).is_none_or(|offset| offset <= 1));

    // The missing event turns up in the other partition (as after partitions
    // were added while a's events were in flight): a's 2, then its 3 and b's
    // 1 apply, and the partition goes on. A replay of a's 2 is skipped.
    produce(&producer, 1, "a", 2, "MoneyDeposited", &deposit(20)).await;
    produce(&producer, 1, "a", 2, "MoneyDeposited", &deposit(20)).await;
    wait_for(&pg, &position("b"), "1", &retried).await;
    assert_eq!(pg.psql(&position("a")).await, "3");
    assert_eq!(
        pg.psql("SELECT account_id || ' ' || balance FROM balances ORDER BY 1")
            .await,
        "a 50\nb 0\nc 0"
    );
    assert_eq!(
        pg.psql(
            "SELECT aggregate_id || ' ' || seq_nr || ' ' || count(*) FROM balances_applied \
             GROUP BY aggregate_id, seq_nr ORDER BY 1"
        )
        .await,
        "a 1 1\na 2 1\na 3 1\nb 1 1\nc 1 1"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM balances_stuck").await, "0");
    retried.wait_for_stderr("the partition goes on", WAIT).await;
}

/// Polls until the group's committed offset of partition 0 is `expected`.
async fn wait_for_committed(kafka: &Kafka, expected: i64, consumer: &Walrelay) {
    let deadline = Instant::now() + WAIT;
    while committed(kafka, 0) != Some(expected) {
        assert!(
            Instant::now() < deadline,
            "committed offset {:?}, not {expected}\n{}",
            committed(kafka, 0),
            consumer.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_offset_is_committed_after_the_database_transaction_and_a_crash_between_replays_the_record()
 {
    let (pg, kafka, producer, bank) = without_walrelay(1).await;
    let position = "SELECT coalesce((SELECT last_seq_nr FROM balances_position \
                    WHERE aggregate_id = 'a'), 0)";

    produce(&producer, 0, "a", 1, "AccountOpened", "{}").await;
    let mut consumer = bank.spawn(&["consume"]);
    wait_for(&pg, position, "1", &consumer).await;
    wait_for_committed(&kafka, 1, &consumer).await;

    // The test holds a's position row: the consumer's transaction for a's
    // next event (offset 1) waits on it, inside the transaction.
    let holder = pg.client().await;
    holder
        .batch_execute("BEGIN; SELECT FROM balances_position WHERE aggregate_id = 'a' FOR UPDATE")
        .await
        .unwrap();
    produce(&producer, 0, "a", 2, "MoneyDeposited", "{\"amount\": 20}").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting = pg
            .psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'bank' AND wait_event_type = 'Lock'",
            )
            .await;
        if waiting == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer never waited on a's row:\n{}",
            consumer.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its transaction has not committed: neither has the offset.
    assert_eq!(committed(&kafka, 0), Some(1));

    // It dies there; its transaction goes with its connection.
    consumer.kill().await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(pg.psql(position).await, "1");

    // The next consumer reads the record again and applies it, once.
    let consumer = bank.spawn(&["consume"]);
    wait_for(&pg, position, "2", &consumer).await;
    wait_for_committed(&kafka, 2, &consumer).await;
    assert_eq!(
        pg.psql("SELECT balance FROM balances WHERE account_id = 'a'")
            .await,
        "20"
    );
    assert_eq!(
        pg.psql("SELECT seq_nr || ' ' || kafka_offset FROM balances_applied ORDER BY 1")
            .await,
        "1 0\n2 1"
    );
}
