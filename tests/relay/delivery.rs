//! Everything committed arrives, keyed and ordered per aggregate; the slot
//! follows the acknowledgements; a clean restart republishes nothing.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use walrelay::pg::lsn::Lsn;

use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get, metric};
use crate::support::workload::{check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

/// The slot's confirmed position now.
pub async fn slot_confirmed(pg: &PgServer, slot: &str) -> Lsn {
    pg.psql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .await
    .parse()
    .expect("the slot exists")
}

/// Polls until the slot is confirmed at or past `target`.
pub async fn wait_confirmed(pg: &PgServer, slot: &str, target: Lsn) -> Lsn {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = pg
            .psql(&format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))
            .await;
        if let Ok(lsn) = text.parse::<Lsn>() {
            if lsn >= target {
                return lsn;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot {slot} at {text:?}, not {target}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn current_lsn(pg: &PgServer) -> Lsn {
    pg.psql("SELECT pg_current_wal_lsn()")
        .await
        .parse()
        .unwrap()
}

#[tokio::test]
async fn mixed_transactions_arrive_complete_ordered_and_confirmed_then_restart_adds_no_duplicate() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(3, 6);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=require");
    let (mut relay, metrics) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;

    // The initial snapshot (of the empty table) counts as a transaction of
    // its own: only what the writes add is compared below.
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let transactions_before = metric(metrics, "walrelay_transactions_total");
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let committed = write_mixed(&mut client, "agg", 40, 150, 7, &mut seqs).await;
    let end = current_lsn(&pg).await;
    let records = kafka.read("events", committed.len(), WAIT);
    // Every record against its row: key, value bytes, every header.
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert_eq!(records.len(), committed.len());

    // The slot follows the acknowledgements to the end of the writes.
    wait_confirmed(&pg, "walrelay", end).await;
    assert_eq!(
        metric(metrics, "walrelay_events_published_total"),
        committed.len() as u64
    );
    let transactions: HashSet<u64> = committed.iter().map(|w| w.txn.number).collect();
    assert_eq!(
        metric(metrics, "walrelay_transactions_total") - transactions_before,
        transactions.len() as u64
    );
    assert_eq!(metric(metrics, "walrelay_inflight_events"), 0);
    assert_eq!(metric(metrics, "walrelay_reconnects_total"), 0);
    assert_eq!(
        metric(metrics, "walrelay_confirmed_lsn"),
        slot_confirmed(&pg, "walrelay").await.0
    );
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(http_get(metrics, "/readyz").0, 200);

    assert_eq!(
        relay.stop_with(Signal::SIGTERM).await.code(),
        Some(0),
        "{}",
        relay.stderr_text()
    );

    // A restart after a clean shutdown republishes nothing: only the new events arrive.
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let more = write_mixed(&mut client, "agg", 40, 30, 0, &mut seqs).await;
    let mut all = committed.clone();
    all.extend(more);
    let records = kafka.read("events", all.len(), WAIT);
    check(&all, &records).assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGINT).await.code(), Some(0));
    let logs = relay.stderr_text();
    assert!(!logs.contains(SCRAM_PASSWORD), "password leaked:\n{logs}");
}
