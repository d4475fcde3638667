//! First start over a table that already holds events: those rows first,
//! then the stream, with no gap and nothing twice.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;
use crate::support::workload::{EventId, check, write_mixed};

const WAIT: Duration = Duration::from_secs(120);

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// Inserts `per` events for each of `aggregates` aggregates named `{prefix}-{n}`.
async fn existing(pg: &PgServer, prefix: &str, aggregates: usize, per: usize) -> Vec<EventId> {
    pg.psql(&format!(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
         SELECT '{prefix}-' || a, s, 'Old', jsonb_build_object('a', a, 's', s)
           FROM generate_series(0, {}) AS a, generate_series(1, {per}) AS s;",
        aggregates - 1
    ))
    .await;
    (0..aggregates)
        .flat_map(|a| (1..=per).map(move |s| (format!("{prefix}-{a}"), i64::try_from(s).unwrap())))
        .collect()
}

#[tokio::test]
async fn existing_rows_then_live_ones_arrive_exactly_once() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let mut committed = existing(&pg, "old", 500, 10).await;

    let mut relay = Walrelay::spawn(
        &[
            "run",
            "--postgres-url",
            &url(&pg),
            "--kafka-brokers",
            &kafka.bootstrap(),
            "--metrics-addr",
            &crate::support::walrelay::free_local_addr().to_string(),
        ],
        &[],
    );
    relay
        .wait_for_stderr("created the replication slot", WAIT)
        .await;
    // Live writes race with the snapshot being published.
    let mut client = pg.client().await;
    let mut seqs: HashMap<String, i64> = (0..500).map(|a| (format!("old-{a}"), 11)).collect();
    committed.extend(
        write_mixed(&mut client, "old", 500, 1000, 0, &mut seqs)
            .await
            .into_iter()
            .map(|w| w.id),
    );
    relay
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;

    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert_eq!(records.len(), committed.len(), "exactly once");
    // The marker of an unfinished snapshot is gone.
    assert_eq!(
        pg.psql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots")
            .await,
        "walrelay"
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn snapshot_never_starts_with_what_commits_next() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    existing(&pg, "old", 10, 3).await;
    let (mut relay, _) =
        Walrelay::run(&url(&pg), &kafka.bootstrap(), &["--snapshot", "never"]).await;
    let committed = write_mixed(&mut pg.client().await, "new", 5, 10, 0, &mut HashMap::new()).await;
    let records = kafka.read("events", committed.len(), Duration::from_secs(60));
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn an_interrupted_snapshot_starts_again_and_loses_nothing() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 6);
    let committed = existing(&pg, "old", 1000, 50).await;
    let args = [
        "run",
        "--postgres-url",
        &url(&pg),
        "--kafka-brokers",
        &kafka.bootstrap(),
    ];
    let mut first = Walrelay::spawn(
        &[
            &args[..],
            &[
                "--metrics-addr",
                &crate::support::walrelay::free_local_addr().to_string(),
            ],
        ]
        .concat(),
        &[],
    );
    first.wait_for_stderr("publishing the rows", WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.stop_with(Signal::SIGKILL).await;
    let slots = pg
        .psql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots")
        .await;
    assert_eq!(
        slots,
        "walrelay,walrelay_init",
        "killed before or after the snapshot: {}",
        first.stderr_text()
    );

    let mut second = Walrelay::spawn(
        &[
            &args[..],
            &[
                "--metrics-addr",
                &crate::support::walrelay::free_local_addr().to_string(),
            ],
        ]
        .concat(),
        &[],
    );
    second
        .wait_for_stderr("was interrupted; starting it again", WAIT)
        .await;
    second
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(true, &second.stderr_text());
    assert_eq!(
        pg.psql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots")
            .await,
        "walrelay"
    );
    assert_eq!(second.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
