//! Configuration: command-line flags, each also settable as `WALRELAY_<NAME>`,
//! checked before anything connects.
//!
//! Every problem is reported naming the setting, and exits with code 2.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::event::{TableName, TopicTemplate};
use crate::pg::params::{ConnectParams, ParamsError};
use crate::sink::{SinkConfigError, parse_properties};
use crate::snapshot::SnapshotMode;
use crate::tail::TailOptions;

/// The default publication.
pub const DEFAULT_PUBLICATION: &str = "walrelay_events";
/// The default events table.
pub const DEFAULT_TABLE: &str = "public.events";
/// The default topic.
pub const DEFAULT_TOPIC: &str = "events";
/// The default replication slot.
pub const DEFAULT_SLOT: &str = "walrelay";
/// The metrics endpoint's port unless `--metrics-addr` names another.
pub const DEFAULT_METRICS_PORT: u16 = 9187;

/// The default metrics address: the loopback interface only, so that nothing
/// is exposed unless asked for (`--metrics-addr 0.0.0.0:9187`).
pub fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_METRICS_PORT))
}
/// How long the slot's holder may be silent before a standby calls it stale.
pub const DEFAULT_STALE_SLOT_GRACE: Duration = Duration::from_secs(60);
/// How long a shutdown waits for outstanding acknowledgements by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// walrelay publishes the events a PostgreSQL table receives to Kafka, straight
/// from the write-ahead log.
#[derive(Debug, Parser)]
#[command(name = "walrelay", version, about, long_about = None)]
pub struct Cli {
    /// Log line format on standard error.
    #[arg(long, global = true, env = "WALRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print each committed insert of the events table as one JSON line, from a
    /// temporary slot (the service's slot is not touched).
    Tail(TailArgs),
    /// Stream the events table to Kafka from the service's own slot.
    Run(RunArgs),
    /// Verify the setup without streaming: list every problem with its fix
    /// (exit 0 when clean, 2 otherwise). Takes the flags of `run`.
    Check(RunArgs),
    /// Run everything locally for a first look: a throwaway PostgreSQL, an
    /// in-process Kafka mock, sample events, and what walrelay publishes.
    Demo(DemoArgs),
}

/// Flags of `walrelay demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Address of the demo's /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "WALRELAY_METRICS_ADDR", default_value_t = default_metrics_addr().to_string())]
    pub metrics_addr: String,
}

impl DemoArgs {
    /// The metrics address.
    pub fn validate(&self) -> Result<SocketAddr, ConfigError> {
        self.metrics_addr.parse().map_err(|_| {
            invalid(
                "metrics-addr",
                format!(
                    "{:?} is not an address like {}",
                    self.metrics_addr,
                    default_metrics_addr()
                ),
            )
        })
    }
}

/// Where the events come from.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// PostgreSQL connection URL (libpq form), e.g.
    /// postgres://walrelay@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem
    #[arg(long, env = "WALRELAY_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: String,
    /// A file holding the PostgreSQL password (overrides the URL's and PGPASSWORD).
    #[arg(long, env = "WALRELAY_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,
    /// The publication that covers the events table.
    #[arg(long, env = "WALRELAY_PUBLICATION", default_value = DEFAULT_PUBLICATION)]
    pub publication: String,
    /// The events table, schema.table.
    #[arg(long, env = "WALRELAY_TABLE", default_value = DEFAULT_TABLE)]
    pub table: String,
}

/// Flags of `walrelay tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Where the events come from.
    #[command(flatten)]
    pub source: SourceArgs,
    /// The topic shown with each event; may name columns: events.{event_type}.
    #[arg(long, env = "WALRELAY_TOPIC", default_value = DEFAULT_TOPIC)]
    pub topic: String,
}

/// Flags of `walrelay run`. Each is optional here so that the configuration
/// file can supply it; flags and environment win over the file.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// A TOML file with any of the settings below (keys as the flags, with
    /// underscores: postgres_url = "...", kafka_properties = { "linger.ms" = "10" }).
    #[arg(long, env = "WALRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL connection URL (libpq form).
    #[arg(long, env = "WALRELAY_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// A file holding the PostgreSQL password.
    #[arg(long, env = "WALRELAY_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,
    /// The replication slot [default: walrelay].
    #[arg(long, env = "WALRELAY_SLOT")]
    pub slot: Option<String>,
    /// The publication that covers the events table [default: walrelay_events].
    #[arg(long, env = "WALRELAY_PUBLICATION")]
    pub publication: Option<String>,
    /// The events table, schema.table [default: public.events].
    #[arg(long, env = "WALRELAY_TABLE")]
    pub table: Option<String>,
    /// Create the slot when it is missing [default: true].
    #[arg(long, env = "WALRELAY_CREATE_SLOT", num_args = 0..=1, default_missing_value = "true")]
    pub create_slot: Option<bool>,
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "WALRELAY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// The topic; may name columns: events.{event_type} [default: events].
    #[arg(long, env = "WALRELAY_TOPIC")]
    pub topic: Option<String>,
    /// A librdkafka producer property, key=value (repeatable; in the
    /// environment separated by ';').
    #[arg(
        long = "kafka-property",
        env = "WALRELAY_KAFKA_PROPERTY",
        value_delimiter = ';'
    )]
    pub kafka_property: Vec<String>,
    /// Address of the /metrics, /healthz and /readyz endpoint; 0.0.0.0:9187
    /// listens on every interface [default: 127.0.0.1:9187].
    #[arg(long, env = "WALRELAY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// How long SIGTERM waits for outstanding acknowledgements [default: 30s].
    #[arg(long, env = "WALRELAY_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Write a heartbeat into the WAL this often (`30s`); off by default.
    #[arg(long, env = "WALRELAY_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// When walrelay creates the slot: publish the rows already in the table
    /// first (initial), or only what commits later (never) [default: initial].
    #[arg(long, env = "WALRELAY_SNAPSHOT", value_enum)]
    pub snapshot: Option<SnapshotMode>,
    /// A row that cannot be published (refused by the broker, not JSON, no
    /// key): stop (halt), or describe it on --dead-letter-topic and go on
    /// (dead-letter) [default: halt].
    #[arg(long, env = "WALRELAY_ON_POISON", value_enum)]
    pub on_poison: Option<OnPoison>,
    /// The topic for --on-poison dead-letter.
    #[arg(long, env = "WALRELAY_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// An UPDATE, DELETE or TRUNCATE on the events table: stop (halt) or log,
    /// count and go on (skip) [default: halt].
    #[arg(long, env = "WALRELAY_ON_UNEXPECTED_CHANGE", value_enum)]
    pub on_unexpected_change: Option<OnUnexpectedChange>,
    /// While standing by, terminate the process holding the slot once it has
    /// not replied for --stale-slot-grace [default: false].
    #[arg(long, env = "WALRELAY_TAKE_OVER_STALE_SLOT", num_args = 0..=1, default_missing_value = "true")]
    pub take_over_stale_slot: Option<bool>,
    /// How long the slot's holder may be silent before it is reported as
    /// stale (and, with --take-over-stale-slot, terminated) [default: 60s].
    #[arg(long, env = "WALRELAY_STALE_SLOT_GRACE")]
    pub stale_slot_grace: Option<String>,
}

/// What to do with a row that cannot be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPoison {
    /// Stop without confirming past it.
    Halt,
    /// Publish a record describing it to the dead-letter topic and go on.
    DeadLetter,
}

/// What to do with an UPDATE, DELETE or TRUNCATE of the events table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnexpectedChange {
    /// Stop without confirming past it.
    Halt,
    /// Log it, count it and go on.
    Skip,
}

/// The configuration file: the flags of `run`, as TOML keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    postgres_url: Option<String>,
    postgres_password_file: Option<PathBuf>,
    slot: Option<String>,
    publication: Option<String>,
    table: Option<String>,
    create_slot: Option<bool>,
    kafka_brokers: Option<String>,
    topic: Option<String>,
    kafka_properties: Option<BTreeMap<String, String>>,
    metrics_addr: Option<String>,
    shutdown_timeout: Option<String>,
    heartbeat_interval: Option<String>,
    snapshot: Option<SnapshotMode>,
    on_poison: Option<OnPoison>,
    dead_letter_topic: Option<String>,
    on_unexpected_change: Option<OnUnexpectedChange>,
    take_over_stale_slot: Option<bool>,
    stale_slot_grace: Option<String>,
}

impl FileConfig {
    fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        toml::from_str(&text).map_err(|e| error(e.message().to_owned()))
    }
}

/// Parses a duration setting (`30s`, `2m`) of at least `min`.
fn parse_duration(
    setting: &'static str,
    text: &str,
    min: Duration,
) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(text) {
        Ok(d) if d >= min => Ok(d),
        _ => Err(invalid(
            setting,
            format!("{text:?}: expected a duration of at least {min:?}, like 30s or 2m"),
        )),
    }
}

/// The dead-letter topic `--on-poison` and `--dead-letter-topic` call for.
fn dead_letter_topic(
    on_poison: OnPoison,
    topic: Option<String>,
) -> Result<Option<String>, ConfigError> {
    match (on_poison, topic) {
        (OnPoison::Halt, None) => Ok(None),
        (OnPoison::Halt, Some(_)) => Err(invalid(
            "dead-letter-topic",
            "is only used with --on-poison dead-letter".into(),
        )),
        (OnPoison::DeadLetter, None) => Err(invalid(
            "on-poison",
            "dead-letter needs --dead-letter-topic".into(),
        )),
        (OnPoison::DeadLetter, Some(t)) => t
            .parse::<TopicTemplate>()
            .ok()
            .and_then(|parsed| parsed.fixed().map(str::to_owned))
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    "dead-letter-topic",
                    format!("{t:?} is not a valid Kafka topic name"),
                )
            }),
    }
}

/// A validated configuration of `walrelay run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The server.
    pub postgres: ConnectParams,
    /// The replication slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// The events table.
    pub table: TableName,
    /// Whether to create a missing slot.
    pub create_slot: bool,
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// librdkafka properties given by the user.
    pub kafka_properties: BTreeMap<String, String>,
    /// The topic template.
    pub topic: TopicTemplate,
    /// The metrics endpoint's address.
    pub metrics_addr: SocketAddr,
    /// How long a shutdown waits for acknowledgements.
    pub shutdown_timeout: Duration,
    /// How often to write a heartbeat into the WAL, if at all.
    pub heartbeat_interval: Option<Duration>,
    /// Whether a new slot starts with the table's existing rows.
    pub snapshot: SnapshotMode,
    /// Where rows that cannot be published go (`--on-poison dead-letter`);
    /// `None`: they stop walrelay.
    pub dead_letter_topic: Option<String>,
    /// What an UPDATE, DELETE or TRUNCATE of the events table does.
    pub on_unexpected_change: OnUnexpectedChange,
    /// Whether a standby terminates a slot holder silent for `stale_slot_grace`.
    pub take_over_stale_slot: bool,
    /// How long a slot holder may be silent before it counts as stale.
    pub stale_slot_grace: Duration,
}

impl RunArgs {
    /// Merges flags, environment and the configuration file, and checks every
    /// setting; nothing connects before this succeeds.
    #[allow(clippy::too_many_lines)] // One flat merge of every setting reads best.
    pub fn validate(self) -> Result<RunConfig, ConfigError> {
        let file = self
            .config
            .as_deref()
            .map(FileConfig::load)
            .transpose()?
            .unwrap_or_default();
        let source = SourceArgs {
            postgres_url: self
                .postgres_url
                .or(file.postgres_url)
                .ok_or_else(|| invalid("postgres-url", "is required".into()))?,
            postgres_password_file: self.postgres_password_file.or(file.postgres_password_file),
            publication: self
                .publication
                .or(file.publication)
                .unwrap_or_else(|| DEFAULT_PUBLICATION.to_owned()),
            table: self
                .table
                .or(file.table)
                .unwrap_or_else(|| DEFAULT_TABLE.to_owned()),
        };
        let slot = self
            .slot
            .or(file.slot)
            .unwrap_or_else(|| DEFAULT_SLOT.to_owned());
        if !crate::slot::valid_name(&slot) {
            return Err(invalid(
                "slot",
                format!(
                    "{slot:?} is not a valid slot name: use lower-case letters, digits and _ (at most 63)"
                ),
            ));
        }
        let kafka_brokers = self
            .kafka_brokers
            .or(file.kafka_brokers)
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| invalid("kafka-brokers", "is required".into()))?;
        let mut kafka_properties = match file.kafka_properties {
            Some(map) => parse_properties(
                &map.into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>(),
            )?,
            None => BTreeMap::new(),
        };
        kafka_properties.extend(parse_properties(&self.kafka_property)?);
        let topic = self
            .topic
            .or(file.topic)
            .unwrap_or_else(|| DEFAULT_TOPIC.to_owned());
        let metrics_addr = self.metrics_addr.or(file.metrics_addr);
        let shutdown_timeout = match self.shutdown_timeout.or(file.shutdown_timeout) {
            Some(text) => parse_duration("shutdown-timeout", &text, Duration::ZERO)?,
            None => DEFAULT_SHUTDOWN_TIMEOUT,
        };
        let heartbeat_interval = self
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .map(|text| parse_duration("heartbeat-interval", &text, Duration::from_secs(1)))
            .transpose()?;
        let dead_letter_topic = dead_letter_topic(
            self.on_poison.or(file.on_poison).unwrap_or(OnPoison::Halt),
            self.dead_letter_topic.or(file.dead_letter_topic),
        )?;
        let stale_slot_grace = match self.stale_slot_grace.or(file.stale_slot_grace) {
            // Longer than the 10 s between a healthy holder's status updates.
            Some(text) => parse_duration("stale-slot-grace", &text, Duration::from_secs(15))?,
            None => DEFAULT_STALE_SLOT_GRACE,
        };
        Ok(RunConfig {
            take_over_stale_slot: self
                .take_over_stale_slot
                .or(file.take_over_stale_slot)
                .unwrap_or(false),
            stale_slot_grace,
            dead_letter_topic,
            on_unexpected_change: self
                .on_unexpected_change
                .or(file.on_unexpected_change)
                .unwrap_or(OnUnexpectedChange::Halt),
            heartbeat_interval,
            snapshot: self
                .snapshot
                .or(file.snapshot)
                .unwrap_or(SnapshotMode::Initial),
            postgres: source.connect_params()?,
            publication: source.publication()?,
            table: source.table()?,
            slot,
            create_slot: self.create_slot.or(file.create_slot).unwrap_or(true),
            // The same check librdkafka would make later, now, with the flag's name.
            kafka_properties: {
                crate::sink::producer_config(&kafka_brokers, &kafka_properties)?;
                kafka_properties
            },
            kafka_brokers,
            topic: topic
                .parse()
                .map_err(|e: crate::event::TopicTemplateError| invalid("topic", e.to_string()))?,
            metrics_addr: match metrics_addr {
                None => default_metrics_addr(),
                Some(text) => text.parse().map_err(|_| {
                    invalid(
                        "metrics-addr",
                        format!("{text:?} is not an address like 0.0.0.0:9187"),
                    )
                })?,
            },
            shutdown_timeout,
        })
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The connection URL.
    #[error("--postgres-url: {0}")]
    PostgresUrl(#[from] ParamsError),
    /// The password file.
    #[error("--postgres-password-file: cannot read {path}: {source}")]
    PasswordFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file.
    #[error("--config {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A producer property.
    #[error(transparent)]
    Kafka(#[from] SinkConfigError),
    /// Another setting.
    #[error("--{setting}: {message}")]
    Invalid {
        /// The flag, without dashes.
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl SourceArgs {
    /// The connection parameters, with the password file applied.
    pub fn connect_params(&self) -> Result<ConnectParams, ConfigError> {
        let mut params = ConnectParams::from_url(&self.postgres_url)?;
        if let Some(path) = &self.postgres_password_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                    path: path.display().to_string(),
                    source,
                })?;
            params.set_password(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        Ok(params)
    }

    /// The events table.
    pub fn table(&self) -> Result<TableName, ConfigError> {
        self.table
            .parse()
            .map_err(|e: crate::event::TableNameError| invalid("table", e.to_string()))
    }

    /// The publication name.
    pub fn publication(&self) -> Result<String, ConfigError> {
        if self.publication.is_empty() {
            return Err(invalid("publication", "must not be empty".into()));
        }
        Ok(self.publication.clone())
    }
}

fn invalid(setting: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { setting, message }
}

impl TailArgs {
    /// Checks every setting; nothing connects before this succeeds.
    pub fn validate(&self) -> Result<TailOptions, ConfigError> {
        Ok(TailOptions {
            postgres: self.source.connect_params()?,
            publication: self.source.publication()?,
            table: self.source.table()?,
            topic: self
                .topic
                .parse::<TopicTemplate>()
                .map_err(|e| invalid("topic", e.to_string()))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(args: &[&str]) -> Result<TailOptions, String> {
        let mut argv = vec!["walrelay", "tail"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Tail(tail) = cli.command else {
            unreachable!("parsed as tail")
        };
        tail.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_design() {
        let o = tail(&["--postgres-url", "postgres://u@h/d"]).unwrap();
        assert_eq!(o.publication, "walrelay_events");
        assert_eq!(o.table.to_string(), "public.events");
        assert_eq!(o.topic.to_string(), "events");
    }

    #[test]
    fn each_bad_setting_is_named() {
        let cases: [(&[&str], &str); 4] = [
            (&["--postgres-url", "http://h"], "--postgres-url"),
            (
                &["--postgres-url", "postgres://u@h/d", "--table", "a.b.c"],
                "--table",
            ),
            (
                &["--postgres-url", "postgres://u@h/d", "--topic", "bad topic"],
                "--topic",
            ),
            (
                &[
                    "--postgres-url",
                    "postgres://u@h/d",
                    "--postgres-password-file",
                    "/nonexistent/pw",
                ],
                "--postgres-password-file",
            ),
        ];
        for (args, needle) in cases {
            let err = tail(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    fn run(args: &[&str]) -> Result<RunConfig, String> {
        let mut argv = vec!["walrelay", "run"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            unreachable!("parsed as run")
        };
        run.validate().map_err(|e| e.to_string())
    }

    const MINIMAL: [&str; 4] = [
        "--postgres-url",
        "postgres://u@h/d",
        "--kafka-brokers",
        "k:9092",
    ];

    #[test]
    fn run_defaults_follow_the_design() {
        let c = run(&MINIMAL).unwrap();
        assert_eq!(c.slot, "walrelay");
        assert_eq!(c.publication, "walrelay_events");
        assert_eq!(c.table.to_string(), "public.events");
        assert_eq!(c.topic.to_string(), "events");
        assert!(c.create_slot);
        // Loopback only unless told otherwise.
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9187");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert!(c.kafka_properties.is_empty());
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            r#"
postgres_url = "postgres://file@h/d"
kafka_brokers = "file:9092"
slot = "from_file"
create_slot = false
shutdown_timeout = "45s"
[kafka_properties]
"linger.ms" = "20"
"compression.type" = "zstd"
"#,
        )
        .unwrap();
        let c = run(&[
            "--config",
            path.to_str().unwrap(),
            "--kafka-brokers",
            "flag:9092",
            "--kafka-property",
            "linger.ms=1",
        ])
        .unwrap();
        assert_eq!(c.postgres.user, "file");
        assert_eq!(c.kafka_brokers, "flag:9092");
        assert_eq!(c.slot, "from_file");
        assert!(!c.create_slot);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(45));
        assert_eq!(c.kafka_properties["linger.ms"], "1");
        assert_eq!(c.kafka_properties["compression.type"], "zstd");
        let c = run(&["--config", path.to_str().unwrap(), "--create-slot"]).unwrap();
        assert!(c.create_slot);
    }

    #[test]
    fn run_settings_that_break_guarantees_or_make_no_sense_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let unknown = dir.path().join("unknown.toml");
        std::fs::write(
            &unknown,
            "postgres_url = \"postgres://u@h/d\"\nbrokers = \"x\"\n",
        )
        .unwrap();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["--postgres-url", "postgres://u@h/d"],
                "--kafka-brokers",
            ),
            (vec!["--kafka-brokers", "k:9092"], "--postgres-url"),
            (
                [&MINIMAL[..], &["--kafka-property", "acks=1"]].concat(),
                "acks",
            ),
            (
                [
                    &MINIMAL[..],
                    &["--kafka-property", "enable.idempotence=false"],
                ]
                .concat(),
                "idempotence",
            ),
            (
                [&MINIMAL[..], &["--kafka-property", "nonsense"]].concat(),
                "key=value",
            ),
            (
                [
                    &MINIMAL[..],
                    &["--kafka-property", "bootstrap.servers=other:1"],
                ]
                .concat(),
                "bootstrap.servers",
            ),
            ([&MINIMAL[..], &["--slot", "Bad-Slot"]].concat(), "--slot"),
            (
                [&MINIMAL[..], &["--metrics-addr", "nowhere"]].concat(),
                "--metrics-addr",
            ),
            (
                [&MINIMAL[..], &["--shutdown-timeout", "soon"]].concat(),
                "--shutdown-timeout",
            ),
            (
                vec![
                    "--config",
                    unknown.to_str().unwrap(),
                    "--kafka-brokers",
                    "k:1",
                ],
                "brokers",
            ),
            (vec!["--config", "/nonexistent/walrelay.toml"], "--config"),
            (
                [&MINIMAL[..], &["--on-poison", "dead-letter"]].concat(),
                "--dead-letter-topic",
            ),
            (
                [&MINIMAL[..], &["--dead-letter-topic", "dlq"]].concat(),
                "--on-poison dead-letter",
            ),
            (
                [
                    &MINIMAL[..],
                    &["--on-poison", "dead-letter", "--dead-letter-topic", "d{x}"],
                ]
                .concat(),
                "--dead-letter-topic",
            ),
            (
                [&MINIMAL[..], &["--on-unexpected-change", "ignore"]].concat(),
                "on-unexpected-change",
            ),
        ];
        for (args, needle) in cases {
            let err = run(&args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        // acks=-1 is acks=all.
        assert!(run(&[&MINIMAL[..], &["--kafka-property", "acks=-1"]].concat()).is_ok());
    }

    #[test]
    fn the_password_file_wins_and_loses_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "from-file\n").unwrap();
        let o = tail(&[
            "--postgres-url",
            "postgres://u:from-url@h/d",
            "--postgres-password-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(o.postgres.password(), Some("from-file"));
    }
}
