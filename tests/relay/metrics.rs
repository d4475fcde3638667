//! The metrics a dashboard needs, read from a running walrelay: what it read,
//! published and holds, the producer queue's bound, the initial snapshot's
//! progress, the slot's lag with its label, the build and the process.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::delivery::{current_lsn, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::{Walrelay, http_get, metric, metric_in, wait_for_metric};
use crate::support::workload::write_mixed;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_dashboard_metrics_follow_what_walrelay_does() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    // Rows before the first start: the initial snapshot publishes them.
    pg.psql(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
         SELECT 'old-' || a, 1, 'Old', '{}' FROM generate_series(1, 25) AS a;",
    )
    .await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let (mut relay, metrics) = Walrelay::run(
        &url,
        &kafka.bootstrap(),
        &["--kafka-property", "queue.buffering.max.messages=5000"],
    )
    .await;
    assert_eq!(metric(metrics, "walrelay_snapshot_rows_total"), 25);
    assert_eq!(metric(metrics, "walrelay_snapshot_running"), 0);
    // The bound as configured, the user's override included.
    assert_eq!(metric(metrics, "walrelay_inflight_events_max"), 5000);

    let committed = write_mixed(&mut pg.client().await, "new", 5, 10, 0, &mut HashMap::new()).await;
    let end = current_lsn(&pg).await;
    wait_confirmed(&pg, "walrelay", end).await;
    let streamed = u64::try_from(committed.len()).unwrap();
    // Streamed rows are received and published; the snapshot's are published.
    assert_eq!(metric(metrics, "walrelay_events_received_total"), streamed);
    wait_for_metric(
        metrics,
        "walrelay_events_published_total",
        |n| n == streamed + 25,
        WAIT,
    )
    .await;
    assert!(metric(metrics, "walrelay_published_bytes_total") > 0);
    // One writer of the lag: the slot's own position, read by the monitor,
    // labelled with the slot; it comes down once the slot is confirmed.
    // (Read every 5 s: absent until the first reading.)
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(metrics, "/metrics");
        let lag = metric_in(&body, r#"walrelay_source_lag_bytes{slot="walrelay"}"#);
        if lag.is_some_and(|lag| lag < 1024 * 1024) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag {lag:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(
            metrics,
            r#"walrelay_slot_retained_wal_bytes{slot="walrelay"}"#
        ) > 0
    );

    let (_, body) = http_get(metrics, "/metrics");
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8(o.stdout).unwrap().trim().to_owned(),
        );
    let build_info = format!(
        "walrelay_build_info{{librdkafka=\"{librdkafka}\",revision=\"{revision}\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(body.contains(&build_info), "no {build_info:?} in:\n{body}");
    assert!(metric(metrics, "process_resident_memory_bytes") > 0);
    assert!(metric(metrics, "process_open_fds") > 0);
    assert!(metric(metrics, "process_start_time_seconds") > 1_600_000_000);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
