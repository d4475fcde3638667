//! The slot lost under walrelay: dropped while it streams, or invalidated
//! for holding too much WAL. walrelay halts, naming the reason, stays up and
//! not ready, and never makes a new slot silently.
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::kafka::Kafka;
use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get, metric, wait_for_metric, wait_halted};

const WAIT: Duration = Duration::from_secs(60);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// Asserts that the instance at `addr` halted for `reason` and only that,
/// says so on `/readyz`, and is still live.
async fn assert_halted(relay: &mut Walrelay, addr: std::net::SocketAddr, reason: &str) {
    wait_halted(addr, reason, WAIT).await;
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert_eq!(metric(addr, "walrelay_halted"), 1);
    assert_eq!(http_get(addr, "/healthz").0, 200);
    let (status, body) = http_get(addr, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains(&format!("halted: {reason}")), "{body}");
}

#[tokio::test]
async fn a_slot_dropped_while_streaming_halts_with_slot_vanished() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    // An operator drops it: the walsender first, then the slot, before
    // walrelay reconnects (retried, since walrelay may win the race).
    let deadline = tokio::time::Instant::now() + WAIT;
    while pg
        .try_psql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
              WHERE slot_name = 'walrelay' AND active_pid IS NOT NULL;
             SELECT pg_sleep(0.05);
             SELECT pg_drop_replication_slot('walrelay');",
        )
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cannot drop the slot"
        );
    }
    assert_halted(&mut relay, metrics, "slot_vanished").await;
    relay
        .wait_for_stderr("disappeared while walrelay streamed from it", WAIT)
        .await;
    // No new slot made behind the operator's back.
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").await,
        "0"
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(3));
}

#[tokio::test]
async fn an_invalidated_slot_halts_with_slot_invalidated_and_its_wal_status_stays_exported() {
    // PostgreSQL gives up a slot that holds more than 1 MB of WAL.
    let pg = PgServer::start(PgOptions {
        extra_conf: vec!["max_slot_wal_keep_size = '1MB'".into()],
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 1);
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    relay.kill().await;
    // While nothing reads the slot, the WAL moves on by a few segments.
    for i in 0..4 {
        pg.psql(&format!(
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', {}, 'Ok', '{{}}');
             SELECT pg_switch_wal();",
            i + 1
        ))
        .await;
    }
    pg.psql("CHECKPOINT").await;
    assert_eq!(
        pg.psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await,
        "lost"
    );
    let mut relay = Walrelay::start(&url(&pg), &kafka.bootstrap(), &[]);
    let metrics = relay.metrics_addr().await;
    assert_halted(&mut relay, metrics, "slot_invalidated").await;
    relay
        .wait_for_stderr("is invalidated (wal_status = lost", WAIT)
        .await;
    // The slot's state stays in sight while halted, for the alerts.
    wait_for_metric(
        metrics,
        r#"walrelay_slot_wal_status{slot="walrelay",status="lost"}"#,
        |v| v == 1,
        WAIT,
    )
    .await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(3));
}
