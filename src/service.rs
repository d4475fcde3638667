//! `walrelay run` as a process: the metrics endpoint, the signal that stops
//! it, and the pipeline, started and stopped in one place.
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RunConfig;
use crate::metrics::{self, HttpLimits, Metrics};
use crate::pipeline::{self, RunError};

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The metrics address cannot be bound (a configuration problem).
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pipeline stopped.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// How much longer than its longest bounded step the pipeline may go without
/// a sign of life before `/healthz` calls it wedged.
pub const STALL_MARGIN: Duration = Duration::from_secs(30);

impl ServiceError {
    /// The halt's reason, when the pipeline halted.
    pub fn halt_reason(&self) -> Option<&'static str> {
        match self {
            ServiceError::Run(e) => e.halt_reason(),
            ServiceError::Bind { .. } => None,
        }
    }
}

/// How long the pipeline may show no sign of life before a session knows
/// the server's `wal_sender_timeout`: its longest step bounded by a timeout
/// of its own (a request, a connection), at least 30 s, plus
/// [`STALL_MARGIN`]. Each session raises it to its stream's silence limit
/// plus the margin (see `pipeline`), since a walsender busy decoding a
/// large transaction may be silent that long.
pub fn stall_limit(config: &RunConfig) -> Duration {
    let longest = config
        .postgres
        .requests
        .timeout
        .max(config.postgres.connect_timeout)
        .max(Duration::from_secs(30));
    longest + STALL_MARGIN
}

/// Serves metrics and runs the pipeline until `stop` completes (then drains)
/// or the pipeline fails.
pub async fn run(
    mut config: RunConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let metrics = Metrics::new();
    // Every connection lists its waiting requests where /readyz looks.
    config.postgres.requests.waiting = Some(metrics.health().requests());
    metrics
        .health()
        .set_request_timeout(config.postgres.requests.timeout);
    metrics.health().set_stall_limit(stall_limit(&config));
    metrics.health().beat();
    let listener =
        metrics::bind(config.metrics_addr)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: config.metrics_addr,
                source,
            })?;
    // The bound address, not the configured one: with port 0 the system
    // picks the port, and this line is where an operator (or a test) learns it.
    let addr = listener.local_addr().unwrap_or(config.metrics_addr);
    tracing::info!(addr = %addr, postgres = %config.postgres.redacted_url(),
        brokers = %config.kafka_brokers, topic = %config.mapping.topic, slot = %config.slot, "starting");
    // Allowed, since the user asked for them; never silent.
    for weakening in config.kafka_properties.weakenings() {
        tracing::warn!(fix = weakening.fix, "{weakening}");
    }

    let shutdown = CancellationToken::new();
    let server_stop = shutdown.clone();
    // Open connections get at most the shutdown timeout to finish, so that
    // the endpoint's drain ends within the pipeline's.
    let limits = HttpLimits {
        close_grace: metrics::CLOSE_GRACE.min(config.shutdown_timeout),
        ..HttpLimits::default()
    };
    let server = tokio::spawn(metrics::serve(
        listener,
        metrics.clone(),
        limits,
        async move { server_stop.cancelled().await },
    ));
    let on_signal = shutdown.clone();
    let health = std::sync::Arc::clone(metrics.health());
    let signal = tokio::spawn(async move {
        stop.await;
        // The drain is bounded by --shutdown-timeout: still live meanwhile.
        health.set_stopping();
        on_signal.cancel();
    });

    let result = pipeline::run(&config, metrics, shutdown.clone()).await;
    signal.abort();
    shutdown.cancel();
    if let Err(error) = server.await {
        tracing::warn!(error = %error, "metrics endpoint failed");
    }
    Ok(result?)
}
