//! The metrics endpoint under hostile clients: many connections that send
//! nothing, half a request line, or requests whose answers they never read.
//! walrelay keeps streaming, a fresh client is answered or refused at once,
//! and SIGTERM still ends the process within its shutdown timeout.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::kafka::Kafka;
use crate::support::postgres::{PgServer, SCRAM_PASSWORD, SCRAM_USER};
use crate::support::walrelay::Walrelay;
use crate::support::workload::{check, write_mixed};

const WAIT: Duration = Duration::from_secs(60);
/// More than the endpoint's cap of 32 connections.
const SLOW_CLIENTS: usize = 200;
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `SLOW_CLIENTS` connections: half send half a request line, half
/// nothing; one more pipelines requests and never reads the answers. The
/// server may close any of them at once (over the cap): that is fine.
async fn slow_clients(addr: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..SLOW_CLIENTS {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = stream.write_all(b"GET /metr").await;
        }
        held.push(stream);
    }
    if let Ok(mut greedy) = TcpStream::connect(addr).await {
        let requests = b"GET /metrics HTTP/1.1\r\nHost: walrelay\r\n\r\n".repeat(20_000);
        // Bounded: once the buffers are full, the write would wait for ever.
        let _ = tokio::time::timeout(Duration::from_secs(5), greedy.write_all(&requests)).await;
        held.push(greedy);
    }
    held
}

/// `GET /metrics` on a fresh connection, bounded: `Some(status line)` when
/// answered, `None` when the server closed the connection unanswered (over
/// the cap). Panics if the server keeps the client waiting.
async fn fresh_get(addr: SocketAddr) -> Option<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: walrelay\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        text.lines()
            .next()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("a fresh client was kept waiting by the metrics endpoint")
}

#[tokio::test]
async fn slow_http_clients_neither_stop_streaming_nor_hold_up_sigterm() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 3);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=require");
    let timeout = format!("{}s", SHUTDOWN_TIMEOUT.as_secs());
    let (mut relay, metrics) =
        Walrelay::run(&url, &kafka.bootstrap(), &["--shutdown-timeout", &timeout]).await;

    let held = slow_clients(metrics).await;
    // Streaming goes on while they hang there.
    let mut client = pg.client().await;
    let mut seqs = HashMap::new();
    let committed = write_mixed(&mut client, "slow", 10, 30, 0, &mut seqs).await;
    let records = kafka.read("events", committed.len(), WAIT);
    check(&committed, &records).assert_clean(false, &relay.stderr_text());
    // A fresh client is answered, or refused at once while the slots are
    // taken; once the slow ones are timed out, it is answered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match fresh_get(metrics).await {
            Some(status) => {
                assert_eq!(status, "HTTP/1.1 200 OK");
                break;
            }
            None => assert!(
                tokio::time::Instant::now() < deadline,
                "the metrics endpoint refused every client for {WAIT:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);

    // SIGTERM with fresh slow clients on the port: they do not hold it up.
    let _held = slow_clients(metrics).await;
    let committed = write_mixed(&mut client, "late", 10, 10, 0, &mut seqs).await;
    assert!(!committed.is_empty());
    relay.signal(Signal::SIGTERM);
    let status = relay.wait(SHUTDOWN_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", relay.stderr_text());
}

/// `walrelay healthcheck ARGS`: its exit code and what it printed.
async fn healthcheck(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut probe = Walrelay::spawn(&[&["healthcheck"][..], args].concat(), env);
    let code = probe.wait(Duration::from_secs(30)).await.code();
    let printed = format!("{}{}", probe.stdout_lines().join("\n"), probe.stderr_text());
    (code, printed)
}

#[tokio::test]
async fn walrelay_healthcheck_probes_the_local_endpoint_as_a_container_healthcheck_would() {
    let pg = PgServer::start_default().await;
    let kafka = Kafka::start(1, 1);
    let url = pg.url(SCRAM_USER, Some(SCRAM_PASSWORD), "sslmode=disable");
    let (mut relay, addr) = Walrelay::run(&url, &kafka.bootstrap(), &[]).await;
    let addr_text = addr.to_string();
    let (code, printed) = healthcheck(&["--metrics-addr", &addr_text], &[]).await;
    assert_eq!((code, printed.as_str()), (Some(0), "ok"));
    let (code, printed) =
        healthcheck(&["--metrics-addr", &addr_text, "--probe", "readyz"], &[]).await;
    assert_eq!((code, printed.as_str()), (Some(0), "ready"));
    // As in the image: the address from the environment, on every interface.
    let wildcard = format!("0.0.0.0:{}", addr.port());
    let (code, _) = healthcheck(
        &["--probe", "active"],
        &[("WALRELAY_METRICS_ADDR", &wildcard)],
    )
    .await;
    assert_eq!(code, Some(0));

    // A standby is live and ready, not active: exit 1 for that probe only.
    let mut standby = Walrelay::start(&url, &kafka.bootstrap(), &[]);
    let standby_addr = standby.metrics_addr().await.to_string();
    standby.wait_for_stderr("standing by", WAIT).await;
    let (code, _) = healthcheck(&["--metrics-addr", &standby_addr, "--probe", "readyz"], &[]).await;
    assert_eq!(code, Some(0));
    let (code, printed) =
        healthcheck(&["--metrics-addr", &standby_addr, "--probe", "active"], &[]).await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(printed.contains("503 not active: standing by"), "{printed}");

    // Nothing listening: unhealthy, at once.
    assert_eq!(relay.stop_with(Signal::SIGTERM).await.code(), Some(0));
    assert_eq!(standby.stop_with(Signal::SIGTERM).await.code(), Some(0));
    let (code, printed) =
        healthcheck(&["--metrics-addr", &addr_text, "--timeout", "2s"], &[]).await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(printed.starts_with("unhealthy: "), "{printed}");
}
