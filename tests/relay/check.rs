//! `walrelay check` lists every problem of a setup, with its fix.
use std::time::Duration;

use crate::support::kafka::Kafka;
use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;

const WAIT: Duration = Duration::from_secs(60);

async fn check(url: &str, brokers: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["check", "--postgres-url", url, "--kafka-brokers", brokers];
    args.extend_from_slice(extra);
    let mut w = Walrelay::spawn(&args, &[]);
    let status = w.wait(WAIT).await;
    let output = format!("{}\n{}", w.stdout_lines().join("\n"), w.stderr_text());
    assert!(
        !output.contains(SCRAM_PASSWORD),
        "password leaked:\n{output}"
    );
    (status.code(), output)
}

fn problems(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.starts_with("PROBLEM"))
        .collect()
}

#[tokio::test]
async fn a_sound_setup_passes() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=require");
    let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        problems(&output).is_empty() && output.contains("checks passed"),
        "{output}"
    );
    assert!(
        output.contains("does not exist yet; run will create it"),
        "{output}"
    );
    // It only reads: no slot was created.
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots").await,
        "0"
    );
}

#[tokio::test]
async fn every_problem_of_a_broken_setup_is_listed_with_its_fix() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    // A walrelay that holds the slot.
    let (_holder, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    pg.psql(
        "DROP PUBLICATION walrelay_events;
         ALTER TABLE events RENAME COLUMN payload TO body;
         ALTER ROLE scram_user NOREPLICATION;
         REVOKE SELECT ON events FROM scram_user;",
    )
    .await;
    let (code, output) = check(
        &url,
        &kafka.bootstrap(),
        &[
            "--topic",
            "absent",
            "--kafka-property",
            "allow.auto.create.topics=false",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{output}");
    let found = problems(&output);
    for needle in [
        "publication: \"walrelay_events\" does not exist",
        "table: public.events lacks the column(s) [\"payload\"]",
        "lacks the REPLICATION attribute",
        "may not SELECT from public.events",
        "is active for PID",
        "topic \"absent\" does not exist",
    ] {
        assert!(
            found.iter().any(|l| l.contains(needle)),
            "no problem {needle:?} in:\n{output}"
        );
    }
    assert_eq!(found.len(), 6, "{output}");
    assert!(
        output.contains("fix: apply sql/003_publication.sql"),
        "{output}"
    );
    assert!(
        output.contains("fix: GRANT SELECT ON public.events TO scram_user"),
        "{output}"
    );
}

#[tokio::test]
async fn a_server_without_logical_decoding_and_an_unreachable_broker_are_both_reported() {
    let pg = PgServer::start(PgOptions {
        wal_level: "replica",
        ..PgOptions::default()
    })
    .await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let (code, output) = check(&url, "127.0.0.1:1", &[]).await;
    assert_eq!(code, Some(2), "{output}");
    let found = problems(&output);
    assert!(
        found.iter().any(|l| l.contains("wal_level: replica")),
        "{output}"
    );
    assert!(
        found
            .iter()
            .any(|l| l.contains("kafka: cannot reach 127.0.0.1:1")),
        "{output}"
    );
}
