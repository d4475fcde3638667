//! `/progress`: what a writer waits on. A writer that committed, read
//! `pg_current_wal_lsn()`, and waited until `/progress` confirmed at or past
//! it, finds its event on the topic: every time, with other transactions in
//! flight and with an idle table (when the confirmed position is a keepalive's
//! WAL position), after a restart, and on the first start, whose initial
//! snapshot must be acknowledged before walrelay vouches for any position.
//!
//! The broker answers late throughout, so that a position confirmed before
//! the broker acknowledged would be caught: the record would not be there yet.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use walrelay::pg::lsn::Lsn;

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::{Kafka, Record};
use crate::support::postgres::{PgServer, TRUST_USER};
use crate::support::walrelay::{Walrelay, http_get, metric};
use crate::support::workload::is_rfc3339_micros;

const WAIT: Duration = Duration::from_secs(60);

/// A reading of `/progress`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    confirmed: Option<Lsn>,
    last_commit_ts: Option<String>,
}

/// `GET /progress`, with its shape checked: the LSN as text and as a number
/// agree, the commit time is RFC 3339, and nothing else is there.
fn progress(addr: SocketAddr) -> Progress {
    let (status, body) = http_get(addr, "/progress");
    assert_eq!(status, 200, "GET /progress: {body}");
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    let object = json.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["confirmed_lsn", "confirmed_lsn_int", "last_commit_ts"],
        "{body}"
    );
    let text = json["confirmed_lsn"]
        .as_str()
        .map(|t| t.parse::<Lsn>().unwrap());
    let number = json["confirmed_lsn_int"].as_u64().map(Lsn);
    assert_eq!(text, number, "the two forms of the LSN differ: {body}");
    assert_eq!(text.is_none(), json["confirmed_lsn"].is_null(), "{body}");
    let last_commit_ts = json["last_commit_ts"].as_str().map(str::to_owned);
    if let Some(ts) = &last_commit_ts {
        assert!(is_rfc3339_micros(ts), "{body}");
    }
    assert!(
        last_commit_ts.is_some() || json["last_commit_ts"].is_null(),
        "{body}"
    );
    Progress {
        confirmed: text,
        last_commit_ts,
    }
}

/// Polls `/progress` until it confirms `lsn` or more; returns the reading
/// and whether the first one was short of it (the writer had to wait).
async fn wait_published(addr: SocketAddr, lsn: Lsn) -> (Progress, bool) {
    let deadline = Instant::now() + WAIT;
    let mut waited = false;
    loop {
        let now = progress(addr);
        if now.confirmed.is_some_and(|c| c >= lsn) {
            return (now, waited);
        }
        waited = true;
        assert!(
            Instant::now() < deadline,
            "/progress still {now:?}, not {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Appends event `seq` of `aggregate` in a transaction of its own; returns
/// `pg_current_wal_lsn()` read after the commit returned.
async fn append(client: &tokio_postgres::Client, aggregate: &str, seq: i64) -> Lsn {
    client
        .execute(
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             VALUES ($1, $2, 'Written', '{}')",
            &[&aggregate, &seq],
        )
        .await
        .unwrap();
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap();
    row.get::<_, String>(0).parse().unwrap()
}

fn find<'a>(records: &'a [Record], aggregate: &str, seq: i64) -> Option<&'a Record> {
    records
        .iter()
        .find(|r| r.key == aggregate && r.seq_nr() == seq)
}

#[tokio::test]
async fn a_writer_that_waits_until_its_lsn_is_confirmed_finds_its_event_on_the_topic() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(TRUST_USER, None, "sslmode=disable");
    let (mut relay, addr) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    // From here on every acknowledgement comes a while after the record
    // reached the broker.
    kafka.set_round_trip_time(Duration::from_millis(150));
    let mut reader = kafka.reader("events");
    let client = pg.client().await;

    // Other writers' transactions, in flight while the writer waits: the
    // confirmed position is then their commits' ends too.
    let noise_on = Arc::new(AtomicBool::new(true));
    let mut noise = Some(tokio::spawn({
        let on = Arc::clone(&noise_on);
        let other = pg.client().await;
        async move {
            let mut seq = 0;
            while on.load(Ordering::Relaxed) {
                seq += 1;
                append(&other, "noise", seq).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }));

    let mut waits = 0;
    for seq in 1..=16 {
        if seq == 9 {
            // The second half on an idle table: what confirms the writer's
            // LSN is its own commit, or a keepalive's WAL position after it.
            noise_on.store(false, Ordering::Relaxed);
            noise.take().unwrap().await.unwrap();
        }
        let lsn = append(&client, "writer", seq).await;
        let (seen, waited) = wait_published(addr, lsn).await;
        waits += usize::from(waited);
        // What the broker holds at this moment, and nothing later.
        reader.catch_up(WAIT);
        let record = find(&reader.records, "writer", seq).unwrap_or_else(|| {
            panic!("/progress said {seen:?} >= {lsn}, but writer {seq} is not on the topic")
        });
        if seq > 8 {
            // Nothing else committed since: the newest transaction confirmed is ours.
            assert_eq!(
                seen.last_commit_ts.as_deref(),
                Some(record.header("commit_ts")),
                "{seen:?}"
            );
        }
    }
    // The premise: confirmation lagged the commits, so the rule was tested.
    assert!(waits > 8, "the writer waited {waits} times of 16");

    // A transaction of another table moves the WAL but publishes nothing:
    // the confirmed position follows it (keepalives), so a writer of any
    // table would not wait for ever.
    client
        .batch_execute("CREATE TABLE unpublished (x int); INSERT INTO unpublished VALUES (1)")
        .await
        .unwrap();
    let lsn = current_lsn(&pg).await;
    let before = progress(addr);
    let (after, _) = wait_published(addr, lsn).await;
    assert_eq!(
        after.last_commit_ts, before.last_commit_ts,
        "no transaction of the events table was confirmed"
    );
    // As numbers, as Prometheus sees the same position.
    assert!(metric(addr, "walrelay_confirmed_lsn") >= lsn.0);

    // A restart: walrelay vouches for the slot's position, and knows no
    // commit time until it confirms a transaction of its own.
    let everything = current_lsn(&pg).await;
    wait_confirmed(&pg, "walrelay", everything).await;
    relay.kill().await;
    let slot = slot_confirmed(&pg, "walrelay").await;
    let (_relay, addr) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let (restarted, _) = wait_published(addr, slot).await;
    assert_eq!(restarted.last_commit_ts, None, "{restarted:?}");
    let lsn = append(&client, "writer", 17).await;
    let (seen, _) = wait_published(addr, lsn).await;
    reader.catch_up(WAIT);
    let record = find(&reader.records, "writer", 17).expect("writer 17 on the topic");
    assert_eq!(
        seen.last_commit_ts.as_deref(),
        Some(record.header("commit_ts"))
    );
}

#[tokio::test]
async fn progress_vouches_for_nothing_before_the_initial_snapshot_is_acknowledged() {
    let pg = PgServer::start_default().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             SELECT 'old-' || (i % 10), i / 10 + 1, 'Written', '{}' FROM generate_series(0, 199) i",
        )
        .await
        .unwrap();
    let written = current_lsn(&pg).await;
    let kafka = Kafka::start(1, 3);
    // The snapshot's records wait half a second for their acknowledgement;
    // the new slot's position (its consistent point) is known at once.
    kafka.set_round_trip_time(Duration::from_millis(500));
    let url = pg.url(TRUST_USER, None, "sslmode=disable");
    let mut relay = Walrelay::start(&url, &kafka.bootstrap(), &[]);
    let addr = relay.metrics_addr().await;

    // A writer who committed before walrelay's first start waits, from the
    // start, until its LSN is confirmed: then every row is on the topic.
    let (seen, _) = wait_published(addr, written).await;
    let mut reader = kafka.reader("events");
    reader.catch_up(WAIT);
    let missing: Vec<(String, i64)> = (0..200)
        .map(|i| (format!("old-{}", i % 10), i / 10 + 1))
        .filter(|(key, seq)| find(&reader.records, key, *seq).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "/progress said {seen:?} >= {written}, but {} rows of the initial snapshot are not on \
         the topic, such as {:?}",
        missing.len(),
        missing.first()
    );
    relay
        .wait_for_stderr("initial snapshot published", WAIT)
        .await;
}

#[tokio::test]
async fn progress_is_null_while_walrelay_has_no_position() {
    // Nothing listens there: walrelay keeps trying to reach PostgreSQL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://{TRUST_USER}@127.0.0.1:{port}/walrelay_test?sslmode=disable");
    let mut relay = Walrelay::start(&url, "127.0.0.1:1", &[]);
    let addr = relay.metrics_addr().await;
    relay
        .wait_for_stderr("PostgreSQL is not reachable yet", WAIT)
        .await;
    assert_eq!(
        progress(addr),
        Progress {
            confirmed: None,
            last_commit_ts: None
        }
    );
    let (_, body) = http_get(addr, "/progress");
    assert_eq!(
        body,
        r#"{"confirmed_lsn":null,"confirmed_lsn_int":null,"last_commit_ts":null}"#
    );
}
