//! `walrelay tail` against a real server: what it prints is what walrelay
//! would publish, committed rows only, in commit order.
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;

const WAIT: Duration = Duration::from_secs(60);

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn header<'a>(event: &'a Value, name: &str) -> &'a str {
    event["headers"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no header {name}: {event}"))
}

fn scram_tls_url(pg: &PgServer) -> String {
    let ca = pg.ca_cert_path().unwrap();
    pg.url(
        SCRAM_USER,
        Some(SCRAM_PASSWORD),
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    )
}

/// A fresh server and a `tail` of it that is ready.
async fn server_and_tail() -> (PgServer, Walrelay) {
    let pg = PgServer::start_default().await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let tail = Walrelay::tail(&url, &[]).await;
    (pg, tail)
}

async fn slots(pg: &PgServer) -> String {
    pg.psql("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
        .await
}

#[tokio::test]
async fn scram_over_tls_prints_committed_inserts_in_the_message_contract() {
    // A server in another time zone: the headers must still be UTC.
    let pg = PgServer::start(PgOptions {
        extra_conf: vec!["timezone = 'Asia/Kolkata'".into()],
        ..PgOptions::default()
    })
    .await;
    let url = scram_tls_url(&pg);
    let mut tail = Walrelay::tail(&url, &[]).await;
    pg.psql(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload, metadata)
           VALUES ('order-1', 1, 'OrderPlaced', '{\"total\": 12.5, \"items\": [1, 2]}', '{\"by\": \"ann\"}');
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
           VALUES ('order-1', 2, 'OrderShipped', '{}');",
    )
    .await;
    let events = parse(&tail.wait_for_lines(2, WAIT).await);

    let first = &events[0];
    assert_eq!(first["topic"], "events");
    assert_eq!(first["key"], "order-1");
    assert_eq!(
        first["value"],
        serde_json::json!({"total": 12.5, "items": [1, 2]})
    );
    assert_eq!(header(first, "seq_nr"), "1");
    assert_eq!(header(first, "event_type"), "OrderPlaced");
    assert_eq!(header(first, "metadata"), "{\"by\": \"ann\"}");
    assert!(
        first["headers"].get("payload").is_none() && first["headers"].get("aggregate_id").is_none()
    );
    // recorded_at in ISO form, UTC, whatever the server's TimeZone.
    assert!(header(first, "recorded_at").ends_with("+00"), "{first}");
    // lsn is the commit LSN as X/Y, commit_ts RFC 3339 UTC.
    let lsn = header(first, "lsn");
    assert!(
        lsn.split_once('/').is_some_and(
            |(a, b)| u32::from_str_radix(a, 16).is_ok() && u32::from_str_radix(b, 16).is_ok()
        ),
        "{lsn}"
    );
    let ts = header(first, "commit_ts");
    assert!(
        humantime::parse_rfc3339(ts).is_ok() && ts.ends_with('Z'),
        "{ts}"
    );
    // Two transactions, two commit LSNs, in order.
    let second_lsn: walrelay::pg::lsn::Lsn = header(&events[1], "lsn").parse().unwrap();
    assert!(second_lsn > lsn.parse().unwrap());

    // The walsender is really on TLS, and the password shows nowhere.
    let ssl = pg
        .psql("SELECT bool_and(s.ssl) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)")
        .await;
    assert_eq!(ssl, "t");
    assert_eq!(
        tail.stop_with(Signal::SIGINT).await.code(),
        Some(0),
        "{}",
        tail.stderr_text()
    );
    let everything = format!("{}\n{}", tail.stdout_lines().join("\n"), tail.stderr_text());
    assert!(
        !everything.contains(SCRAM_PASSWORD),
        "password leaked:\n{everything}"
    );
}

#[tokio::test]
async fn a_wrong_password_exits_with_the_servers_error_and_never_echoes_it() {
    let pg = PgServer::start_default().await;
    let wrong = "Wrong-Pass-4417";
    let url = pg.url(SCRAM_USER, Some(wrong), "sslmode=require");
    let mut tail = Walrelay::spawn(&["tail", "--postgres-url", &url], &[]);
    let status = tail.wait(WAIT).await;
    assert_eq!(status.code(), Some(1));
    let stderr = tail.stderr_text();
    assert!(
        stderr.contains("28P01") && stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "password leaked:\n{stderr}");
    assert!(tail.stdout_lines().is_empty());
}

#[tokio::test]
async fn a_server_without_logical_wal_level_is_a_clear_error() {
    let pg = PgServer::start(PgOptions {
        wal_level: "replica",
        ..PgOptions::default()
    })
    .await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let mut tail = Walrelay::spawn(&["tail", "--postgres-url", &url], &[]);
    assert_eq!(tail.wait(WAIT).await.code(), Some(1));
    let stderr = tail.stderr_text();
    assert!(
        stderr.contains("wal_level is \"replica\"") && stderr.contains("wal_level = logical"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_missing_publication_is_a_clear_error() {
    let pg = PgServer::start_default().await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let mut tail = Walrelay::spawn(
        &["tail", "--postgres-url", &url, "--publication", "nope"],
        &[],
    );
    assert_eq!(tail.wait(WAIT).await.code(), Some(1));
    let stderr = tail.stderr_text();
    assert!(
        stderr.contains("publication \"nope\" does not exist"),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_configuration_exits_2_before_connecting() {
    // Port 1 has no server: only a connection attempt could fail there.
    for args in [
        &[
            "tail",
            "--postgres-url",
            "postgres://u@127.0.0.1:1/d?sslmode=bogus",
        ][..],
        &[
            "tail",
            "--postgres-url",
            "postgres://u@127.0.0.1:1/d",
            "--topic",
            "a b",
        ],
        &[
            "tail",
            "--postgres-url",
            "postgres://u@127.0.0.1:1/d",
            "--table",
            "a.b.c",
        ],
        &["tail", "--no-such-flag"],
        &["tail"],
    ] {
        let mut w = Walrelay::spawn(args, &[]);
        let status = w.wait(WAIT).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {}", w.stderr_text());
        assert!(
            !w.stderr_text().contains("cannot connect"),
            "{args:?} connected"
        );
    }
}

#[tokio::test]
async fn rolled_back_work_never_appears() {
    let (pg, mut tail) = server_and_tail().await;
    pg.psql(
        "BEGIN;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('gone', 1, 'X', '{}');
         ROLLBACK;
         BEGIN;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('kept', 1, 'X', '{}');
         SAVEPOINT s;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('gone', 2, 'X', '{}');
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('kept', 2, 'X', '{}');
         COMMIT;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('last', 1, 'X', '{}');",
    )
    .await;
    let events = parse(&tail.wait_for_lines(3, WAIT).await);
    let keys: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["key"].as_str().unwrap(), header(e, "seq_nr")))
        .collect();
    assert_eq!(keys, [("kept", "1"), ("kept", "2"), ("last", "1")]);
    // Nothing follows the marker, either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tail.stdout_lines().len(), 3);
}

#[tokio::test]
async fn concurrent_writers_each_committed_row_once_in_commit_order() {
    let (pg, mut tail) = server_and_tail().await;

    // Eight writers, each with its own aggregates, interleave transactions of
    // one to four rows; every fifth transaction rolls back.
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let client = pg.client().await;
        writers.push(tokio::spawn(async move {
            let mut committed: Vec<Vec<(String, i64)>> = Vec::new();
            let mut next_seq: BTreeMap<String, i64> = BTreeMap::new();
            let mut client = client;
            for t in 0..30u32 {
                let txn = client.transaction().await.unwrap();
                let mut rows = Vec::new();
                let mut seqs = next_seq.clone();
                for r in 0..=(t + w) % 4 {
                    let aggregate = format!("w{w}-a{}", (t + r) % 3);
                    let seq = seqs.entry(aggregate.clone()).or_insert(1);
                    txn.execute(
                        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
                         VALUES ($1, $2, 'Tested', jsonb_build_object('w', $3::int, 't', $4::int))",
                        &[
                            &aggregate,
                            &*seq,
                            &i32::try_from(w).unwrap(),
                            &i32::try_from(t).unwrap(),
                        ],
                    )
                    .await
                    .unwrap();
                    rows.push((aggregate, *seq));
                    *seq += 1;
                }
                if t % 5 == 4 {
                    txn.rollback().await.unwrap();
                } else {
                    txn.commit().await.unwrap();
                    next_seq = seqs;
                    committed.push(rows);
                }
                tokio::task::yield_now().await;
            }
            committed
        }));
    }
    let mut per_writer = Vec::new();
    for w in writers {
        per_writer.push(w.await.unwrap());
    }
    let total: usize = per_writer.iter().flatten().map(Vec::len).sum();
    let events = parse(&tail.wait_for_lines(total, WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tail.stdout_lines().len(),
        total,
        "more lines than committed rows"
    );

    // Every committed row exactly once.
    let seen: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                header(e, "seq_nr").parse().unwrap(),
            )
        })
        .collect();
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a row appeared twice");
    let expected: HashSet<_> = per_writer.iter().flatten().flatten().cloned().collect();
    assert_eq!(unique, expected);

    // Commit order: LSNs never go back, a transaction's rows are contiguous,
    // and each writer's transactions appear in the order it committed them.
    let lsns: Vec<walrelay::pg::lsn::Lsn> = events
        .iter()
        .map(|e| header(e, "lsn").parse().unwrap())
        .collect();
    assert!(
        lsns.windows(2).all(|p| p[0] <= p[1]),
        "commit LSNs out of order"
    );
    for (w, transactions) in per_writer.iter().enumerate() {
        let prefix = format!("w{w}-");
        let mine: Vec<&(String, i64)> = seen
            .iter()
            .filter(|(a, _)| a.starts_with(&prefix))
            .collect();
        let want: Vec<&(String, i64)> = transactions.iter().flatten().collect();
        assert_eq!(mine, want, "writer {w}'s rows out of commit order");
    }
}

#[tokio::test]
async fn a_100k_row_transaction_streams_whole_and_in_order() {
    let (pg, mut tail) = server_and_tail().await;
    pg.psql(
        "INSERT INTO events (aggregate_id, seq_nr, event_type, payload)
         SELECT 'big', n, 'Bulk', jsonb_build_object('n', n) FROM generate_series(1, 100000) AS n;",
    )
    .await;
    let events = parse(&tail.wait_for_lines(100_000, Duration::from_secs(240)).await);
    let lsn = header(&events[0], "lsn").to_owned();
    for (i, e) in events.iter().enumerate() {
        let n = i64::try_from(i).unwrap() + 1;
        assert_eq!(header(e, "seq_nr").parse::<i64>().unwrap(), n);
        assert_eq!(e["value"]["n"].as_i64(), Some(n));
        assert_eq!(header(e, "lsn"), lsn, "one transaction, one commit LSN");
    }
}

#[tokio::test]
async fn a_column_added_while_streaming_appears_in_later_headers() {
    let (pg, mut tail) = server_and_tail().await;
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'X', '{}');").await;
    tail.wait_for_lines(1, WAIT).await;
    pg.psql(
        "ALTER TABLE events ADD COLUMN tenant text;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload, tenant) VALUES ('a', 2, 'X', '{}', 'acme');
         ALTER TABLE events DROP COLUMN metadata;
         INSERT INTO events (aggregate_id, seq_nr, event_type, payload, tenant) VALUES ('a', 3, 'X', '{}', 'acme');",
    )
    .await;
    let events = parse(&tail.wait_for_lines(3, WAIT).await);
    assert!(events[0]["headers"].get("tenant").is_none());
    assert_eq!(header(&events[1], "tenant"), "acme");
    assert_eq!(header(&events[1], "metadata"), "{}");
    assert!(
        events[2]["headers"].get("metadata").is_none(),
        "dropped column still shown"
    );
    assert_eq!(header(&events[2], "tenant"), "acme");
}

#[tokio::test]
async fn tail_uses_a_temporary_slot_and_leaves_nothing_behind() {
    let (pg, mut tail) = server_and_tail().await;
    let during = pg
        .psql("SELECT slot_name || ' ' || temporary FROM pg_replication_slots")
        .await;
    assert!(
        during.starts_with("walrelay_tail_") && during.ends_with(" true"),
        "{during}"
    );
    // It confirms what it printed: the slot follows the events.
    pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'X', '{}');").await;
    let line = parse(&tail.wait_for_lines(1, WAIT).await).remove(0);
    let commit: walrelay::pg::lsn::Lsn = header(&line, "lsn").parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let confirmed: walrelay::pg::lsn::Lsn = pg
            .psql("SELECT confirmed_flush_lsn FROM pg_replication_slots")
            .await
            .parse()
            .unwrap();
        if confirmed > commit {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot stuck at {confirmed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tail.stop_with(Signal::SIGTERM).await.code(),
        Some(0),
        "{}",
        tail.stderr_text()
    );
    assert_eq!(slots(&pg).await, "", "the temporary slot outlived tail");
}

#[tokio::test]
async fn the_column_flags_map_any_table_and_a_binary_payload_shows_as_bytea_hex() {
    let pg = PgServer::start_default().await;
    pg.psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, stream bigint NOT NULL, kind text NOT NULL,
                              body bytea NOT NULL);
         GRANT SELECT ON outbox TO scram_user;
         CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');",
    )
    .await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let mut tail = Walrelay::tail(
        &url,
        &[
            "--table",
            "public.outbox",
            "--publication",
            "outbox_pub",
            "--key-column",
            "stream",
            "--seq-column",
            "none",
            "--payload-column",
            "body",
            "--type-column",
            "kind",
            "--header-name",
            "kind=eventType",
            "--topic",
            "stream.{kind}",
        ],
    )
    .await;
    pg.psql(
        "INSERT INTO outbox VALUES ('4d47e190-0402-4048-bc2c-89dd54343cdc', 42, 'Created',
                                    decode('0a03ff00', 'hex'));",
    )
    .await;
    let event = &parse(&tail.wait_for_lines(1, WAIT).await)[0];
    assert_eq!(event["topic"], "stream.Created");
    assert_eq!(event["key"], "42");
    assert_eq!(event["value"], "\\x0a03ff00");
    assert_eq!(header(event, "id"), "4d47e190-0402-4048-bc2c-89dd54343cdc");
    assert_eq!(header(event, "eventType"), "Created");
    assert!(event["headers"].get("kind").is_none(), "{event}");
    assert_eq!(tail.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
