//! `walrelay run` as a process: the metrics endpoint, the signal that stops
//! it, and the pipeline, started and stopped in one place.
use std::future::Future;

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
    let signal = tokio::spawn(async move {
        stop.await;
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
