//! What differs between PostgreSQL 14, 15, 16, 17 and 18, each tested on a
//! version that has it (`PgOptions::version`), whatever the run's version.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::pg_versions;
use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, metric, wait_for_metric};
use crate::support::workload::{check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

/// Transactions of another table committed while the broker is away.
const OTHER_TRANSACTIONS: u32 = 20_000;

/// Transactions written through a replication origin.
const REPLICATED: i64 = 5;

/// The URL of `pg`: verified TLS where the server serves it (so that `check`
/// finds no problem with the channel), none where the test turned TLS off.
fn url(pg: &PgServer) -> String {
    let params = match pg.ca_cert_path() {
        Some(_) => pg.verify_full_params(),
        None => "sslmode=disable".to_owned(),
    };
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), &params)
}

/// PostgreSQL 16's pgoutput can leave out transactions replayed from a
/// replication origin (`origin 'none'`). An events table fed through one
/// (a logical replication subscription, a migration tool that sets a
/// session origin) must still be published whole, so walrelay asks for
/// `origin 'any'`. Such a transaction's commit time in the stream is the
/// one its origin gave it (`pg_replication_origin_xact_setup`: the
/// upstream's commit time), and that is the `commit_ts` header.
#[tokio::test]
async fn events_written_through_a_replication_origin_are_published() {
    let pg = PgServer::start(PgOptions {
        version: pg_versions::at_least(16, "pgoutput's origin option"),
        tls: false,
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 3);
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;

    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let local = write_mixed(&mut client, "local", 4, 6, 0, &mut seqs).await;
    // Transactions as a subscription's apply worker commits them: in a
    // session of the origin "upstream", each with the upstream's commit
    // position and time.
    client
        .batch_execute(
            "SELECT pg_replication_origin_create('upstream');
             SELECT pg_replication_origin_session_setup('upstream');",
        )
        .await
        .expect("set up a replication origin");
    for seq_nr in 1..=REPLICATED {
        client
            .batch_execute(&format!(
                "BEGIN;
                 SELECT pg_replication_origin_xact_setup('0/{seq_nr}0', '2001-02-03 04:05:0{seq_nr}+00');
                 INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
                      VALUES ('replicated', {seq_nr}, 'Replicated', '{{}}');
                 COMMIT;"
            ))
            .await
            .expect("a replicated transaction");
    }

    let records = kafka.read(
        "events",
        local.len() + usize::try_from(REPLICATED).unwrap(),
        WAIT,
    );
    let (replicated, rest): (Vec<_>, Vec<_>) =
        records.into_iter().partition(|r| r.key == "replicated");
    check(&local, &rest).assert_clean(false, &relay.stderr_text());
    let published: Vec<(i64, &str)> = replicated
        .iter()
        .map(|r| (r.seq_nr(), r.header("commit_ts")))
        .collect();
    let expected: Vec<(i64, String)> = (1..=REPLICATED)
        .map(|s| (s, format!("2001-02-03T04:05:0{s}.000000Z")))
        .collect();
    assert_eq!(
        published,
        expected
            .iter()
            .map(|(s, ts)| (*s, ts.as_str()))
            .collect::<Vec<_>>(),
        "{}",
        relay.stderr_text()
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// PostgreSQL 14's pgoutput sends a Begin and a Commit for every transaction
/// of the database, with or without a change of the publication (15 and
/// later send nothing for those). While the broker is away and an event
/// waits for its acknowledgement, such empty transactions must not pile up
/// behind it: they take no entry of the watermark, only move the position
/// that is confirmed once the event is acknowledged, so memory is bounded
/// by the events in flight, not by the database's traffic.
#[tokio::test]
async fn on_postgresql_14_other_tables_transactions_take_no_memory_while_the_broker_is_down() {
    let pg = PgServer::start(PgOptions {
        version: Some(14),
        tls: false,
        ..PgOptions::default()
    })
    .await;
    assert_eq!(pg.major(), 14);
    pg.psql("CREATE TABLE other (n int)").await;
    let kafka = Kafka::start(1, 3);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "before", 3, 5, 0, &mut seqs).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;

    kafka.set_all_brokers(false);
    let held = write_mixed(&mut client, "held", 2, 1, 0, &mut seqs).await;
    // Its commit record starts after this position.
    let held_from = held[0].txn.lsn_from;
    committed.extend(held);
    pg.psql(&format!(
        "DO $$ BEGIN FOR i IN 1..{OTHER_TRANSACTIONS} LOOP \
             INSERT INTO other VALUES (i); COMMIT; \
         END LOOP; END $$"
    ))
    .await;
    let end = current_lsn(&pg).await;
    // walrelay has read every one of them (each Commit raises it)...
    wait_for_metric(metrics, "walrelay_received_lsn", |lsn| lsn >= end.0, WAIT).await;
    // ... and holds one transaction, the one with events, not 20,001.
    assert_eq!(metric(metrics, "walrelay_inflight_transactions"), 1);
    assert!(metric(metrics, "walrelay_inflight_events") >= 1);
    let confirmed = slot_confirmed(&pg, "walrelay").await;
    assert!(
        confirmed <= held_from,
        "slot confirmed to {confirmed}, past the start {held_from} of an unacknowledged transaction"
    );

    kafka.set_all_brokers(true);
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    // Confirmed past the empty transactions too: the slot holds no WAL for them.
    wait_confirmed(&pg, "walrelay", end).await;
    wait_for_metric(metrics, "walrelay_inflight_transactions", |n| n == 0, WAIT).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Writes WAL (rows of another table, a segment switch, a checkpoint) until
/// PostgreSQL has invalidated `slot` for holding more than
/// `max_slot_wal_keep_size`.
async fn invalidate_for_wal(pg: &PgServer, slot: &str) {
    pg.psql("CREATE TABLE IF NOT EXISTS ballast (n int)").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = pg
            .psql(&format!(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))
            .await;
        if status == "lost" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot {slot} still {status:?}"
        );
        pg.psql(
            "INSERT INTO ballast SELECT generate_series(1, 100000);
             SELECT pg_switch_wal();
             CHECKPOINT;",
        )
        .await;
    }
}

/// `walrelay check` with `extra` flags: its exit code and output.
async fn check_setup(pg: &PgServer, kafka: &Kafka, extra: &[&str]) -> (Option<i32>, String) {
    let url = url(pg);
    let brokers = kafka.bootstrap();
    let mut args = vec!["check", "--postgres-url", &url, "--kafka-brokers", &brokers];
    args.extend_from_slice(extra);
    let mut check = Walrelay::spawn(&args, &[]);
    let status = check.wait(WAIT).await;
    (
        status.code(),
        format!(
            "{}\n{}",
            check.stdout_lines().join("\n"),
            check.stderr_text()
        ),
    )
}

/// On every version: a slot PostgreSQL invalidates while walrelay streams
/// from it (it held more WAL than `max_slot_wal_keep_size` while the broker
/// was away) stops walrelay with the cause and the way out, never a new
/// slot; `check` says the same.
#[tokio::test]
async fn a_slot_invalidated_for_its_wal_stops_walrelay_with_the_cause_and_the_way_out() {
    let pg = PgServer::start(PgOptions {
        extra_conf: vec!["max_slot_wal_keep_size = '1MB'".to_owned()],
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 3);
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &["--exit-on-halt"]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    write_mixed(&mut client, "before", 2, 3, 0, &mut seqs).await;
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;

    // An event the broker cannot take holds the slot back.
    kafka.set_all_brokers(false);
    write_mixed(&mut client, "held", 2, 1, 0, &mut seqs).await;
    invalidate_for_wal(&pg, "walrelay").await;

    // PostgreSQL ends the walsender; the next START_REPLICATION is refused:
    // a halt (exit code 3 at once with --exit-on-halt).
    let status = relay.wait(WAIT).await;
    let stderr = relay.stderr_text();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("replication slot \"walrelay\" is invalidated (wal_status = lost")
            && stderr.contains("max_slot_wal_keep_size")
            && stderr.contains("pg_drop_replication_slot('walrelay')"),
        "{stderr}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await,
        "1",
        "the invalidated slot was replaced"
    );

    kafka.set_all_brokers(true);
    let (code, output) = check_setup(&pg, &kafka, &[]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains(
            "PROBLEM  slot: replication slot \"walrelay\" is invalidated (wal_status = lost"
        ),
        "{output}"
    );
}

/// PostgreSQL 17 records since when a slot is unused (`inactive_since`).
/// A walrelay that is up but cannot stream (here: every WAL sender is
/// taken) exports it, so an alert sees the slot idle before anything
/// invalidates it; once walrelay streams again it is 0.
#[tokio::test]
async fn a_walrelay_that_cannot_stream_shows_since_when_the_slot_is_unused() {
    let pg = PgServer::start(PgOptions {
        version: pg_versions::at_least(17, "pg_replication_slots.inactive_since"),
        tls: false,
        extra_conf: vec!["max_wal_senders = 2".to_owned()],
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 3);
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    let since: u64 = pg
        .psql(
            "SELECT floor(extract(epoch FROM inactive_since))::bigint \
               FROM pg_replication_slots WHERE slot_name = 'walrelay'",
        )
        .await
        .parse()
        .expect("inactive_since is set");

    let held = [pg.hold_wal_sender().await, pg.hold_wal_sender().await];
    let mut relay = Walrelay::start(&url(&pg), &kafka.bootstrap(), &[]);
    let metrics = relay.metrics_addr().await;
    relay
        .wait_for_stderr("number of requested standby connections exceeds", WAIT)
        .await;
    wait_for_metric(
        metrics,
        "walrelay_slot_inactive_since_seconds",
        |s| s == since,
        WAIT,
    )
    .await;

    drop(held);
    relay.wait_for_stderr("streaming", WAIT).await;
    wait_for_metric(
        metrics,
        "walrelay_slot_inactive_since_seconds",
        |s| s == 0,
        WAIT,
    )
    .await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// PostgreSQL 18 invalidates a slot that no process has streamed from for
/// `idle_replication_slot_timeout`, at the next checkpoint: while every
/// walrelay is down, say. walrelay exports the timeout, `check` holds it
/// against `--expected-max-downtime`, and a slot it invalidated stops
/// walrelay with the reason and the way out (never a new slot); `check`
/// says the same.
#[tokio::test]
async fn a_slot_left_unused_past_the_idle_timeout_is_reported_before_and_explained_after() {
    let pg = PgServer::start(PgOptions {
        version: pg_versions::at_least(18, "idle_replication_slot_timeout"),
        extra_conf: vec!["idle_replication_slot_timeout = '1h'".to_owned()],
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 3);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    wait_for_metric(
        metrics,
        "walrelay_slot_idle_timeout_seconds",
        |s| s == 3600,
        WAIT,
    )
    .await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let committed = write_mixed(&mut client, "before", 2, 3, 0, &mut seqs).await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));

    // Every walrelay is down now: check compares the timeout with how long
    // that may last.
    let (code, output) = check_setup(&pg, &kafka, &["--expected-max-downtime", "2h"]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains(
            "PROBLEM  slot idle timeout: idle_replication_slot_timeout = 1h is shorter than \
             --expected-max-downtime 2h"
        ) && output.contains("idle_replication_slot_timeout = '7200s'")
            && output.contains("the slot has been unused for"),
        "{output}"
    );
    let (code, output) = check_setup(&pg, &kafka, &["--expected-max-downtime", "30m"]).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains(
            "ok       slot idle timeout: idle_replication_slot_timeout = 1h covers \
             --expected-max-downtime 30m"
        ),
        "{output}"
    );

    // The outage outlasts a timeout of a second: a checkpoint invalidates it.
    pg.psql(
        "ALTER SYSTEM SET idle_replication_slot_timeout = '1s';
         SELECT pg_reload_conf();",
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        pg.psql("CHECKPOINT").await;
        let reason = pg
            .psql(
                "SELECT coalesce(invalidation_reason, '') FROM pg_replication_slots
                  WHERE slot_name = 'walrelay'",
            )
            .await;
        if reason == "idle_timeout" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot not invalidated: {reason:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A halt (exit code 3 at once with --exit-on-halt).
    let mut relay = Walrelay::start(&url(&pg), &kafka.bootstrap(), &["--exit-on-halt"]);
    let status = relay.wait(WAIT).await;
    let stderr = relay.stderr_text();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(
            "replication slot \"walrelay\" is invalidated (invalidation_reason = idle_timeout"
        ) && stderr.contains("raise idle_replication_slot_timeout")
            && stderr.contains("pg_drop_replication_slot('walrelay')"),
        "{stderr}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await,
        "1",
        "the invalidated slot was replaced"
    );
    let (code, output) = check_setup(&pg, &kafka, &["--expected-max-downtime", "1s"]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains(
            "PROBLEM  slot: replication slot \"walrelay\" is invalidated (invalidation_reason = idle_timeout"
        ),
        "{output}"
    );
}
