//! walrelay confirms positions only in the WAL history it streamed from: a
//! server behind the same address whose WAL ends before what walrelay
//! confirmed (a standby that lagged, a restored copy) is never confirmed to.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use super::delivery::{current_lsn, slot_confirmed, wait_confirmed};
use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;
use crate::support::workload::{check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);

/// A TCP forwarder on a port of its own whose target can be switched, as a
/// DNS name or a virtual IP moved to another server: connections made after
/// the switch reach the new target.
struct Switch {
    port: u16,
    target: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(AtomicU16::new(target));
        let to = Arc::clone(&target);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = to.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Switch { port, target, task }
    }

    fn point_to(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_server_whose_wal_ends_before_what_was_confirmed_is_never_confirmed_to() {
    // The harness makes every cluster from one template, so the two share a
    // system identifier, as a promoted standby or a restored copy of the
    // first would.
    let first = PgServer::start_default().await;
    let second = PgServer::start_default().await;
    // The second cluster has a slot of the same name, behind its own WAL.
    second
        .psql("SELECT pg_create_logical_replication_slot('walrelay', 'pgoutput');")
        .await;
    let second_slot = slot_confirmed(&second, "walrelay").await;
    let kafka = Kafka::start(1, 4);
    let switch = Switch::start(first.port()).await;
    let url = first
        .url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable")
        .replace(
            &format!(":{}/", first.port()),
            &format!(":{}/", switch.port),
        );
    let (mut relay, _) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    // Far enough on the first cluster that its positions are past the
    // second one's WAL end (a new WAL segment).
    first.psql("SELECT pg_switch_wal()").await;
    let committed = write_mixed(
        &mut first.client().await,
        "a",
        20,
        200,
        0,
        &mut HashMap::new(),
    )
    .await;
    check(&committed, &kafka.read("events", committed.len(), WAIT))
        .assert_clean(false, &relay.stderr_text());
    let end = current_lsn(&first).await;
    wait_confirmed(&first, "walrelay", end).await;
    assert!(end > current_lsn(&second).await);

    // The address now leads to the second cluster; the connection drops.
    switch.point_to(second.port());
    assert!(first.terminate_walsender("walrelay").await);
    let status = relay.wait(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", relay.stderr_text());
    assert!(
        relay.stderr_text().contains("the server's WAL ends at"),
        "{}",
        relay.stderr_text()
    );
    // Nothing was confirmed there.
    assert_eq!(slot_confirmed(&second, "walrelay").await, second_slot);
}
