//! Several hosts, and failover: a primary and a physical standby of
//! PostgreSQL 17 with slot synchronization, walrelay given both hosts.
//!
//! The oracle of every failover test is the promoted server's own table:
//! Kafka must hold exactly its events (first deliveries in order per
//! aggregate, duplicates allowed), nothing it lacks and nothing less.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use walrelay::pg::lsn::Lsn;

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{
    PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER, SUPERUSER_PASSWORD,
};
use crate::support::walrelay::{Walrelay, metric, wait_for_metric};
use crate::support::workload::{EventId, check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

/// The standby's physical slot on the primary.
const STANDBY_SLOT: &str = "standby1";

/// A PostgreSQL 17 primary and its standby (slot synchronization on), with
/// the standby's slot in `synchronized_standby_slots` when `hold_back`;
/// `standby_conf` goes last into the standby's configuration.
async fn pair(hold_back: bool, standby_conf: &[&str]) -> (PgServer, PgServer) {
    let primary = PgServer::start(PgOptions {
        version: Some(17),
        ..PgOptions::default()
    })
    .await;
    let standby = PgServer::start_standby(&primary, STANDBY_SLOT, standby_conf).await;
    if hold_back {
        primary
            .set_and_reload("synchronized_standby_slots", STANDBY_SLOT)
            .await;
    }
    (primary, standby)
}

/// walrelay's URL with every host, as libpq takes it.
fn hosts_url(user: &str, password: &str, servers: &[&PgServer]) -> String {
    let tls = servers[0].verify_full_params();
    let hosts: Vec<String> = servers
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port()))
        .collect();
    format!(
        "postgres://{user}:{password}@{}/walrelay_test?{tls}&target_session_attrs=read-write",
        hosts.join(",")
    )
}

/// Every event the server's table holds.
async fn table(pg: &PgServer) -> Vec<EventId> {
    pg.psql("SELECT aggregate_id, seq_nr FROM events ORDER BY aggregate_id, seq_nr")
        .await
        .lines()
        .map(|line| {
            let (key, seq) = line.split_once('|').expect("two columns");
            (key.to_owned(), seq.parse().expect("a seq_nr"))
        })
        .collect()
}

/// Kafka holds exactly the events of `pg`'s table, in order per aggregate.
async fn assert_topic_is_the_table(pg: &PgServer, kafka: &Kafka, context: &str) -> usize {
    let expected = table(pg).await;
    let records = kafka.read("events", expected.len(), WAIT);
    check(&expected, &records).assert_clean(true, context);
    expected.len()
}

async fn run_check(url: &str, brokers: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["check", "--postgres-url", url, "--kafka-brokers", brokers];
    args.extend_from_slice(extra);
    let mut w = Walrelay::spawn(&args, &[]);
    let status = w.wait(WAIT).await;
    let output = format!("{}\n{}", w.stdout_lines().join("\n"), w.stderr_text());
    for secret in [SCRAM_PASSWORD, SUPERUSER_PASSWORD] {
        assert!(!output.contains(secret), "password leaked:\n{output}");
    }
    (status.code(), output)
}

/// Freezes the standby's WAL receiver (SIGSTOP): from here on the primary
/// commits alone. Returns its PID for [`crash_and_promote`].
async fn freeze_replication(standby: &PgServer) -> nix::unistd::Pid {
    let receiver = standby.wal_receiver_pid().await;
    PgServer::signal_process(receiver, Signal::SIGSTOP);
    receiver
}

/// Crashes the primary and promotes the standby whose WAL receiver is
/// frozen, such that the receiver never reads what the primary sent it
/// while frozen: the startup process asks it to stop (SIGTERM) before it
/// runs again, and it stops before reading.
async fn crash_and_promote(primary: &PgServer, standby: &PgServer, receiver: nix::unistd::Pid) {
    primary.crash().await;
    standby.request_promotion().await;
    standby
        .wait_for("the frozen WAL receiver to be asked to stop", || async {
            PgServer::signal_pending(receiver, Signal::SIGTERM)
        })
        .await;
    PgServer::signal_process(receiver, Signal::SIGCONT);
    standby.wait_until_promoted().await;
}

/// Waits until `pg`'s walsender for walrelay waits for a standby of
/// `synchronized_standby_slots` before it decodes further.
async fn held_back(pg: &PgServer) {
    pg.wait_for("walrelay's walsender to wait for the standby", || async {
        pg.psql(
            "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_activity a \
             ON a.pid = s.active_pid \
             WHERE s.slot_name = 'walrelay' AND a.wait_event = 'WaitForStandbyConfirmation'",
        )
        .await
            == "1"
    })
    .await;
}

/// The standby lag metric of the test standby's slot.
fn lag_metric() -> String {
    format!("walrelay_standby_sync_lag_bytes{{slot=\"{STANDBY_SLOT}\"}}")
}

/// One PostgreSQL of major `version`, a Kafka, and walrelay's URL.
async fn single(version: u32) -> (PgServer, Kafka, String) {
    let pg = PgServer::start(PgOptions {
        version: Some(version),
        ..PgOptions::default()
    })
    .await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), &pg.verify_full_params());
    (pg, Kafka::start(1, 2), url)
}

/// `run --failover-slot require` exits 1 saying `why`.
async fn refused_to_start(url: &str, kafka: &Kafka, why: &str) {
    let mut relay = Walrelay::start(url, &kafka.bootstrap(), &["--failover-slot", "require"]);
    let status = relay.wait(WAIT).await;
    let stderr = relay.stderr_text();
    assert!(
        status.code() == Some(1) && stderr.contains(why),
        "{status}:\n{stderr}"
    );
}

/// Ends a walrelay that stopped on an error (or stays up halted).
async fn stop(relay: &mut Walrelay) {
    if relay.exited().is_none() {
        let _ = relay.stop_with(Signal::SIGKILL).await;
    }
}

/// Waits until walrelay's stderr says `needle`, whether it then exits or
/// stays up (halted).
async fn stderr_eventually(relay: &Walrelay, needle: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !relay.stderr_text().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} within {WAIT:?}:\n{}",
            relay.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_first_primary_among_the_hosts_is_used_and_each_skipped_host_is_named() {
    let primary = PgServer::start(PgOptions {
        ..PgOptions::default()
    })
    .await;
    let standby = PgServer::start_standby(&primary, STANDBY_SLOT, &[]).await;
    let kafka = Kafka::start(1, 2);
    // Nothing listens on the first host; the second is a standby.
    let dead = crate::support::walrelay::free_local_addr().port();
    // The standby is a copy of the primary: one CA signed both certificates.
    let tls = primary.verify_full_params();
    let url = format!(
        "postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@127.0.0.1:{dead},127.0.0.1:{},127.0.0.1:{}/walrelay_test?{tls}",
        standby.port(),
        primary.port()
    );
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    // Both connections (replication, and the monitor's metadata one) went
    // to the primary; the standby has none of walrelay's.
    primary
        .wait_for("walrelay's two connections", || async {
            primary
                .psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walrelay'")
                .await
                == "2"
        })
        .await;
    assert_eq!(
        standby
            .psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walrelay'")
            .await,
        "0"
    );
    let stderr = relay.stderr_text();
    assert!(
        stderr.contains(&format!("host=127.0.0.1:{dead}"))
            && stderr.contains("in recovery (a standby)"),
        "{stderr}"
    );
    let mut client = primary.client().await;
    let committed = write_mixed(&mut client, "m", 4, 10, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));

    // Without the primary, every host is named with why it was skipped.
    let only_standby = format!(
        "postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@127.0.0.1:{dead},127.0.0.1:{}/walrelay_test?{tls}",
        standby.port()
    );
    let (code, output) = run_check(&only_standby, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("no primary among the 2 PostgreSQL hosts (target_session_attrs=any)")
            && output.contains(&format!("127.0.0.1:{dead}: "))
            && output.contains(&format!(
                "127.0.0.1:{}: in recovery (a standby)",
                standby.port()
            )),
        "{output}"
    );
    // PGHOST and PGPORT lists work the same way.
    let mut w = Walrelay::spawn(
        &[
            "check",
            "--postgres-url",
            &format!("postgresql://?dbname=walrelay_test&{tls}"),
            "--kafka-brokers",
            &kafka.bootstrap(),
        ],
        &[
            ("PGHOST", "127.0.0.1,127.0.0.1"),
            ("PGPORT", &format!("{},{}", standby.port(), primary.port())),
            ("PGUSER", SCRAM_USER),
            ("PGPASSWORD", SCRAM_PASSWORD),
        ],
    );
    let status = w.wait(WAIT).await;
    let output = w.stdout_lines().join("\n");
    assert_eq!(status.code(), Some(0), "{output}\n{}", w.stderr_text());
    assert!(
        output.contains(&format!(
            "connected to postgres://{SCRAM_USER}:********@127.0.0.1:{}/",
            primary.port()
        )),
        "{output}"
    );
}

#[tokio::test]
async fn a_promoted_standby_takes_over_with_the_synchronized_slot_and_nothing_is_lost() {
    let (primary, standby) = pair(true, &[]).await;
    let kafka = Kafka::start(1, 4);
    let url = hosts_url(SCRAM_USER, SCRAM_PASSWORD, &[&primary, &standby]);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    assert!(
        relay.stderr_text().contains("failover_slot=true"),
        "{}",
        relay.stderr_text()
    );
    let mut seqs = HashMap::new();
    let mut client = primary.client().await;
    write_mixed(&mut client, "a", 5, 20, 0, &mut seqs).await;
    let confirmed = wait_confirmed(&primary, "walrelay", current_lsn(&primary).await).await;
    standby.wait_for_synced_slot("walrelay", confirmed).await;

    // The whole chain is there: check says so, the standby's side included
    // (its one problem: the running walrelay holds the slot).
    let standby_url = standby.superuser_url();
    let (code, output) =
        run_check(&url, &kafka.bootstrap(), &["--standby-url", &standby_url]).await;
    assert_eq!(code, Some(2), "{output}");
    let problems: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("PROBLEM"))
        .collect();
    assert!(
        problems.len() == 1 && problems[0].contains("\"walrelay\" is active for PID"),
        "{output}"
    );
    for needle in [
        "slot \"walrelay\" is a failover slot",
        "standby slot \"standby1\" of synchronized_standby_slots is active",
        "sync_replication_slots = on",
        "slot \"walrelay\" is synchronized and sync-ready",
    ] {
        assert!(output.contains(needle), "no {needle:?} in:\n{output}");
    }

    primary.stop().await;
    standby.promote().await;
    relay.wait_for_stderr("followed a failover", WAIT).await;
    let mut client = standby.client().await;
    write_mixed(&mut client, "b", 5, 20, 0, &mut seqs).await;
    wait_confirmed(&standby, "walrelay", current_lsn(&standby).await).await;
    let events = assert_topic_is_the_table(&standby, &kafka, &relay.stderr_text()).await;
    assert!(events > 40, "{events}");
    assert_eq!(metric(metrics, "walrelay_failovers_total"), 1);
    let line = relay
        .stderr_text()
        .lines()
        .find(|l| l.contains("followed a failover"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("from_timeline=1")
            && line.contains("to_timeline=2")
            && line.contains("resume="),
        "{line}"
    );
    // It recognised the slot as the copy synchronized from the old primary.
    stderr_eventually(
        &relay,
        "the slot on the promoted server is the copy synchronized from the former primary",
    )
    .await;

    // The old primary comes back as it was (not rebuilt as a standby): a
    // primary on timeline 1, first in the host list, that takes writes the
    // promoted server never sees. walrelay never streams from it.
    primary.restart().await;
    primary
        .psql("ALTER SYSTEM SET synchronized_standby_slots = ''")
        .await;
    primary.psql("SELECT pg_reload_conf()").await;
    write_mixed(
        &mut primary.client().await,
        "split",
        3,
        5,
        0,
        &mut HashMap::new(),
    )
    .await;
    assert!(standby.terminate_walsender("walrelay").await);
    let mut client = standby.client().await;
    write_mixed(&mut client, "c", 3, 5, 0, &mut seqs).await;
    wait_confirmed(&standby, "walrelay", current_lsn(&standby).await).await;
    // Exactly the promoted server's table: none of the split-brain events.
    assert_topic_is_the_table(&standby, &kafka, &relay.stderr_text()).await;
    assert!(
        relay
            .stderr_text()
            .contains("older than timeline 2 walrelay already streamed from"),
        "{}",
        relay.stderr_text()
    );
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn events_only_the_crashed_primary_had_are_never_published() {
    let (primary, standby) = pair(true, &[]).await;
    let kafka = Kafka::start(1, 4);
    let url = hosts_url(SCRAM_USER, SCRAM_PASSWORD, &[&primary, &standby]);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let mut seqs = HashMap::new();
    let mut client = primary.client().await;
    write_mixed(&mut client, "a", 5, 20, 0, &mut seqs).await;
    let confirmed = wait_confirmed(&primary, "walrelay", current_lsn(&primary).await).await;
    standby.wait_for_synced_slot("walrelay", confirmed).await;

    // The standby stops receiving; the primary commits alone.
    let receiver = freeze_replication(&standby).await;
    let frozen = write_mixed(&mut client, "frozen", 5, 10, 0, &mut seqs).await;
    // The primary holds walrelay back: its walsender waits for the standby.
    held_back(&primary).await;
    // The metric shows the standby holding the stream back, by at least the
    // frozen transactions' WAL.
    let frozen_wal = current_lsn(&primary).await.0 - frozen[0].txn.lsn_from.0;
    wait_for_metric(metrics, &lag_metric(), |lag| lag >= frozen_wal, WAIT).await;
    let received = Lsn(metric(metrics, "walrelay_received_lsn"));
    assert!(
        received < frozen[0].txn.lsn_from,
        "walrelay received {received}, past the first frozen transaction at {}",
        frozen[0].txn.lsn_from
    );

    crash_and_promote(&primary, &standby, receiver).await;
    assert_eq!(
        standby
            .psql("SELECT count(*) FROM events WHERE aggregate_id LIKE 'frozen-%'")
            .await,
        "0",
        "the premise: the promoted standby never received the frozen transactions"
    );
    relay.wait_for_stderr("followed a failover", WAIT).await;
    let mut client = standby.client().await;
    write_mixed(&mut client, "b", 5, 20, 0, &mut seqs).await;
    wait_confirmed(&standby, "walrelay", current_lsn(&standby).await).await;
    // Nothing of the frozen transactions (the check finds them unexpected),
    // everything the promoted server has.
    assert_topic_is_the_table(&standby, &kafka, &relay.stderr_text()).await;
    assert_eq!(metric(metrics, "walrelay_failovers_total"), 1);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn without_synchronized_standby_slots_check_says_so_and_walrelay_stops_at_the_divergence() {
    let (primary, standby) = pair(false, &[]).await;
    let kafka = Kafka::start(1, 4);
    let url = hosts_url(SCRAM_USER, SCRAM_PASSWORD, &[&primary, &standby]);
    // Under --failover-slot require, run refuses to start.
    refused_to_start(
        &url,
        &kafka,
        "--failover-slot require, but the failover chain is incomplete: \
         synchronized_standby_slots is empty",
    )
    .await;
    let (relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    // check names the missing setting on the primary, and with the
    // standby's URL, the standby that it leaves out.
    let standby_url = standby.superuser_url();
    let (code, output) =
        run_check(&url, &kafka.bootstrap(), &["--standby-url", &standby_url]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("PROBLEM  failover: synchronized_standby_slots is empty")
            && output.contains("fix: ALTER SYSTEM SET synchronized_standby_slots")
            && output.contains(&format!(
                "its primary_slot_name \"{STANDBY_SLOT}\" is not in the primary's synchronized_standby_slots"
            ))
            && output.contains(&format!("on the primary: add '{STANDBY_SLOT}' to synchronized_standby_slots")),
        "{output}"
    );
    assert!(
        relay
            .stderr_text()
            .contains("synchronized_standby_slots is empty"),
        "run warns at start:\n{}",
        relay.stderr_text()
    );

    let mut seqs = HashMap::new();
    let mut client = primary.client().await;
    write_mixed(&mut client, "a", 5, 10, 0, &mut seqs).await;
    let confirmed = wait_confirmed(&primary, "walrelay", current_lsn(&primary).await).await;
    standby.wait_for_synced_slot("walrelay", confirmed).await;
    let receiver = freeze_replication(&standby).await;
    let frozen = write_mixed(&mut client, "frozen", 5, 10, 0, &mut seqs).await;
    // Nothing holds walrelay back: it publishes and confirms them.
    let published = wait_confirmed(&primary, "walrelay", current_lsn(&primary).await).await;
    crash_and_promote(&primary, &standby, receiver).await;

    // The phantom events: in Kafka, not on the promoted server.
    let records = kafka.read("events", table(&standby).await.len() + frozen.len(), WAIT);
    assert!(
        frozen.iter().all(|e| records
            .iter()
            .any(|r| r.key == e.id.0 && r.seq_nr() == e.id.1)),
        "the frozen events were published"
    );
    // walrelay confirmed past the new timeline's branch point: it stops
    // rather than confirm that position to the new primary.
    stderr_eventually(&relay, "are in Kafka but not on the promoted server").await;
    let stderr = relay.stderr_text();
    assert!(
        !stderr.contains("followed a failover") && stderr.contains("timeline 1 ended at"),
        "{stderr}"
    );
    // The position confirmed on the old timeline never reached the new
    // primary, whose transactions after the branch point it would skip.
    let on_new_primary = slot_confirmed(&standby, "walrelay").await;
    assert!(
        on_new_primary < published,
        "the new primary's slot is at {on_new_primary}, walrelay confirmed {published} on the old timeline"
    );
}

#[tokio::test]
async fn a_slot_lost_in_a_failover_is_not_recreated_and_the_missing_setting_is_named() {
    // The standby does not synchronize slots: the one setup step missing.
    let (primary, standby) = pair(
        true,
        &["sync_replication_slots = off", "hot_standby_feedback = off"],
    )
    .await;
    let kafka = Kafka::start(1, 4);
    let url = hosts_url(SCRAM_USER, SCRAM_PASSWORD, &[&primary, &standby]);
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let mut seqs = HashMap::new();
    write_mixed(&mut primary.client().await, "a", 3, 10, 0, &mut seqs).await;
    wait_confirmed(&primary, "walrelay", current_lsn(&primary).await).await;

    // check, given the standby, names each missing piece with its fix.
    let standby_url = standby.superuser_url();
    let (code, output) =
        run_check(&url, &kafka.bootstrap(), &["--standby-url", &standby_url]).await;
    assert_eq!(code, Some(2), "{output}");
    let standby_at = format!("PROBLEM  standby: 127.0.0.1:{}:", standby.port());
    for needle in [
        format!("{standby_at} sync_replication_slots is off"),
        format!("{standby_at} hot_standby_feedback is off"),
        format!("{standby_at} slot \"walrelay\" is not on the standby"),
        "fix: on the standby: ALTER SYSTEM SET sync_replication_slots = on".to_owned(),
    ] {
        assert!(output.contains(&needle), "no {needle:?} in:\n{output}");
    }
    for needle in ["primary_slot_name", "primary_conninfo", "wal_level"] {
        assert!(
            !output
                .lines()
                .any(|l| l.starts_with("PROBLEM") && l.contains(needle)),
            "{needle} is set right, yet:\n{output}"
        );
    }
    primary.stop().await;
    standby.promote().await;

    let needle = "does not exist on this server, which was promoted";
    stderr_eventually(&relay, needle).await;
    let stderr = relay.stderr_text();
    assert!(
        stderr.contains("while walrelay followed its promotion from timeline 1")
            && stderr.contains("sync_replication_slots was not on on this server")
            && stderr.contains("hot_standby_feedback was not on on this server"),
        "{stderr}"
    );
    stop(&mut relay).await;
    assert_eq!(
        standby
            .psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await,
        "0"
    );

    // A fresh process cannot remember the slot; the timeline tells it.
    let mut fresh = Walrelay::start(&url, &kafka.bootstrap(), &[]);
    stderr_eventually(&fresh, needle).await;
    assert!(
        fresh.stderr_text().contains("when walrelay started"),
        "{}",
        fresh.stderr_text()
    );
    stop(&mut fresh).await;
    assert_eq!(
        standby
            .psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await,
        "0"
    );

    // Told to, it makes a new slot and publishes the table first.
    let (mut relay, _) =
        Walrelay::run(&url, &kafka.bootstrap(), &["--new-slot-on-timeline", "2"]).await;
    assert_topic_is_the_table(&standby, &kafka, &relay.stderr_text()).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn an_existing_slot_without_failover_is_reported_then_made_a_failover_slot() {
    let (pg, kafka, url) = single(17).await;
    let failover = async || {
        pg.psql("SELECT failover FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await
    };
    // --failover-slot off: an ordinary slot, left so.
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &["--failover-slot", "off"]).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    assert_eq!(failover().await, "f");

    // check reports it with its fix (no standby: nothing else to report).
    let (code, output) = run_check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(2), "{output}");
    let problems: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("PROBLEM"))
        .collect();
    assert!(
        problems.len() == 1
            && problems[0].contains("slot \"walrelay\" is not a failover slot")
            && output.contains("ALTER_REPLICATION_SLOT walrelay (FAILOVER true)"),
        "{output}"
    );

    // run (auto) makes it one, and streams on from it.
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    assert!(
        relay
            .stderr_text()
            .contains("made the slot a failover slot"),
        "{}",
        relay.stderr_text()
    );
    assert_eq!(failover().await, "t");
    let committed = write_mixed(&mut pg.client().await, "m", 3, 10, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    let (code, output) = run_check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");
}

#[tokio::test]
async fn failover_slots_required_on_a_server_without_them_is_refused() {
    let (pg, kafka, url) = single(16).await;
    refused_to_start(
        &url,
        &kafka,
        "--failover-slot require, but PostgreSQL 16 has no failover slots",
    )
    .await;
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").await,
        "0",
        "nothing was created"
    );
    let (code, output) = run_check(&url, &kafka.bootstrap(), &["--failover-slot", "require"]).await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("PROBLEM  failover: PostgreSQL 16 cannot keep the slot on standbys"),
        "{output}"
    );
    // Under auto, the same server is fine.
    let (code, output) = run_check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");
}

#[tokio::test]
async fn a_promoted_standby_that_kept_the_primarys_standby_slots_setting_is_named_until_reset() {
    // The standby's configuration is a copy of the primary's, setting
    // included: on the promoted server it names the slot the standby
    // streamed from on the old primary, which no standby streams from there
    // (the harness's cold copy carries the slot itself; pg_basebackup's
    // copy would not, and the slot would be missing: held back all the same).
    let inherited = format!("synchronized_standby_slots = '{STANDBY_SLOT}'");
    let (primary, standby) = pair(true, &[&inherited]).await;
    let kafka = Kafka::start(1, 4);
    let url = hosts_url(SCRAM_USER, SCRAM_PASSWORD, &[&primary, &standby]);
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let mut seqs = HashMap::new();
    write_mixed(&mut primary.client().await, "a", 3, 10, 0, &mut seqs).await;
    let confirmed = wait_confirmed(&primary, "walrelay", current_lsn(&primary).await).await;
    standby.wait_for_synced_slot("walrelay", confirmed).await;

    // check sees it coming, on the standby.
    let standby_url = standby.superuser_url();
    let (_, output) = run_check(&url, &kafka.bootstrap(), &["--standby-url", &standby_url]).await;
    assert!(
        output.contains(&format!(
            "its own synchronized_standby_slots lists [\"{STANDBY_SLOT}\"] (a copy of the primary's setting?)"
        )) && output.contains("ALTER SYSTEM SET synchronized_standby_slots = ''"),
        "{output}"
    );

    primary.stop().await;
    standby.promote().await;
    relay.wait_for_stderr("followed a failover", WAIT).await;
    // The new primary holds walrelay back; walrelay says why.
    stderr_eventually(
        &relay,
        &format!("failover chain on the promoted server: standby slot \"{STANDBY_SLOT}\" of synchronized_standby_slots is not active"),
    )
    .await;
    let mut client = standby.client().await;
    write_mixed(&mut client, "b", 3, 10, 0, &mut seqs).await;
    held_back(&standby).await;
    // A listed slot no standby streams from shows as lag.
    wait_for_metric(metrics, &lag_metric(), |lag| lag > 0, WAIT).await;

    // The fix the message gives: everything flows again.
    standby
        .psql("ALTER SYSTEM SET synchronized_standby_slots = ''")
        .await;
    standby.psql("SELECT pg_reload_conf()").await;
    wait_confirmed(&standby, "walrelay", current_lsn(&standby).await).await;
    assert_topic_is_the_table(&standby, &kafka, &relay.stderr_text()).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
