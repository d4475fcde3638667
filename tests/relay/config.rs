//! Bad configuration of `walrelay run` exits with code 2 before connecting.
use std::time::Duration;

use crate::support::walrelay::Walrelay;

#[tokio::test]
async fn bad_run_configuration_exits_2_naming_the_setting() {
    // Nothing listens on port 1: only a connection attempt could fail there.
    let base = [
        "run",
        "--postgres-url",
        "postgres://u@127.0.0.1:1/d",
        "--kafka-brokers",
        "127.0.0.1:1",
    ];
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--postgres-url", "postgres://u@127.0.0.1:1/d"],
            "--kafka-brokers",
        ),
        (
            [&base[..], &["--kafka-property", "acks=0"]].concat(),
            "acks",
        ),
        ([&base[..], &["--topic", "{unclosed"]].concat(), "--topic"),
        // One aggregate could reach two topics.
        (
            [&base[..], &["--topic", "events.{event_type}"]].concat(),
            "--allow-aggregate-across-topics",
        ),
        // One aggregate could reach two partitions.
        (
            [&base[..], &["--kafka-property", "partitioner=random"]].concat(),
            "--kafka-property partitioner: not allowed but as murmur2_random or murmur2",
        ),
        // Dead-letter records would land among the events.
        (
            [
                &base[..],
                &[
                    "--on-poison",
                    "dead-letter",
                    "--dead-letter-topic",
                    "events",
                ],
            ]
            .concat(),
            "--dead-letter-topic",
        ),
        // The producer would give up on events during a broker outage.
        (
            [&base[..], &["--kafka-property", "message.timeout.ms=60000"]].concat(),
            "--kafka-property message.timeout.ms: not allowed but as 0",
        ),
        (
            [
                &base[..],
                &["--kafka-property", "delivery.timeout.ms=300000"],
            ]
            .concat(),
            "--kafka-property delivery.timeout.ms: not allowed but as 0",
        ),
        // --on-poison halt (the default) needs the gap-less guarantee.
        (
            [
                &base[..],
                &["--kafka-property", "enable.gapless.guarantee=false"],
            ]
            .concat(),
            "--kafka-property enable.gapless.guarantee",
        ),
        (
            [&base[..], &["--create-slot=maybe"]].concat(),
            "create-slot",
        ),
        (
            [&base[..], &["--metrics-addr", &busy_addr]].concat(),
            "--metrics-addr",
        ),
    ];
    for (args, needle) in cases {
        let mut w = Walrelay::spawn(&args, &[]);
        let status = w.wait(Duration::from_secs(30)).await;
        let stderr = w.stderr_text();
        assert_eq!(status.code(), Some(2), "{args:?}:\n{stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?} does not name {needle}:\n{stderr}"
        );
        assert!(
            !stderr.contains("cannot connect"),
            "{args:?} tried to connect:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn environment_variables_configure_run() {
    let mut w = Walrelay::spawn(
        &["run"],
        &[
            ("WALRELAY_POSTGRES_URL", "postgres://u@127.0.0.1:1/d"),
            ("WALRELAY_KAFKA_BROKERS", "127.0.0.1:1"),
            ("WALRELAY_SLOT", "Not-Valid"),
        ],
    );
    assert_eq!(w.wait(Duration::from_secs(30)).await.code(), Some(2));
    assert!(w.stderr_text().contains("--slot"), "{}", w.stderr_text());
}
