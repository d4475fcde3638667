//! `bank sandbox`: a throwaway PostgreSQL (walrelay's `sql/` and the read
//! model applied) and librdkafka's mock Kafka cluster (topic `events`), both
//! in this process's keeping until it is stopped, so that walrelay and the
//! consumer can run, and be killed, as processes of their own.
//!
//! Once both are up it prints the environment for the other commands, as
//! `export` lines, and writes them to `--env-file` (whole, with a rename, so
//! a script can wait for the file to appear).
use std::path::Path;

use rdkafka::mocking::MockCluster;
use walrelay::demo::LocalPostgres;

use super::db;

/// walrelay's schema, applied in name order.
const WALRELAY_SQL: [&str; 4] = [
    include_str!("../../sql/001_events.sql"),
    include_str!("../../sql/002_append_only.sql"),
    include_str!("../../sql/003_publication.sql"),
    include_str!("../../sql/004_role.sql"),
];

/// The sandbox's database.
const DATABASE: &str = "bank";

/// Why the sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// PostgreSQL could not start.
    #[error(transparent)]
    Postgres(#[from] walrelay::demo::DemoError),
    /// Setting it up failed.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The mock cluster could not start.
    #[error("mock Kafka cluster: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The environment file could not be written.
    #[error("--env-file: {0}")]
    EnvFile(#[from] std::io::Error),
}

/// Runs the sandbox until `stop` completes.
pub async fn run(
    partitions: i32,
    metrics_addr: std::net::SocketAddr,
    env_file: Option<&Path>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), SandboxError> {
    let pg = LocalPostgres::start().await?;
    let admin = db::connect(&pg.url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await?;
    let url = pg.url(DATABASE);
    let client = db::connect(&url).await?;
    for sql in WALRELAY_SQL {
        client.batch_execute(sql).await?;
    }
    db::setup(&client).await?;

    let kafka = MockCluster::new(1)?;
    kafka.create_topic("events", partitions, 1)?;
    let brokers = kafka.bootstrap_servers();

    let env = format!(
        "export BANK_POSTGRES_URL='{url}'\n\
         export BANK_KAFKA_BROKERS='{brokers}'\n\
         export BANK_WALRELAY_URL='http://{metrics_addr}'\n\
         export WALRELAY_POSTGRES_URL='{url}'\n\
         export WALRELAY_KAFKA_BROKERS='{brokers}'\n\
         export WALRELAY_METRICS_ADDR='{metrics_addr}'\n"
    );
    if let Some(path) = env_file {
        let partial = path.with_extension("partial");
        std::fs::write(&partial, &env)?;
        std::fs::rename(&partial, path)?;
    }
    print!("{env}");
    eprintln!(
        "bank sandbox: PostgreSQL at {url} (database {DATABASE}), mock Kafka at {brokers} \
         (topic events, {partitions} partitions). Ctrl-C stops both and removes their data."
    );
    stop.await;
    if let Some(path) = env_file {
        let _ = std::fs::remove_file(path);
    }
    drop(kafka);
    pg.stop().await;
    Ok(())
}
