//! The confirm path end to end: the slot never moves back when a standby
//! takes over, and what follows a refused event is not delivered before it.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use walrelay::pg::lsn::Lsn;

use super::delivery::{current_lsn, wait_confirmed};
use crate::support::kafka::{Kafka, Record};
use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, free_local_addr};
use crate::support::workload::{EventId, check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// One reading of the slot: its `confirmed_flush_lsn`, and the flush position
/// its holder last reported (`pg_stat_replication.flush_lsn`, which the
/// walsender records as sent, before any check of its own).
#[derive(Debug, Clone, Copy)]
struct SlotReading {
    confirmed: Lsn,
    holder: Option<i32>,
    reported: Option<Lsn>,
}

/// Reads the slot every 20 ms on a connection of its own until stopped.
struct SlotSampler {
    samples: Arc<Mutex<Vec<SlotReading>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SlotSampler {
    async fn start(pg: &PgServer, slot: &str) -> Self {
        let client = pg.client().await;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (into, until, slot) = (Arc::clone(&samples), stop.clone(), slot.to_owned());
        let task = tokio::spawn(async move {
            let query = client
                .prepare(
                    "SELECT s.confirmed_flush_lsn::text, r.flush_lsn::text, s.active_pid
                       FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                      WHERE s.slot_name = $1",
                )
                .await
                .unwrap();
            while !until.is_cancelled() {
                let row = client.query_one(&query, &[&slot]).await.unwrap();
                let lsn = |i: usize| {
                    row.get::<_, Option<String>>(i)
                        .and_then(|l| l.parse::<Lsn>().ok())
                };
                if let Some(confirmed) = lsn(0) {
                    into.lock().unwrap().push(SlotReading {
                        confirmed,
                        holder: row.get(2),
                        reported: lsn(1),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        SlotSampler {
            samples,
            stop,
            task,
        }
    }

    /// Waits until a holder other than `pid` reported a flush position.
    async fn wait_for_report_from_other_than(&self, pid: i32) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self
            .samples
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.holder.is_some_and(|h| h != pid) && r.reported.is_some())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no status update from a new holder"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> Vec<SlotReading> {
        self.stop.cancel();
        self.task.await.unwrap();
        Arc::try_unwrap(self.samples).unwrap().into_inner().unwrap()
    }
}

#[tokio::test]
async fn an_instance_that_takes_the_slot_back_never_reports_less_than_the_slot_has() {
    // A short wal_sender_timeout, so that a frozen holder loses the slot fast.
    let pg = PgServer::start(PgOptions {
        extra_conf: vec!["wal_sender_timeout = '3s'".into()],
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 4);
    let (mut first, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "a", 5, 10, 0, &mut seqs).await;
    let first_at = wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;

    // Its broker goes away, so its next events stay in flight; then it freezes
    // (a long GC pause, a suspended VM) and the server drops its connection.
    kafka.set_all_brokers(false);
    committed.extend(write_mixed(&mut client, "b", 5, 10, 0, &mut seqs).await);
    first.signal(Signal::SIGSTOP);

    // A second instance (publishing to a cluster of its own) takes over and
    // moves the slot on.
    let other = Kafka::start(1, 4);
    let second_addr = free_local_addr().to_string();
    let mut second = Walrelay::spawn(
        &[
            "run",
            "--postgres-url",
            &url(&pg),
            "--kafka-brokers",
            &other.bootstrap(),
            "--metrics-addr",
            &second_addr,
        ],
        &[],
    );
    second.wait_for_stderr("streaming", WAIT).await;
    committed.extend(write_mixed(&mut client, "c", 5, 10, 0, &mut seqs).await);
    let moved_to = wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert!(moved_to > first_at);
    let second_walsender: i32 = pg
        .psql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walrelay'")
        .await
        .parse()
        .unwrap();

    // The second dies; the first wakes up with its events still in flight and
    // takes the slot back. Its watermark is where it stopped (before `b`).
    let sampler = SlotSampler::start(&pg, "walrelay").await;
    second.stop_with(Signal::SIGKILL).await;
    first.signal(Signal::SIGCONT);
    first.wait_for_stderr_count("streaming", 2, WAIT).await;
    sampler
        .wait_for_report_from_other_than(second_walsender)
        .await;
    kafka.set_all_brokers(true);
    committed.extend(write_mixed(&mut client, "d", 5, 10, 0, &mut seqs).await);
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let samples = sampler.finish().await;

    // The slot never moves back (PostgreSQL 15.12 and later refuse to, older
    // servers take what they are sent)...
    assert!(samples[0].confirmed >= moved_to, "{samples:?}");
    for pair in samples.windows(2) {
        assert!(
            pair[1].confirmed >= pair[0].confirmed,
            "the slot moved back from {} to {}:\n{}",
            pair[0].confirmed,
            pair[1].confirmed,
            first.stderr_text()
        );
    }
    // ...and the instance that took it back never reported less than the
    // slot had, although its own watermark was further back.
    let low = samples
        .iter()
        .filter(|r| r.holder != Some(second_walsender))
        .find_map(|r| r.reported.filter(|reported| *reported < moved_to));
    assert!(
        low.is_none(),
        "the returning holder reported flush {} below the slot's {moved_to} (its own watermark was {first_at}):\n{}",
        low.unwrap_or_default(),
        first.stderr_text()
    );
    // Nothing is missing from the two clusters together.
    let mut records = kafka.read("events", 1, Duration::from_secs(5));
    records.extend(other.read("events", 1, Duration::from_secs(5)));
    let report = check(&committed, &records);
    assert!(
        report.missing.is_empty(),
        "missing {:?}\n{}",
        report.missing,
        first.stderr_text()
    );
    assert_eq!(first.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Inserts `count` events of aggregate `aggregate`, each in its own
/// transaction, in one round trip.
async fn one_per_transaction(pg: &PgServer, aggregate: &str, count: i64) -> Vec<EventId> {
    let mut statements = String::new();
    for seq in 1..=count {
        writeln!(
            statements,
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             VALUES ('{aggregate}', {seq}, 'Tested', '{{}}');"
        )
        .unwrap();
    }
    pg.psql(&statements).await;
    (1..=count).map(|seq| (aggregate.to_owned(), seq)).collect()
}

#[tokio::test]
async fn events_behind_a_refused_one_are_not_delivered_before_it_across_a_halt() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    // One request in flight, so that the mock broker (which does not check
    // idempotent sequence numbers) cannot have taken later batches already,
    // and one event per request, so that the first request holds the first
    // event alone and the others wait behind it.
    let args = [
        "--kafka-property",
        "max.in.flight.requests.per.connection=1",
        "--kafka-property",
        "batch.num.messages=1",
        "--exit-on-halt",
    ];
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    // The first produce request is refused for good, and answered slowly, so
    // that the events after it wait in the producer meanwhile. Kafka answers
    // the request behind a refused one OUT_OF_ORDER_SEQUENCE_NUMBER (the
    // idempotent sequence has a gap); the mock broker does not check
    // sequences, so it is told to give that answer, or it would write a
    // request librdkafka had already built when the refusal came back.
    kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
        ],
    );
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::from_millis(500))
        .unwrap();
    let committed = one_per_transaction(&pg, "agg", 200).await;
    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(3),
        "{}",
        relay.stderr_text()
    );
    let logs = relay.stderr_text();
    assert!(
        logs.contains("could not be published") && logs.contains("aggregate \"agg\" seq_nr 1 "),
        "{logs}"
    );
    // The answer meant for a request behind the refused one is left over
    // when librdkafka had not built one yet.
    kafka.cluster().clear_request_errors(RDKafkaApiKey::Produce);
    kafka
        .cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    // Nothing after the refused event reached the topic before the halt.
    let early = kafka.read("events", 1, Duration::from_secs(3));
    assert!(
        early.is_empty(),
        "delivered behind the refused event: {:?}\n{logs}",
        early.iter().map(Record::seq_nr).collect::<Vec<_>>()
    );

    // The cause is gone (the broker accepts again); the restart publishes
    // everything, and the first deliveries are in seq_nr order.
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &args).await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(true, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
