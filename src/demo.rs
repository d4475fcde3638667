//! `walrelay demo`: the whole thing on one machine, for a first look.
//!
//! It starts a throwaway PostgreSQL from the local server binaries (initdb
//! in a temporary directory, `wal_level=logical`, a free port on 127.0.0.1),
//! applies `sql/`, starts librdkafka's in-process mock Kafka cluster, and runs
//! the same pipeline as `walrelay run` between them. A writer appends sample
//! events for a few orders (and now and then a transaction that rolls back);
//! a consumer prints what reaches the topic, in the `tail` format. Ctrl-C
//! stops everything and removes the temporary files.
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::config::RunConfig;
use crate::event::{Event, LSN_HEADER};
use crate::pg::lsn::Lsn;
use crate::pg::params::ConnectParams;

/// The schema files, applied in this order.
const SCHEMA: [(&str, &str); 4] = [
    ("001_events.sql", include_str!("../sql/001_events.sql")),
    (
        "002_append_only.sql",
        include_str!("../sql/002_append_only.sql"),
    ),
    (
        "003_publication.sql",
        include_str!("../sql/003_publication.sql"),
    ),
    ("004_role.sql", include_str!("../sql/004_role.sql")),
];
/// The user PostgreSQL runs as when walrelay runs as root (it refuses root).
const NOBODY: u32 = 65534;
/// The demo database.
const DATABASE: &str = "demo";

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No PostgreSQL server binaries.
    #[error(
        "PostgreSQL server binaries not found (looked for initdb in $WALRELAY_PG_BIN, \
         /usr/lib/postgresql/*/bin and on PATH). Install them: Debian/Ubuntu \
         `apt-get install postgresql`, Fedora `dnf install postgresql-server`, macOS \
         `brew install postgresql@17`; or set WALRELAY_PG_BIN to the directory holding initdb"
    )]
    NoPostgres,
    /// A step of setting up PostgreSQL failed.
    #[error("{step}: {message}")]
    Postgres {
        /// What was being done.
        step: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The mock cluster could not start.
    #[error("cannot start the mock Kafka cluster: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The relay stopped with an error.
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    /// Local I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn pg_error(step: &'static str, message: impl std::fmt::Display) -> DemoError {
    DemoError::Postgres {
        step,
        message: message.to_string(),
    }
}

/// Finds the directory of PostgreSQL's server binaries.
fn find_bin_dir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("WALRELAY_PG_BIN").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_initdb(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| has_initdb(d))
}

/// A throwaway PostgreSQL cluster (trust authentication, `wal_level=logical`,
/// 127.0.0.1 on a free port); stopped and removed on drop. The bank example's
/// `sandbox` uses it too.
pub struct LocalPostgres {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl LocalPostgres {
    /// initdb in a temporary directory (as `nobody` when run as root), then
    /// start the server and wait until it accepts connections.
    pub async fn start() -> Result<Self, DemoError> {
        let bin = find_bin_dir().ok_or(DemoError::NoPostgres)?;
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let dir = tempfile::Builder::new()
            .prefix("walrelay-demo-")
            .tempdir()?;
        let data = dir.path().join("data");
        if root {
            // PostgreSQL refuses to run as root: hand the directory to nobody.
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))?;
        }
        let command = |program: &str| {
            let mut c = tokio::process::Command::new(bin.join(program));
            c.current_dir(dir.path()).stdin(Stdio::null());
            if root {
                c.uid(NOBODY).gid(NOBODY);
            }
            c
        };
        let out = command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data)
            .output()
            .await?;
        if !out.status.success() {
            return Err(pg_error("initdb", String::from_utf8_lossy(&out.stderr)));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "wal_level=logical",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let mut pg = LocalPostgres { child, port, dir };
        pg.wait_ready().await?;
        Ok(pg)
    }

    /// The URL of `database` as the superuser `postgres` (no password).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    async fn client(
        &self,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn wait_ready(&mut self) -> Result<(), DemoError> {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.path().join("postgres.log"))
                    .unwrap_or_default();
                return Err(pg_error("postgres exited", format!("{status}\n{log}")));
            }
            if self.client("postgres").await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(pg_error(
            "postgres",
            "did not accept connections within 30 s",
        ))
    }

    /// Stops the server (fast shutdown) and removes its files.
    pub async fn stop(mut self) {
        // SIGINT is PostgreSQL's fast shutdown; the temporary directory goes with `self`.
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Runs the demo until `stop` completes.
pub async fn run(
    metrics_addr: std::net::SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    mut out: impl Write + Send + 'static,
) -> Result<(), DemoError> {
    let pg = LocalPostgres::start().await?;
    let admin = pg
        .client("postgres")
        .await
        .map_err(|e| pg_error("connect", e))?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await
        .map_err(|e| pg_error("create database", e))?;
    let client = pg
        .client(DATABASE)
        .await
        .map_err(|e| pg_error("connect", e))?;
    for (name, sql) in SCHEMA {
        client
            .batch_execute(sql)
            .await
            .map_err(|e| pg_error("apply sql", format!("{name}: {e}")))?;
    }

    let kafka = MockCluster::new(1)?;
    kafka.create_topic("events", 3, 1)?;
    let brokers = kafka.bootstrap_servers();
    let config = RunConfig {
        postgres: ConnectParams::from_url_with_env(&pg.url(DATABASE), |_| None)
            .map_err(|e| pg_error("url", e))?,
        slot: crate::config::DEFAULT_SLOT.into(),
        publication: crate::config::DEFAULT_PUBLICATION.into(),
        table: crate::config::DEFAULT_TABLE
            .parse()
            .map_err(|e| pg_error("table", e))?,
        create_slot: true,
        kafka_brokers: brokers.clone(),
        kafka_properties: crate::kafka_properties::KafkaProperties::default(),
        mapping: crate::event::Mapping::new(
            crate::event::Columns::default(),
            crate::config::DEFAULT_TOPIC
                .parse()
                .map_err(|e| pg_error("topic", e))?,
        ),
        metrics_addr,
        shutdown_timeout: Duration::from_secs(5),
        heartbeat_interval: None,
        snapshot: crate::config::SnapshotMode::Initial,
        dead_letter_topic: None,
        on_unexpected_change: crate::config::OnUnexpectedChange::Halt,
        take_over_stale_slot: false,
        stale_slot_grace: crate::config::DEFAULT_STALE_SLOT_GRACE,
        expected_max_downtime: None,
        failover_slot: crate::config::FailoverSlot::Auto,
        standby: None,
        new_slot_on_timeline: None,
        // A demo that cannot go on says so and ends.
        exit_on_halt: true,
    };
    eprintln!(
        "walrelay demo\n  PostgreSQL  {} (database {DATABASE}, table events; psql -h 127.0.0.1 -p {} -U postgres {DATABASE})\n  Kafka       mock cluster at {brokers}, topic events\n  metrics     http://{metrics_addr}/metrics\n  Ctrl-C stops the demo.\n",
        pg.url(DATABASE),
        pg.port
    );

    let done = CancellationToken::new();
    let writer = tokio::spawn(write_samples(client, done.clone()));
    let consumer_done = done.clone();
    let consumer =
        tokio::task::spawn_blocking(move || print_published(&brokers, &mut out, &consumer_done));
    let result = crate::service::run(config, stop).await;
    done.cancel();
    let _ = writer.await;
    let _ = consumer.await;
    drop(kafka);
    pg.stop().await;
    Ok(result?)
}

/// Appends sample events until `done`: a few orders, each through its life.
async fn write_samples(client: tokio_postgres::Client, done: CancellationToken) {
    const LIFE: [&str; 4] = ["OrderPlaced", "ItemAdded", "OrderPaid", "OrderShipped"];
    let mut next: Vec<i64> = vec![1; 4];
    let mut round = 0u64;
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(700)) => {}
        }
        round += 1;
        let order = usize::try_from(round % 4).unwrap_or(0);
        let seq = next[order];
        let kind = LIFE[usize::try_from((seq - 1) % 4).unwrap_or(0)];
        // Every seventh round rolls back: it must never be published.
        let rollback = round % 7 == 0;
        let sql = format!(
            "BEGIN; INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             VALUES ('order-{order}', {seq}, '{kind}', jsonb_build_object('round', {round})); {}",
            if rollback { "ROLLBACK;" } else { "COMMIT;" }
        );
        if let Err(e) = client.batch_execute(&sql).await {
            tracing::warn!(error = %e, "demo writer stopped");
            return;
        }
        if rollback {
            tracing::info!(aggregate = %format!("order-{order}"), seq_nr = seq, "wrote a transaction and rolled it back: it is not published");
        } else {
            next[order] += 1;
        }
    }
}

/// Prints every record of topic `events` in the `tail` format until `done`.
fn print_published(brokers: &str, out: &mut impl Write, done: &CancellationToken) {
    let consumer: BaseConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "walrelay-demo")
        .set("auto.offset.reset", "earliest")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "demo consumer failed");
            return;
        }
    };
    if let Err(e) = consumer.subscribe(&["events"]) {
        tracing::warn!(error = %e, "demo consumer failed");
        return;
    }
    while !done.is_cancelled() {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let headers: Vec<(Arc<str>, Bytes)> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            Arc::from(h.key),
                            Bytes::copy_from_slice(h.value.unwrap_or_default()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let commit_lsn = headers
            .iter()
            .find(|(k, _)| &**k == LSN_HEADER)
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(Lsn::ZERO);
        let event = Event {
            topic: message.topic().to_owned(),
            key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
            seq: None,
            value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            // The demo's table has a jsonb payload.
            value_kind: crate::event::ValueKind::Json,
            headers,
            commit_lsn,
            invalid_trace_context: None,
        };
        if crate::tail::write_event(out, &event)
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}
