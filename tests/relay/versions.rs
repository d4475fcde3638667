//! What differs between PostgreSQL 14, 15, 16, 17 and 18, each tested on a
//! version that has it (`PgOptions::version`), whatever the run's version.
use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::kafka::Kafka;
use crate::support::pg_versions;
use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;
use crate::support::workload::{check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

/// Transactions written through a replication origin.
const REPLICATED: i64 = 5;

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
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
