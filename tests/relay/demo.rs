//! `walrelay demo` brings up everything by itself and shows what it publishes.
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::walrelay::{ANY_LOCAL_PORT, Walrelay, http_get};

#[tokio::test]
async fn demo_publishes_sample_events_and_never_the_rolled_back_one() {
    let mut demo = Walrelay::spawn(&["demo", "--metrics-addr", ANY_LOCAL_PORT], &[]);
    let metrics = demo.metrics_addr().await;
    demo.wait_for_stderr("streaming", Duration::from_secs(120))
        .await;
    // Seven rounds of 0.7 s: the seventh one rolls back.
    let lines = demo.wait_for_lines(8, Duration::from_secs(60)).await;
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(
            event["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("order-")),
            "{line}"
        );
        assert!(
            event["headers"]["seq_nr"].is_string() && event["headers"]["lsn"].is_string(),
            "{line}"
        );
        assert_ne!(
            event["value"]["round"], 7,
            "the rolled-back round was published: {line}"
        );
    }
    assert!(
        demo.stderr_text().contains("rolled it back"),
        "{}",
        demo.stderr_text()
    );
    let (status, body) = http_get(metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("walrelay_events_published_total"));
    assert_eq!(
        demo.stop_with(Signal::SIGINT).await.code(),
        Some(0),
        "{}",
        demo.stderr_text()
    );
}
