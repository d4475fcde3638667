//! SIGKILL at random points while a workload writes: after a final restart
//! everything committed is in Kafka, first deliveries keep per-aggregate
//! order, and the only duplicates are events that were not yet confirmed
//! when a process died.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use walrelay::pg::lsn::Lsn;

use super::delivery::{current_lsn, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, free_local_addr};
use crate::support::workload::{check, write_mixed};

const KILLS: usize = 20;

#[tokio::test]
async fn sigkill_at_random_points_loses_nothing() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let run = |metrics: String| {
        Walrelay::spawn(
            &[
                "run",
                "--postgres-url",
                &url,
                "--kafka-brokers",
                &kafka.bootstrap(),
                "--metrics-addr",
                &metrics,
            ],
            &[],
        )
    };

    // The workload: small mixed transactions until told to stop.
    let stop = CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        let mut client = pg.client().await;
        tokio::spawn(async move {
            let mut seqs = HashMap::new();
            let mut committed = Vec::new();
            while !stop.is_cancelled() {
                committed.extend(write_mixed(&mut client, "agg", 50, 10, 6, &mut seqs).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            committed
        })
    };

    // Each kill: the slot's confirmed position after it, and the WAL end at
    // that moment. A duplicate is legitimate only if some kill found it
    // committed (below the WAL end) but not yet confirmed.
    let mut kills: Vec<(Lsn, Lsn)> = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..KILLS {
        let mut relay = run(free_local_addr().to_string());
        tokio::time::sleep(Duration::from_millis(rng.u64(200..1500))).await;
        relay.stop_with(Signal::SIGKILL).await;
        let wal_end = current_lsn(&pg).await;
        let confirmed = pg
            .psql("SELECT coalesce(max(confirmed_flush_lsn), '0/0') FROM pg_replication_slots WHERE slot_name = 'walrelay'")
            .await
            .parse()
            .unwrap();
        kills.push((confirmed, wal_end));
    }
    stop.cancel();
    let committed = writer.await.unwrap();

    let mut last = run(free_local_addr().to_string());
    last.wait_for_stderr("streaming", Duration::from_secs(60))
        .await;
    let records = kafka.read("events", committed.len(), Duration::from_secs(120));
    let report = check(&committed, &records);
    report.assert_clean(true, &last.stderr_text());
    for ((aggregate, seq), count) in &report.duplicates {
        let record = records
            .iter()
            .find(|r| &r.key == aggregate && r.seq_nr() == *seq)
            .unwrap();
        let lsn: Lsn = record.header("lsn").parse().unwrap();
        assert!(
            kills
                .iter()
                .any(|(confirmed, wal_end)| *confirmed <= lsn && lsn < *wal_end),
            "{aggregate} seq_nr {seq} (lsn {lsn}) was published {count} times although it was confirmed before every kill: {kills:?}"
        );
    }
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    eprintln!(
        "{} events committed, {} records, {} duplicated, over {KILLS} kills",
        committed.len(),
        records.len(),
        report.duplicates.len()
    );
    assert_eq!(last.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
