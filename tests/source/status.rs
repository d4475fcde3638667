//! Standby status updates against a real server: a quiet database is not a
//! stalled connection.
use std::fmt::Write as _;
use std::time::Duration;

use walrelay::pg::conn::{Feedback, ReplicationConnection, SnapshotAction, StreamTiming};
use walrelay::pg::lsn::Lsn;
use walrelay::pg::params::ConnectParams;
use walrelay::pg::pgoutput::Message;
use walrelay::pg::protocol::ReplicationMessage;

use crate::support::postgres::{PgOptions, PgServer, SCRAM_PASSWORD, SCRAM_USER};

#[tokio::test]
async fn acknowledgements_trickling_in_on_an_idle_server_are_not_taken_for_a_stall() {
    // wal_sender_timeout 3 s: status updates every second. A live server
    // asked for keepalives is never silent for three of them (walrelay
    // itself waits longer before it calls a stall: the timeout plus a margin,
    // for a walsender busy decoding; this one is idle).
    let pg = PgServer::start(PgOptions {
        extra_conf: vec!["wal_sender_timeout = '3s'".into()],
        ..PgOptions::default()
    })
    .await;
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let params = ConnectParams::from_url_with_env(&url, |_| None).unwrap();
    let mut repl = ReplicationConnection::connect(&params).await.unwrap();
    let timing =
        StreamTiming::from_wal_sender_timeout(&repl.show("wal_sender_timeout").await.unwrap());
    let interval = timing.status_interval;
    assert_eq!(interval, Duration::from_secs(1));
    let slot = repl
        .create_logical_slot("trickle", true, SnapshotAction::Discard)
        .await
        .unwrap();
    let mut inserts = String::new();
    for seq in 1..=40 {
        writeln!(
            inserts,
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             VALUES ('a', {seq}, 'Tested', '{{}}');"
        )
        .unwrap();
    }
    pg.psql(&inserts).await;

    let feedback = Feedback::new(slot.consistent_point);
    let mut stream = repl
        .start_logical(
            "trickle",
            Lsn::ZERO,
            &[
                ("proto_version", "1"),
                ("publication_names", "\"walrelay_events\""),
            ],
        )
        .await
        .unwrap()
        .report(feedback.clone(), timing);

    // As walrelay does with a slow broker: every transaction is received at
    // once (and reported as written), and their acknowledgements come one
    // every 300 ms, so status updates go out more often than the interval
    // while the server, with nothing new to send, stays quiet. The reader
    // waits on the stream the whole time, as the session loop does.
    let (ends, mut to_confirm) = tokio::sync::mpsc::unbounded_channel::<Lsn>();
    let acks = {
        let feedback = feedback.clone();
        tokio::spawn(async move {
            let mut confirmed = 0;
            let mut trickle = tokio::time::interval(Duration::from_millis(300));
            while let Some(end) = to_confirm.recv().await {
                trickle.tick().await;
                feedback.confirm(end);
                confirmed += 1;
            }
            confirmed
        })
    };
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut last_heard = tokio::time::Instant::now();
    while let Ok(message) = tokio::time::timeout_at(until, stream.next()).await {
        let silence = last_heard.elapsed();
        assert!(
            silence < interval * 3,
            "the server was silent for {silence:?} while acknowledgements trickled in"
        );
        last_heard = tokio::time::Instant::now();
        match message {
            Ok(ReplicationMessage::XLogData { data, .. }) => {
                if let Message::Commit(commit) = Message::parse(data).unwrap() {
                    feedback.received(commit.end_lsn);
                    ends.send(commit.end_lsn).unwrap();
                }
            }
            Ok(ReplicationMessage::PrimaryKeepalive { wal_end, .. }) => feedback.received(wal_end),
            Err(e) => panic!(
                "with acknowledgements trickling in (flush at {}): {e}",
                feedback.confirmed()
            ),
        }
    }
    let silence = last_heard.elapsed();
    assert!(
        silence < interval * 3,
        "the server was silent for the last {silence:?}"
    );
    drop(ends);
    acks.abort();
    let confirmed = feedback.confirmed();
    assert!(
        confirmed.bytes_since(slot.consistent_point) > 0,
        "no acknowledgement trickled in"
    );
    stream.close().await.unwrap();
}
