//! Crashes while events are in flight: walrelay killed (SIGKILL), PostgreSQL
//! crashed (immediate stop) and restarted, and walrelay stopped cleanly
//! (SIGTERM), in a random order, while a workload writes. After a final
//! restart everything committed is in Kafka with its exact content, first
//! deliveries keep per-aggregate order, and duplicates are bounded by the
//! replays PostgreSQL logged.
//!
//! The bound on duplicates, and why it holds: every logical decoding session
//! starts at the slot's `confirmed_flush_lsn` R and sends each transaction
//! whose commit record starts at or after R once (PostgreSQL logs R as
//! "Streaming transactions committing after R"). So an event is on the topic
//! at most as many times as sessions started at or before its commit LSN.
//! Since walrelay confirms only what the broker acknowledged, R after a
//! crash is at most the in-flight window behind what the dead process had
//! published: the duplicates of each crash are the events it had published
//! but not yet confirmed. A SIGTERM adds at most the one transaction that was
//! open when the signal came (walrelay stops reading mid-transaction, and
//! that transaction's events published so far are not confirmable). A
//! SIGKILL replays at most what the producer held (its queue bound,
//! `queue.buffering.max.messages`, set low here so that a regression that
//! replays everything shows) plus the transaction open at the kill.
use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walrelay::pg::lsn::Lsn;

use super::delivery::{current_lsn, wait_confirmed};
use crate::support::kafka::{Kafka, Record};
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, wait_for_metric};
use crate::support::workload::{Mix, Report, Writer, check};

/// The faults, in the order a seeded shuffle gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of walrelay.
    Kill,
    /// `pg_ctl stop -m immediate` (every server process dies at once, no
    /// shutdown checkpoint), then a start: crash recovery.
    PostgresCrash,
    /// SIGTERM of walrelay: a clean stop.
    Term,
}

const KILLS: usize = 12;
const POSTGRES_CRASHES: usize = 4;
const TERMS: usize = 4;

/// The producer's queue bound in this test (`queue.buffering.max.messages`).
const QUEUE_BOUND: usize = 1000;

/// The largest transaction the workload writes.
const BIG_EVENTS: usize = 300;

/// `--shutdown-timeout` of the relays: a SIGTERM must end in this.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

const WAIT: Duration = Duration::from_secs(60);

/// How each interruption went, for the bound and the summary.
#[derive(Debug)]
struct Interruption {
    fault: Fault,
    /// Decoding sessions started before it: the first one after it has this index.
    sessions_before: usize,
    /// The WAL end right after it (after the restart for a PostgreSQL crash):
    /// nothing committed later was published before it.
    wal_end: Lsn,
    /// For a SIGTERM or a SIGKILL: each partition's end right after the exit.
    published: Option<Vec<i64>>,
    /// Each partition's end when the process interrupted began its work, so
    /// that what it published lies between this and `published`.
    began: Vec<i64>,
}

#[tokio::test]
async fn sigkill_postgres_crash_and_sigterm_under_load_lose_nothing() {
    let pg = PgServer::start_default().await;
    // Partitions enough that the replays of the PostgreSQL crashes (each can
    // resend everything since the slot was last saved to disk) stay within
    // what the mock cluster keeps (5 MiB per partition).
    let kafka = Kafka::start(1, 24);
    // A slow broker keeps events in flight long enough to be caught there.
    kafka.set_round_trip_time(Duration::from_millis(100));
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let timeout = format!("{}s", SHUTDOWN_TIMEOUT.as_secs());
    let queue = format!("queue.buffering.max.messages={QUEUE_BOUND}");
    let args = [
        "--shutdown-timeout",
        timeout.as_str(),
        "--kafka-property",
        queue.as_str(),
    ];

    // The first start creates the slot; the writes begin once it streams, so
    // that every event is published from the WAL (none from the snapshot).
    let mut relay = Some(Walrelay::run(&url, &kafka.bootstrap(), &args).await);

    // Small mixed transactions, every 25th one of 300 events (so that some
    // faults land inside a transaction), every 6th rolled back.
    let stop = CancellationToken::new();
    let mix = Mix {
        big_every: 25,
        big_events: BIG_EVENTS,
        pause: Duration::from_millis(10),
        ..Mix::default()
    };
    let writer = tokio::spawn(Writer::new(pg.superuser_url(), "agg", mix, 7).run(stop.clone()));

    let mut rng = fastrand::Rng::with_seed(7);
    let mut faults: Vec<Fault> = [Fault::Kill; KILLS]
        .into_iter()
        .chain([Fault::PostgresCrash; POSTGRES_CRASHES])
        .chain([Fault::Term; TERMS])
        .collect();
    rng.shuffle(&mut faults);

    let mut interruptions = Vec::new();
    for fault in faults {
        let began = partition_ends(&kafka);
        let (mut current, metrics) = match relay.take() {
            Some(running) => running,
            None => Walrelay::run(&url, &kafka.bootstrap(), &args).await,
        };
        // Some work first, then the fault, at a moment with events in flight.
        tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
        wait_for_metric(metrics, "walrelay_inflight_events", |n| n > 0, WAIT).await;
        let sessions_before = pg.decoding_sessions("walrelay").len();
        let mut published = None;
        match fault {
            Fault::Kill => {
                current.kill().await;
                published = Some(partition_ends(&kafka));
            }
            Fault::Term => published = Some(stop_cleanly(&mut current, &kafka).await),
            Fault::PostgresCrash => {
                let streamed = current.stderr_text().matches("streaming").count();
                pg.crash().await;
                pg.restart().await;
                // The same process carries on.
                current
                    .wait_for_stderr_count("streaming", streamed + 1, WAIT * 2)
                    .await;
                relay = Some((current, metrics));
            }
        }
        interruptions.push(Interruption {
            fault,
            sessions_before,
            wal_end: current_lsn(&pg).await,
            published,
            began,
        });
    }
    stop.cancel();
    let writer = writer.await.unwrap();
    let committed = writer.committed;

    let (mut last, _) = match relay.take() {
        Some(running) => running,
        None => Walrelay::run(&url, &kafka.bootstrap(), &args).await,
    };
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let records = kafka.read("events", committed.len(), Duration::from_secs(120));
    let report = check(&committed, &records);
    let sessions = pg.decoding_sessions("walrelay");
    report.assert_clean_replays(&sessions, &last.stderr_text());

    assert_kills_replay_at_most_the_in_flight_window(&interruptions, &sessions, &records);
    assert_clean_stops_replay_at_most_one_transaction(&interruptions, &sessions, &records);
    print_windows(&interruptions, &sessions, &report);
    eprintln!(
        "{} events committed ({} transactions interrupted by crashes), {} records, {} events duplicated, {} decoding sessions",
        committed.len(),
        writer.interrupted,
        records.len(),
        report.duplicates.len(),
        sessions.len()
    );
    assert_eq!(last.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// SIGTERM under load: exit 0 within the shutdown timeout, having drained.
/// Returns each partition's end right after the exit.
async fn stop_cleanly(relay: &mut Walrelay, kafka: &Kafka) -> Vec<i64> {
    let signalled = Instant::now();
    relay.signal(Signal::SIGTERM);
    let status = relay.wait(SHUTDOWN_TIMEOUT + WAIT).await;
    let took = signalled.elapsed();
    let logs = relay.stderr_text();
    assert_eq!(status.code(), Some(0), "SIGTERM under load:\n{logs}");
    assert!(
        took < SHUTDOWN_TIMEOUT,
        "SIGTERM took {took:?}, beyond --shutdown-timeout {SHUTDOWN_TIMEOUT:?}:\n{logs}"
    );
    assert!(
        !logs.contains("stopped waiting for acknowledgements"),
        "the drain gave up with the broker up:\n{logs}"
    );
    partition_ends(kafka)
}

/// Each partition's end (high watermark) now.
fn partition_ends(kafka: &Kafka) -> Vec<i64> {
    kafka
        .watermarks("events", WAIT)
        .expect("the broker answers")
        .into_iter()
        .map(|(_, high)| high)
        .collect()
}

/// The records published before interruption `stopped` (by its partition
/// ends) that the next session sent again: those at or after where it resumed.
fn replayed<'r>(
    stopped: &Interruption,
    published: &[i64],
    sessions: &[Lsn],
    records: &'r [Record],
) -> Vec<&'r Record> {
    let resumed = sessions[stopped.sessions_before];
    records
        .iter()
        .filter(|r| r.offset < published[usize::try_from(r.partition).unwrap()])
        .filter(|r| r.header("lsn").parse::<Lsn>().unwrap() >= resumed)
        .collect()
}

/// A SIGKILL republishes at most what the killed process had in flight:
/// what the producer held (its queue bound); what the broker acknowledged
/// but whose confirmation had not reached the server yet (status updates
/// follow the watermark within 200 ms, two round trips of this 100 ms broker,
/// each acknowledging at most a queue's worth: two queue bounds more); and
/// the transaction open at the kill. Counted over the distinct events the process itself published (from
/// its first record to the kill) at or after where the next session resumed.
/// A walrelay that confirmed too little (or nothing) replays far more.
fn assert_kills_replay_at_most_the_in_flight_window(
    interruptions: &[Interruption],
    sessions: &[Lsn],
    records: &[Record],
) {
    for (n, killed) in interruptions.iter().enumerate() {
        let (Fault::Kill, Some(published)) = (killed.fault, &killed.published) else {
            continue;
        };
        let replayed: BTreeSet<(&str, i64)> = replayed(killed, published, sessions, records)
            .into_iter()
            .filter(|r| r.offset >= killed.began[usize::try_from(r.partition).unwrap()])
            .map(|r| (r.key.as_str(), r.seq_nr()))
            .collect();
        let replayed = replayed.len();
        eprintln!("SIGKILL {n}: {replayed} events published before the kill were replayed");
        assert!(
            replayed <= 3 * QUEUE_BOUND + BIG_EVENTS,
            "the SIGKILL of interruption {n} replayed {replayed} events the killed process \
             published, more than its in-flight window: three times the producer's queue bound \
             ({QUEUE_BOUND}) plus the largest transaction ({BIG_EVENTS})"
        );
    }
}

/// A clean stop republishes at most the transaction it stopped inside: of
/// what was on the topic when the process had exited, only events of one
/// transaction may lie at or after where the next session resumed.
fn assert_clean_stops_replay_at_most_one_transaction(
    interruptions: &[Interruption],
    sessions: &[Lsn],
    records: &[Record],
) {
    for (n, stopped) in interruptions.iter().enumerate() {
        let (Fault::Term, Some(published)) = (stopped.fault, &stopped.published) else {
            continue;
        };
        let resumed = sessions[stopped.sessions_before];
        let replayed = replayed(stopped, published, sessions, records);
        let transactions: BTreeSet<&str> = replayed.iter().map(|r| r.header("lsn")).collect();
        eprintln!(
            "SIGTERM {n}: {} events of {} transactions published before the exit were replayed",
            replayed.len(),
            transactions.len()
        );
        assert!(
            transactions.len() <= 1,
            "the SIGTERM of interruption {n} left {} published events of {} transactions \
             unconfirmed (resumed at {resumed}): {transactions:?}",
            replayed.len(),
            transactions.len(),
        );
    }
}

/// For the log: each interruption's replay window (commit LSNs from where the
/// next session resumed to the WAL end right after it) and how many
/// duplicated events lie in it, whichever interruption replayed them.
fn print_windows(interruptions: &[Interruption], sessions: &[Lsn], report: &Report) {
    for i in interruptions {
        let Some(resumed) = sessions.get(i.sessions_before) else {
            continue;
        };
        let duplicated = report
            .duplicates
            .values()
            .filter_map(|d| d.lsn)
            .filter(|lsn| resumed <= lsn && *lsn < i.wal_end)
            .count();
        eprintln!(
            "{:?}: resumed at {resumed}, WAL end {}: {duplicated} duplicated events in between",
            i.fault, i.wal_end
        );
    }
}
