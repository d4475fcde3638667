//! `walrelay check` lists every problem of a setup, with its fix.
use std::time::Duration;

use crate::support::kafka::Kafka;
use crate::support::pg_versions;
use crate::support::postgres::{
    MD5_PASSWORD, MD5_USER, PLAIN_PASSWORD, PLAIN_USER, PgOptions, PgServer, SCRAM_PASSWORD,
    SCRAM_USER,
};
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
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), &pg.verify_full_params());
    let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");
    for line in [
        "ok       tls: sslmode=verify-full",
        "ok       authentication: SCRAM-SHA-256-PLUS",
    ] {
        assert!(output.contains(line), "no {line:?} in:\n{output}");
    }
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
        "tls: sslmode=disable: no TLS",
    ] {
        assert!(
            found.iter().any(|l| l.contains(needle)),
            "no problem {needle:?} in:\n{output}"
        );
    }
    assert_eq!(found.len(), 7, "{output}");
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

#[tokio::test]
async fn a_row_filter_or_a_column_list_that_hides_events_is_reported_with_its_fix() {
    let pg = PgServer::start(PgOptions {
        version: pg_versions::at_least(15, "row filters and column lists"),
        ..PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), &pg.verify_full_params());
    pg.psql("ALTER PUBLICATION walrelay_events SET TABLE events WHERE (event_type <> 'Internal');")
        .await;
    let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(2), "{output}");
    let found = problems(&output);
    assert!(
        found.len() == 1
            && found[0].contains(
                "filters the rows of public.events (WHERE (event_type <> 'Internal'::text))"
            ),
        "{output}"
    );
    let fix = "BEGIN; ALTER PUBLICATION \"walrelay_events\" DROP TABLE \"public\".\"events\"; \
               ALTER PUBLICATION \"walrelay_events\" ADD TABLE \"public\".\"events\"; COMMIT;";
    assert!(output.contains(&format!("fix: {fix}")), "{output}");

    // run refuses to start rather than skip the rows the filter hides.
    let mut relay = Walrelay::spawn(
        &[
            "run",
            "--postgres-url",
            &url,
            "--kafka-brokers",
            "127.0.0.1:1",
        ],
        &[],
    );
    assert_eq!(
        relay.wait(WAIT).await.code(),
        Some(1),
        "{}",
        relay.stderr_text()
    );
    assert!(
        relay
            .stderr_text()
            .contains("filters the rows of public.events"),
        "{}",
        relay.stderr_text()
    );

    // The fix as given clears it.
    pg.psql(fix).await;
    let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");

    // A column list without seq_nr (and, for the topic, tenant).
    pg.psql(
        "ALTER TABLE events ADD COLUMN tenant text;
         ALTER PUBLICATION walrelay_events SET TABLE events (aggregate_id, event_type, payload);",
    )
    .await;
    let (code, output) = check(
        &url,
        &kafka.bootstrap(),
        &[
            "--topic",
            "events.{tenant}",
            "--allow-aggregate-across-topics",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{output}");
    assert!(
        problems(&output).iter().any(|l| l.contains(
            "has a column list for public.events that leaves out [\"seq_nr\", \"tenant\"], which walrelay needs"
        )),
        "{output}"
    );
    pg.psql(fix).await;
    let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");
}

#[tokio::test]
async fn an_unverified_server_and_a_password_weaker_than_scram_are_reported_with_their_fix() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let verify_full = "fix: use sslmode=verify-full with sslrootcert=";
    // Every sslmode below verify-ca: the server could be anyone.
    for mode in ["disable", "prefer", "require"] {
        let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), &format!("sslmode={mode}"));
        let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
        assert_eq!(code, Some(2), "{mode}: {output}");
        let found = problems(&output);
        assert!(
            found.len() == 1 && found[0].contains(&format!("tls: sslmode={mode}: ")),
            "{mode}: {output}"
        );
        assert!(output.contains(verify_full), "{mode}: {output}");
    }
    // verify-ca verifies the chain: no finding.
    let ca = pg.ca_cert_path().unwrap();
    let url = pg.url(
        SCRAM_USER,
        Some(SCRAM_PASSWORD),
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    );
    let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("ok       tls: sslmode=verify-ca"),
        "{output}"
    );

    // md5 and cleartext, as the server asked for them during check's own
    // login (verified, so that walrelay answers at all).
    for (user, password, method) in [
        (MD5_USER, MD5_PASSWORD, "md5"),
        (PLAIN_USER, PLAIN_PASSWORD, "password (cleartext)"),
    ] {
        let url = pg.url(user, Some(password), &pg.verify_full_params());
        let (code, output) = check(&url, &kafka.bootstrap(), &[]).await;
        assert!(!output.contains(password), "password leaked:\n{output}");
        assert_eq!(code, Some(2), "{user}: {output}");
        let found = problems(&output);
        assert!(
            found.len() == 1
                && found[0].contains(&format!(
                    "authentication: PostgreSQL asked for {method} authentication"
                )),
            "{user}: {output}"
        );
        assert!(
            output.contains("fix: use scram-sha-256 for this role in pg_hba.conf"),
            "{user}: {output}"
        );
    }
}
