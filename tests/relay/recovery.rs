//! The source side going away and coming back, a second instance standing
//! by, and a busy database with an idle events table.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use nix::sys::signal::Signal;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use walrelay::pg::lsn::Lsn;
use walrelay::pg::protocol::{StandbyStatus, put_standby_status_update};

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::oracle::{ConfirmSampler, assert_confirmed_only_what_was_on_the_topic};
use crate::support::postgres::{DATABASE, PgServer, SCRAM_PASSWORD, SCRAM_USER, TRUST_USER};
use crate::support::walrelay::{Walrelay, http_get, metric};
use crate::support::workload::{Mix, Writer, check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

/// Walsender terminations of the reconnect storm, 0.5 to 2 s apart.
const STORM_ATTEMPTS: usize = 20;

fn url(pg: &PgServer) -> String {
    pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
}

/// Polls `condition` until it holds or `WAIT` passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_terminated_walsender_and_a_postgres_restart_lose_nothing() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "a", 10, 30, 4, &mut seqs).await;

    // The walsender is killed by an operator.
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        .await;
    committed.extend(write_mixed(&mut client, "b", 10, 30, 4, &mut seqs).await);
    relay.wait_for_stderr_count("streaming", 2, WAIT).await;

    assert_eq!(
        metric(metrics, r#"walrelay_reconnects_total{target="postgres"}"#),
        1
    );

    // The server restarts (fast shutdown) while walrelay runs.
    pg.restart().await;
    relay.wait_for_stderr_count("streaming", 3, WAIT).await;
    assert!(metric(metrics, r#"walrelay_reconnects_total{target="postgres"}"#) >= 2);
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    let mut client = pg.client().await;
    committed.extend(write_mixed(&mut client, "c", 10, 30, 4, &mut seqs).await);

    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let records = kafka.read("events", committed.len(), WAIT);
    // Reconnects replay what was not confirmed, and only that.
    check(&committed, &records)
        .assert_clean_replays(&pg.decoding_sessions("walrelay"), &relay.stderr_text());
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_broker_down_at_start_is_waited_for() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    kafka.set_all_brokers(false);
    let mut relay = Walrelay::start(&url(&pg), &kafka.bootstrap(), &[]);
    let metrics = relay.metrics_addr().await;
    relay.wait_for_stderr("not reachable yet", WAIT).await;
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert_eq!(http_get(metrics, "/readyz").0, 503);
    kafka.set_all_brokers(true);
    relay.wait_for_stderr("streaming", WAIT).await;
    let committed = write_mixed(&mut pg.client().await, "x", 5, 10, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_server_out_of_connection_slots_at_start_is_waited_for() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    // Every connection of walrelay's role is refused with 53300
    // (too_many_connections), as on a server whose slots are all taken: a
    // shortage that ends by itself, so walrelay retries instead of exiting.
    pg.psql(&format!("ALTER ROLE {SCRAM_USER} CONNECTION LIMIT 0"))
        .await;
    let mut relay = Walrelay::start(&url(&pg), &kafka.bootstrap(), &[]);
    relay
        .wait_for_stderr_count("PostgreSQL is not reachable yet; retrying", 2, WAIT)
        .await;
    assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    assert!(
        relay.stderr_text().contains("53300"),
        "{}",
        relay.stderr_text()
    );
    pg.psql(&format!("ALTER ROLE {SCRAM_USER} CONNECTION LIMIT -1"))
        .await;
    relay.wait_for_stderr("streaming", WAIT).await;
    let committed = write_mixed(&mut pg.client().await, "x", 3, 5, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_second_instance_stands_by_and_takes_over_when_the_first_dies() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut first, first_addr) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut second = Walrelay::start(&url(&pg), &kafka.bootstrap(), &[]);
    let standby_addr = second.metrics_addr().await;
    second.wait_for_stderr("standing by", WAIT).await;
    // Both ready, as Kubernetes probes them; exactly one active.
    for addr in [first_addr, standby_addr] {
        assert_eq!(http_get(addr, "/healthz").0, 200);
        eventually("both instances are ready", || {
            http_get(addr, "/readyz").0 == 200
        })
        .await;
    }
    assert_eq!(http_get(first_addr, "/active").0, 200);
    assert_eq!(http_get(standby_addr, "/active").0, 503);
    assert_eq!(metric(first_addr, "walrelay_active"), 1);
    assert_eq!(metric(standby_addr, "walrelay_active"), 0);
    assert_eq!(metric(standby_addr, "walrelay_standby"), 1);

    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "a", 10, 20, 0, &mut seqs).await;
    first.stop_with(Signal::SIGKILL).await;
    let killed_at = tokio::time::Instant::now();
    // The other becomes active within seconds (it tries every second).
    let deadline = killed_at + Duration::from_secs(15);
    while http_get(standby_addr, "/active").0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no takeover within 15 s:\n{}",
            second.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed_at.elapsed();
    assert_eq!(metric(standby_addr, "walrelay_active"), 1);
    assert_eq!(metric(standby_addr, "walrelay_standby"), 0);
    assert_eq!(http_get(standby_addr, "/readyz").0, 200);
    eprintln!("takeover took {took:?}");

    committed.extend(write_mixed(&mut client, "b", 10, 20, 0, &mut seqs).await);
    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records)
        .assert_clean_replays(&pg.decoding_sessions("walrelay"), &second.stderr_text());
    assert_eq!(second.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn an_idle_events_table_does_not_pin_the_wal_of_a_busy_database() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    pg.psql("CREATE TABLE busy (id bigserial PRIMARY KEY, filler text);")
        .await;
    // About 100 MB of WAL in another table, none in the events table.
    for _ in 0..10 {
        pg.psql(
            "INSERT INTO busy (filler) SELECT repeat('x', 500) FROM generate_series(1, 20000);",
        )
        .await;
    }
    let end = current_lsn(&pg).await;
    // The slot follows the WAL end although no event was published.
    let confirmed = wait_confirmed(&pg, "walrelay", end).await;
    let retained = pg
        .psql("SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots")
        .await;
    assert!(
        retained.parse::<f64>().unwrap() < 16.0 * 1024.0 * 1024.0,
        "{retained} bytes behind at {confirmed}"
    );
    eventually("the slot's wal_status is exported", || {
        metric(
            metrics,
            r#"walrelay_slot_wal_status{slot="walrelay",status="reserved"}"#,
        ) == 1
    })
    .await;
    assert_eq!(metric(metrics, "walrelay_slot_wal_status"), 1);
    assert_eq!(metric(metrics, "walrelay_events_published_total"), 0);
    let _ = slot_confirmed(&pg, "walrelay").await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// The PID holding the slot `walrelay`, if any.
async fn slot_holder(pg: &PgServer) -> Option<i32> {
    pg.psql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walrelay'")
        .await
        .parse()
        .ok()
}

/// A standby on `postgres_url` with `--take-over-stale-slot --stale-slot-grace 15s`, standing by.
async fn stale_slot_standby(postgres_url: &str, kafka: &Kafka) -> Walrelay {
    let mut standby = Walrelay::start(
        postgres_url,
        &kafka.bootstrap(),
        &["--take-over-stale-slot", "--stale-slot-grace", "15s"],
    );
    standby.wait_for_stderr("standing by", WAIT).await;
    standby
}

#[tokio::test]
async fn a_frozen_holder_of_the_slot_is_reported_and_taken_over() {
    // Without wal_sender_timeout the server never ends the frozen holder's
    // connection itself: the standby's check is what frees the slot (with a
    // timeout, the grace is at least the timeout plus 10 s, and the server
    // comes first).
    let pg = PgServer::start(crate::support::postgres::PgOptions {
        extra_conf: vec!["wal_sender_timeout = 0".into()],
        ..crate::support::postgres::PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 4);
    let (mut frozen, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let holder = slot_holder(&pg).await.expect("the slot is held");
    frozen.signal(Signal::SIGSTOP);

    // The least-privileged role cannot see the holder's replies: the standby
    // says so and judges nothing.
    let mut standby = stale_slot_standby(&url(&pg), &kafka).await;
    standby
        .wait_for_stderr("GRANT pg_read_all_stats", WAIT)
        .await;
    assert_eq!(slot_holder(&pg).await, Some(holder));
    pg.psql(&format!("GRANT pg_read_all_stats TO {SCRAM_USER};"))
        .await;
    standby
        .wait_for_stderr("has not replied for longer than --stale-slot-grace", WAIT)
        .await;
    assert!(
        standby.stderr_text().contains(&format!("pid={holder}")),
        "{}",
        standby.stderr_text()
    );
    standby.wait_for_stderr("streaming", WAIT).await;
    let committed = write_mixed(&mut pg.client().await, "x", 5, 10, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &standby.stderr_text());
    frozen.signal(Signal::SIGCONT);
    assert_eq!(standby.stop_with(Signal::SIGTERM).await.code(), Some(0));
    frozen.stop_with(Signal::SIGKILL).await;
}

#[tokio::test]
async fn a_session_decoding_from_the_slot_with_sql_functions_is_never_terminated() {
    // A plain backend holding the slot (pg_logical_slot_peek_changes) sends
    // no status updates: nothing in pg_stat_replication moves for it, which
    // says nothing about whether it is alive. A standby waits for it.
    let pg = PgServer::start(crate::support::postgres::PgOptions {
        extra_conf: vec!["wal_sender_timeout = 0".into()],
        ..crate::support::postgres::PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 4);
    pg.psql("SELECT pg_create_logical_replication_slot('walrelay', 'pgoutput');")
        .await;
    pg.psql(&format!("GRANT pg_read_all_stats TO {SCRAM_USER};"))
        .await;
    // Enough WAL that decoding it takes a while, so that the session can be
    // caught (and frozen) while it holds the slot.
    pg.psql(
        "CREATE TABLE bulk (n int, pad text);
         INSERT INTO bulk SELECT n, repeat('x', 100) FROM generate_series(1, 400000) n;",
    )
    .await;
    let decoder = pg.client().await;
    let decoder_pid: i32 = decoder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let decoding = tokio::spawn(async move {
        decoder
            .query(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('walrelay', NULL, NULL,
                   'proto_version', '1', 'publication_names', 'walrelay_events')",
                &[],
            )
            .await
            .map(|_| ())
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while slot_holder(&pg).await != Some(decoder_pid) {
        assert!(
            !decoding.is_finished() && tokio::time::Instant::now() < deadline,
            "the decoding session never held the slot"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let decoder = nix::unistd::Pid::from_raw(decoder_pid);
    nix::sys::signal::kill(decoder, Signal::SIGSTOP).unwrap();
    let mut standby = stale_slot_standby(&url(&pg), &kafka).await;
    standby
        .wait_for_stderr("held by a session that is not a walsender", WAIT)
        .await;
    // Watched for longer than the grace, it is never called stale.
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(20) {
        assert!(
            !standby.stderr_text().contains("has not replied"),
            "{}",
            standby.stderr_text()
        );
        assert_eq!(slot_holder(&pg).await, Some(decoder_pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // It lets go when done, and the standby takes over.
    nix::sys::signal::kill(decoder, Signal::SIGCONT).unwrap();
    decoding
        .await
        .unwrap()
        .expect("the decoding session was not terminated");
    standby.wait_for_stderr("streaming", WAIT).await;
    assert_eq!(standby.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Holds the slot `walrelay` as a walrelay instance would, replying every
/// half second, but with a clock an hour behind; `freeze` stops the replies
/// and keeps the connection open, as SIGSTOP does to a process.
struct SkewedHolder {
    frozen: Arc<AtomicBool>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl SkewedHolder {
    const SKEW: Duration = Duration::from_secs(3600);

    async fn start(pg: &PgServer) -> Self {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", pg.port()))
            .await
            .unwrap();
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", TRUST_USER),
                ("database", DATABASE),
                ("replication", "database"),
            ],
            &mut out,
        )
        .unwrap();
        send(&mut tcp, &mut out).await;
        while expect_no_error(&mut tcp).await != b'Z' {}
        frontend::query(
            "START_REPLICATION SLOT \"walrelay\" LOGICAL 0/0 \
             (\"proto_version\" '1', \"publication_names\" 'walrelay_events')",
            &mut out,
        )
        .unwrap();
        send(&mut tcp, &mut out).await;
        while expect_no_error(&mut tcp).await != b'W' {}
        let (mut read, mut write) = tcp.into_split();
        let frozen = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(async move {
            let mut sink = vec![0; 64 * 1024];
            while read.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let writer = {
            let frozen = Arc::clone(&frozen);
            tokio::spawn(async move {
                let mut out = BytesMut::new();
                loop {
                    if !frozen.load(Ordering::Relaxed) {
                        put_standby_status_update(
                            StandbyStatus::default(),
                            SystemTime::now() - Self::SKEW,
                            false,
                            &mut out,
                        );
                        if write.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        SkewedHolder {
            frozen,
            tasks: [reader, writer],
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }
}

impl Drop for SkewedHolder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn send(tcp: &mut tokio::net::TcpStream, out: &mut BytesMut) {
    tcp.write_all(out).await.unwrap();
    out.clear();
}

/// Reads one backend message and returns its tag; panics on an ErrorResponse.
async fn expect_no_error(tcp: &mut tokio::net::TcpStream) -> u8 {
    let tag = tcp.read_u8().await.unwrap();
    let len = tcp.read_u32().await.unwrap();
    let mut body = vec![0; usize::try_from(len).unwrap() - 4];
    tcp.read_exact(&mut body).await.unwrap();
    assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body));
    tag
}

#[tokio::test]
async fn a_live_holder_with_a_wrong_clock_is_left_alone_until_it_freezes() {
    const GRACE: Duration = Duration::from_secs(15);
    // Without wal_sender_timeout, so that the grace is the one given and the
    // server never ends the frozen holder's connection itself.
    let pg = PgServer::start(crate::support::postgres::PgOptions {
        extra_conf: vec!["wal_sender_timeout = 0".into()],
        ..crate::support::postgres::PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 4);
    pg.psql("SELECT pg_create_logical_replication_slot('walrelay', 'pgoutput');")
        .await;
    // The holder and the standby log in as the same role, as instances of
    // one deployment do, so that the standby may terminate the holder.
    pg.psql(&format!("GRANT pg_read_all_stats TO {TRUST_USER};"))
        .await;
    let holder = SkewedHolder::start(&pg).await;
    let holder_pid = slot_holder(&pg).await.expect("the slot is held");

    let trust_url = pg.url(TRUST_USER, None, "sslmode=disable");
    let mut standby = stale_slot_standby(&trust_url, &kafka).await;
    // Watched for longer than the grace, the holder, whose every reply says
    // it is an hour old, is never called stale.
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < GRACE + Duration::from_secs(5) {
        assert!(
            !standby.stderr_text().contains("has not replied"),
            "{}",
            standby.stderr_text()
        );
        assert_eq!(slot_holder(&pg).await, Some(holder_pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    holder.freeze();
    let frozen_at = tokio::time::Instant::now();
    standby
        .wait_for_stderr("has not replied for longer than --stale-slot-grace", WAIT)
        .await;
    // Judged on the standby's own clock, from the last reply it saw change.
    assert!(
        frozen_at.elapsed() + Duration::from_secs(1) >= GRACE,
        "called stale {:?} after it froze",
        frozen_at.elapsed()
    );
    // Taken over: terminated, not left to wal_sender_timeout (60 s).
    standby.wait_for_stderr("streaming", WAIT).await;
    assert!(
        !standby.stderr_text().contains("cannot terminate"),
        "{}",
        standby.stderr_text()
    );
    let committed = write_mixed(&mut pg.client().await, "x", 5, 10, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &standby.stderr_text());
    assert_eq!(standby.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

/// Stops (SIGSTOP) the one walsender: its connection stays open, nothing
/// moves on it. Returns its PID, for SIGCONT.
async fn freeze_walsender(pg: &PgServer) -> nix::unistd::Pid {
    let walsender: i32 = pg
        .psql("SELECT pid FROM pg_stat_replication")
        .await
        .parse()
        .unwrap();
    let walsender = nix::unistd::Pid::from_raw(walsender);
    nix::sys::signal::kill(walsender, Signal::SIGSTOP).unwrap();
    walsender
}

#[tokio::test]
async fn a_stalled_connection_is_detected_and_survived() {
    // A short wal_sender_timeout makes walrelay's status interval 2 s, and
    // with it the time it waits for the server before calling a stall.
    let pg = PgServer::start(crate::support::postgres::PgOptions {
        extra_conf: vec!["wal_sender_timeout = '6s'".into()],
        ..crate::support::postgres::PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "a", 10, 20, 0, &mut seqs).await;
    kafka.read("events", committed.len(), WAIT);

    // The walsender stops answering: the TCP connection stays open, nothing
    // moves on it, as on a network that silently drops packets.
    let walsender = freeze_walsender(&pg).await;
    committed.extend(write_mixed(&mut client, "b", 10, 20, 0, &mut seqs).await);
    relay.wait_for_stderr("the connection stalls", WAIT).await;
    assert_eq!(http_get(metrics, "/readyz").0, 503);
    nix::sys::signal::kill(walsender, Signal::SIGCONT).unwrap();
    relay.wait_for_stderr_count("streaming", 2, WAIT).await;

    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records)
        .assert_clean_replays(&pg.decoding_sessions("walrelay"), &relay.stderr_text());
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_walsender_silent_for_less_than_its_timeout_is_not_taken_for_a_stall() {
    // A walsender busy decoding a large transaction reads status updates,
    // and answers their requests for a keepalive, only every half
    // wal_sender_timeout: with 40 s, it says nothing for 20 s plus a status
    // interval (10 s), and longer while it catches up. Freezing it for 34 s
    // stands in for that; a limit below the timeout (30 s, as three capped
    // intervals made it) reconnects and decodes the same transaction again,
    // forever.
    let pg = PgServer::start(crate::support::postgres::PgOptions {
        extra_conf: vec!["wal_sender_timeout = '40s'".into()],
        ..crate::support::postgres::PgOptions::default()
    })
    .await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, metrics) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let mut committed = write_mixed(&mut client, "a", 5, 10, 0, &mut seqs).await;
    kafka.read("events", committed.len(), WAIT);

    let walsender = freeze_walsender(&pg).await;
    committed.extend(write_mixed(&mut client, "b", 5, 10, 0, &mut seqs).await);
    // The silence itself is what is tested: its length is the condition.
    tokio::time::sleep(Duration::from_secs(34)).await;
    nix::sys::signal::kill(walsender, Signal::SIGCONT).unwrap();

    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    assert!(
        !relay.stderr_text().contains("the connection stalls"),
        "{}",
        relay.stderr_text()
    );
    assert_eq!(
        metric(metrics, r#"walrelay_reconnects_total{target="postgres"}"#),
        0
    );
    assert_eq!(pg.decoding_sessions("walrelay").len(), 1);
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn the_heartbeat_moves_the_slot_with_no_writes_at_all() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let (mut relay, _) = Walrelay::run(
        &url(&pg),
        &kafka.bootstrap(),
        &["--heartbeat-interval", "1s"],
    )
    .await;
    // A second slot sees what reaches the WAL: nothing writes but the heartbeat.
    pg.psql("SELECT pg_create_logical_replication_slot('watch', 'test_decoding')")
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let beats: Vec<Lsn> = loop {
        let beats = pg
            .psql(
                "SELECT lsn FROM pg_logical_slot_peek_changes('watch', NULL, NULL)
                  WHERE data LIKE 'message: transactional: 0 prefix: walrelay.heartbeat,%'",
            )
            .await;
        let beats: Vec<Lsn> = beats.lines().map(|l| l.parse().unwrap()).collect();
        if beats.len() >= 2 {
            break beats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} heartbeats reached the WAL within {WAIT:?}:\n{}",
            beats.len(),
            relay.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The slot follows them, past the second one.
    wait_confirmed(&pg, "walrelay", Lsn(beats[1].0 + 1)).await;
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn the_password_file_works_and_no_secret_leaks_into_logs_or_metrics() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-password");
    std::fs::write(&file, format!("{SCRAM_PASSWORD}\n")).unwrap();
    // Readable by its owner only, or walrelay refuses it.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let no_password = pg.url(SCRAM_USER, None, "sslmode=require");
    let (mut relay, metrics) = Walrelay::run(
        &no_password,
        &kafka.bootstrap(),
        &["--postgres-password-file", file.to_str().unwrap()],
    )
    .await;
    let committed = write_mixed(&mut pg.client().await, "x", 3, 5, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    let (_, body) = http_get(metrics, "/metrics");
    assert!(
        !body.contains(SCRAM_PASSWORD),
        "the password is in the metrics"
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    assert!(
        !relay.stderr_text().contains(SCRAM_PASSWORD),
        "the password is in the logs"
    );
}

/// `/readyz`, or `None` while nothing listens yet.
fn readyz(addr: std::net::SocketAddr) -> Option<(u16, String)> {
    std::net::TcpStream::connect(addr).ok()?;
    Some(http_get(addr, "/readyz"))
}

/// The backends of walrelay's connections that wait on a lock.
async fn walrelay_backends_waiting_on_a_lock(pg: &PgServer) -> Vec<i32> {
    pg.psql(
        "SELECT string_agg(pid::text, ',') FROM pg_stat_activity
          WHERE application_name = 'walrelay' AND wait_event_type = 'Lock'",
    )
    .await
    .split(',')
    .filter_map(|pid| pid.parse().ok())
    .collect()
}

#[tokio::test]
async fn a_metadata_query_that_never_returns_is_abandoned_and_readyz_names_it() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 4);
    // The publication check at start waits for this lock.
    let locker = pg.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_publication IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    let mut relay = Walrelay::start(&url(&pg), &kafka.bootstrap(), &["--request-timeout", "4s"]);
    let metrics = relay.metrics_addr().await;
    let request = "SELECT pubinsert FROM pg_publication WHERE pubname = $1";
    // Once the request has waited half the timeout, /readyz names it.
    eventually("/readyz names the stuck request", || {
        readyz(metrics).is_some_and(|(status, body)| {
            status == 503 && body.contains(&format!("has not answered `{request}`"))
        })
    })
    .await;
    // The backends serving it stop for good, as a frozen server's would;
    // then the lock goes.
    let deadline = tokio::time::Instant::now() + WAIT;
    let stopped = loop {
        let waiting = walrelay_backends_waiting_on_a_lock(&pg).await;
        if !waiting.is_empty() {
            break waiting;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing waits on the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for pid in &stopped {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGSTOP).unwrap();
    }
    locker.batch_execute("ROLLBACK").await.unwrap();

    // walrelay abandons the request, connects again and streams.
    relay.wait_for_stderr("streaming", WAIT).await;
    assert!(
        relay
            .stderr_text()
            .contains(&format!("PostgreSQL did not answer `{request}` within 4s")),
        "{}",
        relay.stderr_text()
    );
    eventually("/readyz is 200 again", || {
        readyz(metrics).is_some_and(|(status, _)| status == 200)
    })
    .await;
    let committed = write_mixed(&mut pg.client().await, "x", 3, 5, 0, &mut HashMap::new()).await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    for pid in &stopped {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGCONT).unwrap();
    }
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}

#[tokio::test]
async fn a_reconnect_storm_behind_a_slow_broker_loses_nothing_and_confirms_only_what_is_on_the_topic()
 {
    let pg = PgServer::start_default().await;
    // Partitions enough for the replays (the mock keeps 5 MiB per partition).
    let kafka = Kafka::start(1, 12);
    // A slow broker: acknowledgements lag, so every termination leaves
    // events in flight, and late acknowledgements of abandoned sessions.
    kafka.set_round_trip_time(Duration::from_millis(300));
    let (mut relay, _) = Walrelay::run(&url(&pg), &kafka.bootstrap(), &[]).await;
    let sampler = ConfirmSampler::start(&pg, &kafka, "events", "walrelay").await;

    // Small transactions, and every 15th one of 500 events, so that
    // terminations land inside transactions too.
    let mix = Mix {
        aggregates: 200,
        big_every: 15,
        big_events: 300,
        pause: Duration::from_millis(10),
        ..Mix::default()
    };
    let stop = CancellationToken::new();
    let writer = tokio::spawn(Writer::new(pg.superuser_url(), "storm", mix, 3).run(stop.clone()));

    // The storm: walrelay's walsender terminated every 0.5-2 s.
    let mut rng = fastrand::Rng::with_seed(3);
    let mut terminated = 0;
    for _ in 0..STORM_ATTEMPTS {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..=2000))).await;
        terminated += usize::from(pg.terminate_walsender("walrelay").await);
        assert!(relay.exited().is_none(), "{}", relay.stderr_text());
    }
    stop.cancel();
    let committed = writer.await.unwrap().committed;

    wait_confirmed(&pg, "walrelay", current_lsn(&pg).await).await;
    let samples = sampler.finish().await;
    kafka.set_round_trip_time(Duration::ZERO);
    let records = kafka.read("events", committed.len(), WAIT);
    let (checked, positions) = assert_confirmed_only_what_was_on_the_topic(&samples, &records);
    let sessions = pg.decoding_sessions("walrelay");
    let report = check(&committed, &records);
    report.assert_clean_replays(&sessions, &relay.stderr_text());
    eprintln!(
        "{terminated} of {STORM_ATTEMPTS} terminations hit a walsender; {} sessions; {} events, \
         {} duplicated; {} samples ({checked} checked against the topic, {positions} positions)",
        sessions.len(),
        committed.len(),
        report.duplicates.len(),
        samples.len()
    );
    assert!(
        terminated >= STORM_ATTEMPTS / 4,
        "only {terminated} of {STORM_ATTEMPTS} terminations found a walsender:\n{}",
        relay.stderr_text()
    );
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
}
