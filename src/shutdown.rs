//! The one place that waits for the signal to stop.
use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM, and returns its name.
pub async fn signal_received() -> &'static str {
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers the process cannot be stopped gracefully;
        // the default handlers still stop it.
        tracing::warn!(
            "cannot install signal handlers; SIGINT and SIGTERM will stop walrelay at once"
        );
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}
