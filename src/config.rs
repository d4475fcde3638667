//! Configuration: command-line flags, each also settable as `WALRELAY_<NAME>`,
//! checked before anything connects.
//!
//! Every problem is reported naming the setting, and exits with code 2.
//!
//! Secrets (the URL's password, the password file's content, Kafka
//! properties such as `sasl.password`) are kept in types whose `Debug` hides
//! them, are never quoted by an error, and are not shown by `--help` when they
//! come from the environment. A file holding one must be readable by its
//! owner only, as libpq requires of `~/.pgpass`.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::event::{
    CloudEvents, Columns, Mapping, NO_SEQ_COLUMN, PayloadFormat, RESERVED_HEADERS, TableName,
    TopicPattern, TopicTemplate,
};
use crate::kafka_properties::{self, KafkaProperties, Origin, PropertyArg, PropertyError};
use crate::pg::params::{ConnectParams, ParamsError};
use crate::sink::SinkConfigError;
use crate::tail::TailOptions;

/// The default publication.
pub const DEFAULT_PUBLICATION: &str = "walrelay_events";
/// The default events table.
pub const DEFAULT_TABLE: &str = "public.events";
/// The default topic.
pub const DEFAULT_TOPIC: &str = "events";
/// The default replication slot.
pub const DEFAULT_SLOT: &str = "walrelay";
/// The metrics endpoint's port unless `--metrics-addr` names another: one
/// marked free in the Prometheus wiki's list of exporter ports (9187, used
/// before, is postgres_exporter's, which often runs on the same host).
pub const DEFAULT_METRICS_PORT: u16 = 9643;

/// The default metrics address: the loopback interface only, so that nothing
/// is exposed unless asked for (`--metrics-addr 0.0.0.0:9643`).
pub fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_METRICS_PORT))
}
/// How long the slot's holder may be silent before a standby calls it stale.
pub const DEFAULT_STALE_SLOT_GRACE: Duration = Duration::from_secs(60);
/// How long a shutdown waits for outstanding acknowledgements by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest `--request-timeout`: below it, a loaded but healthy server
/// would see its answers abandoned.
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Probe a running walrelay's endpoint (a container HEALTHCHECK): exit 0
    /// when it answers 200, 1 otherwise.
    Healthcheck(HealthcheckArgs),
}

/// Flags of `walrelay healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The address walrelay serves its endpoint on (`--metrics-addr` of
    /// `run`); a wildcard address (0.0.0.0) is probed on 127.0.0.1.
    #[arg(long, env = "WALRELAY_METRICS_ADDR", default_value_t = default_metrics_addr().to_string())]
    pub metrics_addr: String,
    /// Which endpoint: healthz (liveness), readyz (readiness) or active.
    #[arg(long, value_enum, default_value_t = crate::healthcheck::Probe::Healthz)]
    pub probe: crate::healthcheck::Probe,
    /// How long connecting, asking and reading the answer may take together.
    #[arg(long, default_value = "3s")]
    pub timeout: String,
}

impl HealthcheckArgs {
    /// The address and the timeout.
    pub fn validate(&self) -> Result<(SocketAddr, Duration), ConfigError> {
        let addr = metrics_addr(&self.metrics_addr)?;
        let timeout = parse_duration("timeout", &self.timeout, Duration::from_millis(1))?;
        Ok((addr, timeout))
    }
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
        metrics_addr(&self.metrics_addr)
    }
}

/// `--metrics-addr`, parsed.
fn metrics_addr(text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            "metrics-addr",
            format!("{text:?} is not an address like {}", default_metrics_addr()),
        )
    })
}

/// A PostgreSQL URL as given. Its `Debug` shows it with the password hidden.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct PostgresUrl(String);

impl From<String> for PostgresUrl {
    fn from(text: String) -> Self {
        PostgresUrl(text)
    }
}

impl PostgresUrl {
    /// The URL's text, password included: for parsing only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL carries a password (`user:password@` or `?password=`).
    pub fn has_password(&self) -> bool {
        url::Url::parse(&self.0).map_or(true, |url| {
            url.password().is_some() || url.query_pairs().any(|(k, _)| k == "password")
        })
    }

    /// The URL with its password replaced; a text that is not a URL is
    /// hidden whole, since it may hold one anywhere.
    pub fn redacted(&self) -> String {
        let Ok(mut url) = url::Url::parse(&self.0) else {
            return "<not a URL; hidden>".to_owned();
        };
        if url.password().is_some() {
            // Only URLs that cannot have a password refuse one.
            let _ = url.set_password(Some(kafka_properties::REDACTED));
        }
        if url.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        kafka_properties::REDACTED.to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// Where the events come from.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// PostgreSQL connection URL (libpq form), e.g.
    /// postgres://walrelay@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem
    #[arg(long, env = "WALRELAY_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: PostgresUrl,
    /// A file holding the PostgreSQL password (overrides the URL's and
    /// PGPASSWORD); it must be readable by its owner only (chmod 600).
    #[arg(long, env = "WALRELAY_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,
    /// Use a password file (or configuration file holding a secret) that
    /// group or others may read, with a warning, instead of refusing it.
    #[arg(long, env = "WALRELAY_ALLOW_WORLD_READABLE_SECRETS")]
    pub allow_world_readable_secrets: bool,
    /// Answer a server that asks for a cleartext or MD5 password over plain
    /// TCP or TLS whose certificate was not verified, when require_auth in
    /// the URL names that method too (trusted networks only; each such
    /// login is logged as a warning).
    #[arg(long, env = "WALRELAY_ALLOW_PASSWORD_TO_UNVERIFIED_SERVER")]
    pub allow_password_to_unverified_server: bool,
    /// The publication that covers the events table.
    #[arg(long, env = "WALRELAY_PUBLICATION", default_value = DEFAULT_PUBLICATION)]
    pub publication: String,
    /// The events table, schema.table.
    #[arg(long, env = "WALRELAY_TABLE", default_value = DEFAULT_TABLE)]
    pub table: String,
    /// How long a request to PostgreSQL may wait for its answer before the
    /// connection is dropped and made again [default: 30s].
    #[arg(long, env = "WALRELAY_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
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
    /// Which columns make the event.
    #[command(flatten)]
    pub columns: ColumnArgs,
}

/// Which columns of the table make the event: flags of `run`, `check` and
/// `tail`.
#[derive(Debug, Args, Default)]
pub struct ColumnArgs {
    /// The column whose text is the Kafka key [default: aggregate_id].
    #[arg(long, env = "WALRELAY_KEY_COLUMN")]
    pub key_column: Option<String>,
    /// The per-aggregate sequence column: the initial snapshot's order
    /// within an aggregate, and what consumers deduplicate on; none for a
    /// table without one [default: seq_nr].
    #[arg(long, env = "WALRELAY_SEQ_COLUMN")]
    pub seq_column: Option<String>,
    /// The column whose value is the Kafka value [default: payload].
    #[arg(long, env = "WALRELAY_PAYLOAD_COLUMN")]
    pub payload_column: Option<String>,
    /// The column that holds the event's type, which every row must have
    /// (a header, as every other column) [default: none].
    #[arg(long, env = "WALRELAY_TYPE_COLUMN")]
    pub type_column: Option<String>,
    /// How the payload becomes the Kafka value: auto (by its type: bytea as
    /// its bytes, json/jsonb and text as their text), json (checked to be
    /// JSON, else a poison row), bytes (never checked) [default: auto].
    #[arg(long, env = "WALRELAY_PAYLOAD_FORMAT", value_enum)]
    pub payload_format: Option<PayloadFormat>,
    /// COLUMN=HEADER: the header a column becomes, when not its own name
    /// (repeatable; comma-separated in the environment).
    #[arg(
        long = "header-name",
        env = "WALRELAY_HEADER_NAME",
        value_delimiter = ','
    )]
    pub header_name: Vec<String>,
    /// The column whose JSON object may hold a W3C traceparent and
    /// tracestate, copied into headers of those names when valid; if the
    /// table has it [default: metadata].
    #[arg(long, env = "WALRELAY_METADATA_COLUMN")]
    pub metadata_column: Option<String>,
    /// The column that says when the event happened (ce_time under
    /// --format cloudevents); if the table has it [default: recorded_at].
    #[arg(long, env = "WALRELAY_TIME_COLUMN")]
    pub time_column: Option<String>,
}

/// The record format (`--format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The payload as the value, the columns as headers.
    #[default]
    Default,
    /// As default, plus CloudEvents' Kafka binding in binary mode: ce_*
    /// headers and content-type.
    Cloudevents,
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
    pub postgres_url: Option<PostgresUrl>,
    /// A file holding the PostgreSQL password; it must be readable by its
    /// owner only (chmod 600).
    #[arg(long, env = "WALRELAY_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,
    /// How long a request to PostgreSQL may wait for its answer before the
    /// connection is dropped and made again; /readyz says not ready once one
    /// has waited half as long [default: 30s].
    #[arg(long, env = "WALRELAY_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Use a password file or --config file holding a secret that group or
    /// others may read, with a warning, instead of refusing it.
    #[arg(long, env = "WALRELAY_ALLOW_WORLD_READABLE_SECRETS")]
    pub allow_world_readable_secrets: bool,
    /// Answer a server that asks for a cleartext or MD5 password over plain
    /// TCP or TLS whose certificate was not verified (trusted networks only;
    /// each such login is logged as a warning) [default: false].
    #[arg(long, env = "WALRELAY_ALLOW_PASSWORD_TO_UNVERIFIED_SERVER", num_args = 0..=1, default_missing_value = "true")]
    pub allow_password_to_unverified_server: Option<bool>,
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
    /// A template starts with a literal prefix ending in '.', '_' or '-',
    /// unless --allowed-topic names the topics; a column other than the key
    /// column needs --allow-aggregate-across-topics.
    #[arg(long, env = "WALRELAY_TOPIC")]
    pub topic: Option<String>,
    /// A topic the --topic template may resolve to, or a prefix and a star
    /// (orders.*); a row resolving to any other is a poison row
    /// (repeatable; comma-separated in the environment).
    #[arg(
        long = "allowed-topic",
        env = "WALRELAY_ALLOWED_TOPIC",
        value_delimiter = ','
    )]
    pub allowed_topic: Vec<String>,
    /// Which columns make the event.
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// The record format: default, or cloudevents (CloudEvents' Kafka
    /// protocol binding, binary mode) [default: default].
    #[arg(long, env = "WALRELAY_FORMAT", value_enum)]
    pub format: Option<Format>,
    /// With --format cloudevents: the ce_source attribute, a URI-reference
    /// [default: /walrelay/<database>/<schema>.<table>].
    #[arg(long, env = "WALRELAY_CLOUDEVENTS_SOURCE")]
    pub cloudevents_source: Option<String>,
    /// With --format cloudevents: the content-type header, for a value
    /// whose media type walrelay cannot tell (application/protobuf)
    /// [default: by the payload: application/json, text/plain;
    /// charset=utf-8, application/octet-stream].
    #[arg(long, env = "WALRELAY_CLOUDEVENTS_CONTENT_TYPE")]
    pub cloudevents_content_type: Option<String>,
    /// Accept a --topic template naming a column other than the key column,
    /// which can send the events of one aggregate to several topics, where
    /// their order no longer holds [default: false].
    #[arg(long, env = "WALRELAY_ALLOW_AGGREGATE_ACROSS_TOPICS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_aggregate_across_topics: Option<bool>,
    /// A librdkafka producer property, key=value, the value taken as is
    /// (repeatable). In the environment: WALRELAY_KAFKA_PROPERTY, one
    /// key=value per line; flags replace it.
    /// A value `file:PATH` is read from PATH (a secret's file must be
    /// private); `literal:` before a value keeps it as it stands.
    #[arg(long = "kafka-property")]
    pub kafka_property: Vec<PropertyArg>,
    /// A file of librdkafka producer properties in Java properties format
    /// (as Kafka's client.properties); --kafka-property wins over it. Must
    /// be private (chmod 600) when it holds a secret.
    #[arg(long, env = "WALRELAY_KAFKA_PROPERTIES_FILE")]
    pub kafka_properties_file: Option<PathBuf>,
    /// Allow a --kafka-property that loads code into walrelay or runs a
    /// command (plugin.library.paths, sasl.kerberos.kinit.cmd,
    /// ssl.engine.location, ssl.providers), by name (repeatable).
    #[arg(
        long = "allow-unsafe-kafka-property",
        env = "WALRELAY_ALLOW_UNSAFE_KAFKA_PROPERTY",
        value_delimiter = ','
    )]
    pub allow_unsafe_kafka_property: Vec<String>,
    /// Address of the /metrics, /healthz and /readyz endpoint; 0.0.0.0:9643
    /// listens on every interface [default: 127.0.0.1:9643].
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
    /// A row that cannot be published (refused by the broker, a NULL key or
    /// payload, a topic not allowed or missing, not JSON under
    /// --payload-format json): stop (halt), or describe it on
    /// --dead-letter-topic and go on (dead-letter) [default: halt].
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
    /// For `check`: the longest time every walrelay may be down at once.
    /// PostgreSQL 18's idle_replication_slot_timeout must be at least this
    /// long, or such an outage invalidates the slot.
    #[arg(long, env = "WALRELAY_EXPECTED_MAX_DOWNTIME")]
    pub expected_max_downtime: Option<String>,
    /// Make the slot a failover slot, which standbys synchronize so that it
    /// survives a promotion (PostgreSQL 17+): create it so and alter an
    /// existing one, where the server supports it (auto); also refuse to run
    /// on an older server or with a broken failover chain (require); or
    /// leave the slot as it is (off) [default: auto].
    #[arg(long, env = "WALRELAY_FAILOVER_SLOT", value_enum)]
    pub failover_slot: Option<FailoverSlot>,
    /// A standby's URL (libpq form; every host listed is checked): check,
    /// and run at start, verify its side of the failover chain too
    /// (sync_replication_slots, hot_standby_feedback, primary_slot_name,
    /// dbname in primary_conninfo, the synchronized slot).
    #[arg(long, env = "WALRELAY_STANDBY_URL", hide_env_values = true)]
    pub standby_url: Option<PostgresUrl>,
    /// On a server whose timeline is above 1 (promoted or restored at some
    /// time), create a missing slot only if this is its timeline: there, a
    /// missing slot may be one a failover lost. For a first start on such a
    /// server; a later promotion makes it stale by itself.
    #[arg(long, env = "WALRELAY_NEW_SLOT_ON_TIMELINE")]
    pub new_slot_on_timeline: Option<u32>,
    /// On a halt (a poison row, a refused event, an unexpected change, an
    /// invalidated or vanished slot), exit with code 3 at once instead of
    /// staying up, not ready, until stopped [default: false].
    #[arg(long, env = "WALRELAY_EXIT_ON_HALT", num_args = 0..=1, default_missing_value = "true")]
    pub exit_on_halt: Option<bool>,
}

/// Whether the slot is a failover slot (PostgreSQL 17+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverSlot {
    /// A failover slot where the server supports it; a broken chain is a warning.
    Auto,
    /// A failover slot or no start: PostgreSQL 17+ and a sound chain.
    Require,
    /// Leave the slot as it is.
    Off,
}

/// Whether to publish the rows that exist when the slot is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Publish them first (default).
    Initial,
    /// Start with what commits after the slot exists.
    Never,
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
    postgres_url: Option<PostgresUrl>,
    postgres_password_file: Option<PathBuf>,
    request_timeout: Option<String>,
    allow_password_to_unverified_server: Option<bool>,
    slot: Option<String>,
    publication: Option<String>,
    table: Option<String>,
    create_slot: Option<bool>,
    kafka_brokers: Option<String>,
    topic: Option<String>,
    allowed_topics: Option<Vec<String>>,
    allow_aggregate_across_topics: Option<bool>,
    key_column: Option<String>,
    seq_column: Option<String>,
    payload_column: Option<String>,
    type_column: Option<String>,
    payload_format: Option<PayloadFormat>,
    header_names: Option<std::collections::BTreeMap<String, String>>,
    metadata_column: Option<String>,
    time_column: Option<String>,
    format: Option<Format>,
    cloudevents_source: Option<String>,
    cloudevents_content_type: Option<String>,
    kafka_properties: Option<KafkaProperties>,
    kafka_properties_file: Option<PathBuf>,
    allow_unsafe_kafka_properties: Option<Vec<String>>,
    metrics_addr: Option<String>,
    shutdown_timeout: Option<String>,
    heartbeat_interval: Option<String>,
    snapshot: Option<SnapshotMode>,
    on_poison: Option<OnPoison>,
    dead_letter_topic: Option<String>,
    on_unexpected_change: Option<OnUnexpectedChange>,
    take_over_stale_slot: Option<bool>,
    stale_slot_grace: Option<String>,
    expected_max_downtime: Option<String>,
    failover_slot: Option<FailoverSlot>,
    standby_url: Option<PostgresUrl>,
    new_slot_on_timeline: Option<u32>,
    exit_on_halt: Option<bool>,
}

impl FileConfig {
    /// Reads the file; one that holds a secret must be readable by its owner
    /// only, unless `allow_readable`.
    fn load(path: &Path, allow_readable: bool) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| error(e.message().to_owned()))?;
        let secret = if file
            .postgres_url
            .iter()
            .chain(&file.standby_url)
            .any(PostgresUrl::has_password)
        {
            Some("a password (postgres_url)")
        } else if file
            .kafka_properties
            .as_ref()
            .is_some_and(KafkaProperties::holds_secret)
        {
            Some("a secret Kafka property")
        } else {
            None
        };
        if let Some(secret) = secret {
            check_private("config", path, secret, allow_readable)?;
        }
        Ok(file)
    }
}

/// The group's and others' read, write and execute bits, which libpq checks.
const GROUP_OR_OTHERS: u32 = 0o077;

/// Refuses a file holding `secret` that its group or others may read (or
/// write), as libpq refuses such a `~/.pgpass`; with `allow_readable`, warns.
fn check_private(
    setting: &'static str,
    path: &Path,
    secret: &'static str,
    allow_readable: bool,
) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| ConfigError::SecretFile {
            setting,
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & GROUP_OR_OTHERS == 0 {
        return Ok(());
    }
    if allow_readable {
        tracing::warn!(
            file = %path.display(), mode = format!("{mode:04o}"), setting,
            "the file holds {secret} and group or others may read it; used anyway (--allow-world-readable-secrets)"
        );
        return Ok(());
    }
    Err(ConfigError::SecretFileMode {
        setting,
        path: path.display().to_string(),
        secret,
        mode,
    })
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

/// The topic template with the topics rows may resolve it to, checked
/// against per-aggregate order (a column other than the key can put the
/// events of one aggregate on several topics, and Kafka orders records only
/// within one partition of one topic) and against row data choosing any
/// topic (a template without a literal prefix needs `--allowed-topic`).
fn topic_mapping(
    text: &str,
    allow_across_topics: bool,
    allowed: &[String],
    columns: Columns,
) -> Result<Mapping, ConfigError> {
    let template: TopicTemplate = text
        .parse()
        .map_err(|e: crate::event::TopicTemplateError| invalid("topic", e.to_string()))?;
    let key = &columns.key;
    let besides: Vec<&str> = template.columns_besides(key).collect();
    if !besides.is_empty() && !allow_across_topics {
        return Err(invalid(
            "topic",
            format!(
                "{text:?} names {besides:?}, which can send the events of one aggregate to several \
                 topics, where consumers no longer see them in order (Kafka orders records only \
                 within one partition of one topic); name no column or only {{{key}}} (the key \
                 column), or pass --allow-aggregate-across-topics if no consumer needs an \
                 aggregate's events in order across those topics"
            ),
        ));
    }
    let allowed_topics = allowed
        .iter()
        .map(|a| {
            a.parse::<TopicPattern>()
                .map_err(|e| invalid("allowed-topic", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if allowed_topics.is_empty() && !template.is_confined() {
        return Err(invalid(
            "topic",
            format!(
                "{text:?} lets the rows' values choose any topic (internal ones such as \
                 __consumer_offsets, or another application's); begin it with a literal prefix \
                 that ends in '.', '_' or '-' (events.{{event_type}}), or name the topics rows \
                 may publish to with --allowed-topic"
            ),
        ));
    }
    let mapping = Mapping {
        columns,
        topic: template,
        allowed_topics,
        cloudevents: None,
    };
    if let Some(fixed) = mapping.topic.fixed() {
        if !mapping.allows(fixed) {
            return Err(invalid(
                "allowed-topic",
                format!("allows no event to go to --topic {fixed:?}, the only topic it names"),
            ));
        }
    }
    Ok(mapping)
}

/// The columns the flags (or else the file) name, checked: each names a
/// column, no column serves twice, and no header is renamed to another's.
fn columns(args: ColumnArgs, file: FileColumns) -> Result<Columns, ConfigError> {
    let defaults = Columns::default();
    let column = |setting: &'static str, value: Option<String>, default: &str| match value {
        None => Ok(default.to_owned()),
        Some(v) if v.is_empty() => Err(invalid(setting, "must name a column".into())),
        Some(v) => Ok(v),
    };
    let key = column(
        "key-column",
        args.key_column.or(file.key_column),
        &defaults.key,
    )?;
    let payload = column(
        "payload-column",
        args.payload_column.or(file.payload_column),
        &defaults.payload,
    )?;
    let seq = match args.seq_column.or(file.seq_column) {
        Some(none) if none == NO_SEQ_COLUMN => None,
        other => Some(column(
            "seq-column",
            other,
            crate::event::DEFAULT_SEQ_COLUMN,
        )?),
    };
    let event_type = args
        .type_column
        .or(file.type_column)
        .map(|t| column("type-column", Some(t), ""))
        .transpose()?;
    let named = [
        ("key-column", Some(&key)),
        ("payload-column", Some(&payload)),
        ("seq-column", seq.as_ref()),
        ("type-column", event_type.as_ref()),
    ];
    for (i, (setting, name)) in named.iter().enumerate() {
        let Some(name) = name else { continue };
        if let Some((other, _)) = named[..i].iter().find(|(_, n)| *n == Some(*name)) {
            return Err(invalid(
                setting,
                format!("{name:?} is the --{other} too; each role needs a column of its own"),
            ));
        }
    }
    let header_names = header_names(&args.header_name, file.header_names, &key, &payload)?;
    Ok(Columns {
        key,
        seq,
        payload,
        event_type,
        payload_format: args
            .payload_format
            .or(file.payload_format)
            .unwrap_or_default(),
        header_names,
        metadata: column(
            "metadata-column",
            args.metadata_column.or(file.metadata_column),
            crate::event::DEFAULT_METADATA_COLUMN,
        )?,
        time: column(
            "time-column",
            args.time_column.or(file.time_column),
            crate::event::DEFAULT_TIME_COLUMN,
        )?,
    })
}

/// The `--header-name` pairs of the flags (or else the file), checked: none
/// renames the key or payload column, or to a header walrelay sets, and
/// none names a column or header twice.
fn header_names(
    args: &[String],
    file: Option<std::collections::BTreeMap<String, String>>,
    key: &str,
    payload: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let header_names: Vec<(String, String)> = if args.is_empty() {
        file.unwrap_or_default().into_iter().collect()
    } else {
        args.iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(c, h)| (c.to_owned(), h.to_owned()))
                    .ok_or_else(|| {
                        invalid(
                            "header-name",
                            format!("{pair:?}: expected COLUMN=HEADER, like type=eventType"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?
    };
    for (i, (column, header)) in header_names.iter().enumerate() {
        let problem = if column.is_empty() || header.is_empty() {
            Some("expected COLUMN=HEADER, like type=eventType".to_owned())
        } else if column == key || column == payload {
            Some(format!(
                "{column:?} is the Kafka key or value, not a header"
            ))
        } else if RESERVED_HEADERS.contains(&header.as_str()) {
            Some(format!("{header:?} is a header walrelay sets itself"))
        } else if header_names[..i]
            .iter()
            .any(|(c, h)| c == column || h == header)
        {
            Some(format!("{column:?} or {header:?} is named twice"))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(invalid(
                "header-name",
                format!("{column}={header}: {problem}"),
            ));
        }
    }
    Ok(header_names)
}

/// The column settings of the configuration file.
#[derive(Default)]
struct FileColumns {
    key_column: Option<String>,
    seq_column: Option<String>,
    payload_column: Option<String>,
    type_column: Option<String>,
    payload_format: Option<PayloadFormat>,
    header_names: Option<std::collections::BTreeMap<String, String>>,
    metadata_column: Option<String>,
    time_column: Option<String>,
}

/// The CloudEvents attributes `--format cloudevents` and its flags call for
/// (`None` in the default format); the type column defaults to
/// `event_type` there, and a sequence column is needed for `ce_id`.
fn cloudevents(
    format: Format,
    source: Option<String>,
    content_type: Option<String>,
    postgres: &ConnectParams,
    table: &TableName,
    columns: &mut Columns,
) -> Result<Option<CloudEvents>, ConfigError> {
    if format == Format::Default {
        if source.is_some() || content_type.is_some() {
            return Err(invalid(
                "format",
                "--cloudevents-source and --cloudevents-content-type need --format cloudevents"
                    .into(),
            ));
        }
        return Ok(None);
    }
    if columns.seq.is_none() {
        return Err(invalid(
            "format",
            "cloudevents needs a sequence column (--seq-column): ce_id is <key>:<sequence>, the \
             same on every replay, so that consumers can deduplicate on it"
                .into(),
        ));
    }
    columns
        .event_type
        .get_or_insert_with(|| DEFAULT_CLOUDEVENTS_TYPE_COLUMN.to_owned());
    let source =
        source.unwrap_or_else(|| crate::cloudevents::default_source(&postgres.dbname, table));
    if !crate::cloudevents::is_valid_source(&source) {
        return Err(invalid(
            "cloudevents-source",
            format!(
                "{source:?} is not a URI-reference: use printable ASCII without spaces \
                 (percent-encode anything else), like /shop/orders or https://shop.example/orders"
            ),
        ));
    }
    if let Some(content_type) = &content_type {
        if !crate::cloudevents::is_valid_content_type(content_type) {
            return Err(invalid(
                "cloudevents-content-type",
                format!("{content_type:?} is not a media type like application/protobuf"),
            ));
        }
    }
    Ok(Some(CloudEvents {
        source,
        content_type,
    }))
}

/// The type column under `--format cloudevents` unless `--type-column` says.
pub const DEFAULT_CLOUDEVENTS_TYPE_COLUMN: &str = "event_type";

/// The dead-letter topic `--on-poison` and `--dead-letter-topic` call for;
/// it must be none of the topics `topic` can resolve to.
fn dead_letter_topic(
    on_poison: OnPoison,
    topic: Option<String>,
    events: &Mapping,
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
        (OnPoison::DeadLetter, Some(t)) => {
            let fixed = t
                .parse::<TopicTemplate>()
                .ok()
                .and_then(|parsed| parsed.fixed().map(str::to_owned))
                .ok_or_else(|| {
                    invalid(
                        "dead-letter-topic",
                        format!("{t:?} is not a valid Kafka topic name"),
                    )
                })?;
            if events.topic.can_resolve_to(&fixed) && events.allows(&fixed) {
                return Err(invalid(
                    "dead-letter-topic",
                    format!(
                        "{fixed:?} is a topic --topic {} can publish events to: dead-letter \
                         records would mix with events and be read as such; choose a topic that no \
                         row can make --topic name (and --allowed-topic allow)",
                        events.topic
                    ),
                ));
            }
            Ok(Some(fixed))
        }
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
    pub kafka_properties: KafkaProperties,
    /// How rows become events: the columns, the topic template and the
    /// topics rows may go to.
    pub mapping: Mapping,
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
    /// The longest outage of every walrelay `check` compares
    /// `idle_replication_slot_timeout` with; `None`: not given.
    pub expected_max_downtime: Option<Duration>,
    /// Whether the slot is a failover slot.
    pub failover_slot: FailoverSlot,
    /// A standby to check the failover chain on.
    pub standby: Option<ConnectParams>,
    /// The timeline, above 1, on which a missing slot may be created.
    pub new_slot_on_timeline: Option<u32>,
    /// Whether a halt exits (code 3) rather than staying up, not ready.
    pub exit_on_halt: bool,
}

impl RunArgs {
    /// Merges flags, environment and the configuration file, and checks every
    /// setting; nothing connects before this succeeds.
    pub fn validate(self) -> Result<RunConfig, ConfigError> {
        self.validate_with_env(|name| std::env::var(name).ok())
    }

    /// As [`RunArgs::validate`], with the environment variables clap does not
    /// read (`WALRELAY_KAFKA_PROPERTY`) looked up by `env`.
    #[allow(clippy::too_many_lines)] // One flat merge of every setting reads best.
    pub fn validate_with_env(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<RunConfig, ConfigError> {
        let allow_readable = self.allow_world_readable_secrets;
        let file = self
            .config
            .as_deref()
            .map(|path| FileConfig::load(path, allow_readable))
            .transpose()?
            .unwrap_or_default();
        let source = SourceArgs {
            postgres_url: self
                .postgres_url
                .or(file.postgres_url)
                .ok_or_else(|| invalid("postgres-url", "is required".into()))?,
            postgres_password_file: self.postgres_password_file.or(file.postgres_password_file),
            allow_world_readable_secrets: allow_readable,
            allow_password_to_unverified_server: self
                .allow_password_to_unverified_server
                .or(file.allow_password_to_unverified_server)
                .unwrap_or(false),
            publication: self
                .publication
                .or(file.publication)
                .unwrap_or_else(|| DEFAULT_PUBLICATION.to_owned()),
            table: self
                .table
                .or(file.table)
                .unwrap_or_else(|| DEFAULT_TABLE.to_owned()),
            request_timeout: self.request_timeout.or(file.request_timeout),
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
        let properties_file = self
            .kafka_properties_file
            .or(file.kafka_properties_file)
            .map(|path| properties_file(&path, allow_readable))
            .transpose()?;
        let mut kafka_properties = kafka_properties(
            file.kafka_properties,
            properties_file,
            &self.kafka_property,
            env(KAFKA_PROPERTY_ENV).as_deref(),
        )?;
        kafka_properties.resolve(|key, value| property_value(key, value, allow_readable))?;
        let allowed_unsafe = if self.allow_unsafe_kafka_property.is_empty() {
            file.allow_unsafe_kafka_properties.unwrap_or_default()
        } else {
            self.allow_unsafe_kafka_property
        };
        for (name, what) in kafka_properties.check_unsafe(&allowed_unsafe)? {
            tracing::warn!(
                property = name,
                "--kafka-property {name} {what} (allowed by --allow-unsafe-kafka-property)"
            );
        }
        let file_columns = FileColumns {
            key_column: file.key_column,
            seq_column: file.seq_column,
            payload_column: file.payload_column,
            type_column: file.type_column,
            payload_format: file.payload_format,
            header_names: file.header_names,
            metadata_column: file.metadata_column,
            time_column: file.time_column,
        };
        let allowed_topics = if self.allowed_topic.is_empty() {
            file.allowed_topics.unwrap_or_default()
        } else {
            self.allowed_topic
        };
        let postgres = source.connect_params()?;
        let table = source.table()?;
        let mut columns = columns(self.columns, file_columns)?;
        let cloudevents = cloudevents(
            self.format.or(file.format).unwrap_or_default(),
            self.cloudevents_source.or(file.cloudevents_source),
            self.cloudevents_content_type
                .or(file.cloudevents_content_type),
            &postgres,
            &table,
            &mut columns,
        )?;
        let mut mapping = topic_mapping(
            &self
                .topic
                .or(file.topic)
                .unwrap_or_else(|| DEFAULT_TOPIC.to_owned()),
            self.allow_aggregate_across_topics
                .or(file.allow_aggregate_across_topics)
                .unwrap_or(false),
            &allowed_topics,
            columns,
        )?;
        mapping.cloudevents = cloudevents;
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
            &mapping,
        )?;
        kafka_properties.check_halt_mode(dead_letter_topic.is_none())?;
        let stale_slot_grace = match self.stale_slot_grace.or(file.stale_slot_grace) {
            // Longer than the 10 s between a healthy holder's status updates.
            Some(text) => parse_duration("stale-slot-grace", &text, Duration::from_secs(15))?,
            None => DEFAULT_STALE_SLOT_GRACE,
        };
        let expected_max_downtime = self
            .expected_max_downtime
            .or(file.expected_max_downtime)
            .map(|text| parse_duration("expected-max-downtime", &text, Duration::from_secs(1)))
            .transpose()?;
        let standby = self
            .standby_url
            .or(file.standby_url)
            .map(|url| standby_params(&url, &postgres))
            .transpose()?;
        Ok(RunConfig {
            expected_max_downtime,
            failover_slot: self
                .failover_slot
                .or(file.failover_slot)
                .unwrap_or(FailoverSlot::Auto),
            standby,
            new_slot_on_timeline: self.new_slot_on_timeline.or(file.new_slot_on_timeline),
            exit_on_halt: self.exit_on_halt.or(file.exit_on_halt).unwrap_or(false),
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
            postgres,
            publication: source.publication()?,
            table,
            slot,
            create_slot: self.create_slot.or(file.create_slot).unwrap_or(true),
            // The checks librdkafka would make when the producer starts, now
            // (after the unsafe ones are ruled out: a plugin loads when set).
            kafka_properties: {
                crate::sink::producer_config(&kafka_brokers, &kafka_properties)?
                    .create_native_config()
                    .map_err(|e| kafka_properties.rejected(&e))?;
                kafka_properties
            },
            kafka_brokers,
            mapping,
            metrics_addr: match metrics_addr {
                None => default_metrics_addr(),
                Some(text) => text.parse().map_err(|_| {
                    invalid(
                        "metrics-addr",
                        format!("{text:?} is not an address like 0.0.0.0:9643"),
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
    /// The standby's URL.
    #[error("--standby-url: {0}")]
    StandbyUrl(#[source] ParamsError),
    /// The password file.
    #[error("--postgres-password-file: cannot read {path}: {source}")]
    PasswordFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holding a secret whose permissions cannot be read.
    #[error("--{setting} {path}: cannot read its permissions: {source}")]
    SecretFile {
        /// The flag, without dashes.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holding a secret that group or others may access.
    #[error(
        "--{setting} {path}: holds {secret}, but group or others have access to it (mode {mode:04o}); permissions should be u=rw (0600) or less: chmod 600 {path} (or pass --allow-world-readable-secrets to use it anyway)"
    )]
    SecretFileMode {
        /// The flag, without dashes.
        setting: &'static str,
        /// The file.
        path: String,
        /// What it holds.
        secret: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// The file a `file:` property value names.
    #[error("--kafka-property {key}: cannot read {path}: {source}")]
    PropertyFile {
        /// The property.
        key: String,
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
    /// The producer's configuration.
    #[error(transparent)]
    Kafka(#[from] SinkConfigError),
    /// A producer property.
    #[error(transparent)]
    KafkaProperty(#[from] PropertyError),
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
        let mut params = ConnectParams::from_url(self.postgres_url.expose())?;
        if let Some(path) = &self.postgres_password_file {
            check_private(
                "postgres-password-file",
                path,
                "a password",
                self.allow_world_readable_secrets,
            )?;
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                    path: path.display().to_string(),
                    source,
                })?;
            params.set_password(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        if let Some(text) = &self.request_timeout {
            params.requests.timeout = parse_duration("request-timeout", text, MIN_REQUEST_TIMEOUT)?;
        }
        params.auth.allow_unverified_password = self.allow_password_to_unverified_server;
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

/// The standby's connection parameters: its URL's, with the password and
/// request timeout of the primary's when it names none of its own.
fn standby_params(
    url: &PostgresUrl,
    primary: &ConnectParams,
) -> Result<ConnectParams, ConfigError> {
    let mut params = ConnectParams::from_url(url.expose()).map_err(ConfigError::StandbyUrl)?;
    if params.password().is_none() {
        if let Some(password) = primary.password() {
            params.set_password(password.to_owned());
        }
    }
    params.requests = primary.requests.clone();
    Ok(params)
}

/// The environment variable of `--kafka-property`: one `key=value` per line.
pub const KAFKA_PROPERTY_ENV: &str = "WALRELAY_KAFKA_PROPERTY";

/// Reads a `--kafka-properties-file`; one that holds a secret must be
/// private, unless `allow_readable`.
fn properties_file(path: &Path, allow_readable: bool) -> Result<KafkaProperties, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::SecretFile {
        setting: "kafka-properties-file",
        path: path.display().to_string(),
        source,
    })?;
    // Not quoted: it may hold a secret.
    let text = String::from_utf8(text).map_err(|_| {
        invalid(
            "kafka-properties-file",
            format!("{}: not UTF-8 text", path.display()),
        )
    })?;
    let properties = KafkaProperties::parse_properties_file(&text)?;
    if properties.holds_secret() {
        check_private(
            "kafka-properties-file",
            path,
            "a secret Kafka property",
            allow_readable,
        )?;
    }
    Ok(properties)
}

/// A property's value as given: `file:PATH` is the content of PATH (its
/// trailing newline dropped; the file must be private when the property is
/// a secret one), `literal:X` is X, anything else is itself (`None`).
fn property_value(
    key: &str,
    value: &str,
    allow_readable: bool,
) -> Result<Option<String>, ConfigError> {
    if let Some(text) = value.strip_prefix(kafka_properties::LITERAL_PREFIX) {
        return Ok(Some(text.to_owned()));
    }
    let Some(path) = value.strip_prefix(kafka_properties::FILE_PREFIX) else {
        return Ok(None);
    };
    let path = Path::new(path);
    let text = std::fs::read(path).map_err(|source| ConfigError::PropertyFile {
        key: key.to_owned(),
        path: path.display().to_string(),
        source,
    })?;
    if kafka_properties::is_secret(key) {
        check_private(
            "kafka-property",
            path,
            "a secret Kafka property's value",
            allow_readable,
        )?;
    }
    let text = String::from_utf8(text).map_err(|_| ConfigError::PropertyFile {
        key: key.to_owned(),
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(Some(text.strip_suffix('\r').unwrap_or(text).to_owned()))
}

/// The producer properties: the configuration file's, overridden by the
/// properties file's, overridden by the flags' (or, when no flag is given,
/// by the environment variable's lines).
fn kafka_properties(
    file: Option<KafkaProperties>,
    properties_file: Option<KafkaProperties>,
    flags: &[PropertyArg],
    env: Option<&str>,
) -> Result<KafkaProperties, PropertyError> {
    let mut properties = file
        .map(KafkaProperties::checked)
        .transpose()?
        .unwrap_or_default();
    properties.extend(properties_file.unwrap_or_default());
    properties.extend(if flags.is_empty() {
        env.map(KafkaProperties::parse_lines)
            .transpose()?
            .unwrap_or_default()
    } else {
        KafkaProperties::parse(
            flags
                .iter()
                .enumerate()
                .map(|(i, arg)| (Origin::Flag(i + 1), arg.0.as_str())),
        )?
    });
    Ok(properties)
}

fn invalid(setting: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { setting, message }
}

impl TailArgs {
    /// Checks every setting; nothing connects before this succeeds.
    pub fn validate(self) -> Result<TailOptions, ConfigError> {
        let topic = self
            .topic
            .parse::<TopicTemplate>()
            .map_err(|e| invalid("topic", e.to_string()))?;
        Ok(TailOptions {
            postgres: self.source.connect_params()?,
            publication: self.source.publication()?,
            table: self.source.table()?,
            mapping: Mapping::new(columns(self.columns, FileColumns::default())?, topic),
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
        assert_eq!(o.mapping.topic.to_string(), "events");
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
        run_with_env(args, None)
    }

    /// `walrelay run ARGS` with `WALRELAY_KAFKA_PROPERTY` set to `properties`.
    fn run_with_env(args: &[&str], properties: Option<&str>) -> Result<RunConfig, String> {
        let cli = run_args(args).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            unreachable!("parsed as run")
        };
        run.validate_with_env(|name| {
            assert_eq!(name, KAFKA_PROPERTY_ENV);
            properties.map(str::to_owned)
        })
        .map_err(|e| e.to_string())
    }

    fn run_args(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["walrelay", "run"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
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
        assert_eq!(c.mapping.topic.to_string(), "events");
        assert!(c.create_slot);
        // Loopback only unless told otherwise.
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9643");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert!(c.kafka_properties.is_empty());
    }

    #[test]
    fn passwords_go_to_unverified_servers_only_when_asked_for() {
        // Off by default, for run and tail.
        assert!(
            !run(&MINIMAL)
                .unwrap()
                .postgres
                .auth
                .allow_unverified_password
        );
        assert!(
            !tail(&["--postgres-url", "postgres://u@h/d"])
                .unwrap()
                .postgres
                .auth
                .allow_unverified_password
        );
        let mut flag = MINIMAL.to_vec();
        flag.push("--allow-password-to-unverified-server");
        assert!(run(&flag).unwrap().postgres.auth.allow_unverified_password);
        assert!(
            tail(&[
                "--postgres-url",
                "postgres://u@h/d",
                "--allow-password-to-unverified-server"
            ])
            .unwrap()
            .postgres
            .auth
            .allow_unverified_password
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            "postgres_url = \"postgres://u@h/d\"\nkafka_brokers = \"k:1\"\n\
             allow_password_to_unverified_server = true\n",
        )
        .unwrap();
        let c = run(&["--config", path.to_str().unwrap()]).unwrap();
        assert!(c.postgres.auth.allow_unverified_password);
        let c = run(&[
            "--config",
            path.to_str().unwrap(),
            "--allow-password-to-unverified-server=false",
        ])
        .unwrap();
        assert!(!c.postgres.auth.allow_unverified_password);
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
        assert_eq!(c.kafka_properties.get("linger.ms"), Some("1"));
        assert_eq!(c.kafka_properties.get("compression.type"), Some("zstd"));
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
                [&MINIMAL[..], &["--expected-max-downtime", "soon"]].concat(),
                "expected-max-downtime",
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

    /// Writes `text` to a new file of mode `mode` in `dir`.
    fn file_with_mode(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn producer_properties_that_break_per_key_placement_or_order_are_refused() {
        let with = |property: &str| run(&[&MINIMAL[..], &["--kafka-property", property]].concat());
        for property in [
            "partitioner=random",
            "partitioner=consistent_random",
            "partitioner=consistent",
            "partitioner=fnv1a_random",
            "queuing.strategy=lifo",
            // librdkafka's alias of acks.
            "request.required.acks=1",
        ] {
            let err = with(property).unwrap_err();
            let (key, value) = property.split_once('=').unwrap();
            assert!(
                err.starts_with(&format!("--kafka-property {key}: not allowed but as ")),
                "{property}: {err}"
            );
            // A value is never quoted: it could be a secret.
            assert!(!err.contains(&format!("={value}")), "{property}: {err}");
        }
        assert!(
            with("partitioner=random")
                .unwrap_err()
                .contains("partition")
        );
        // Placement by murmur2, as walrelay's default, whatever the NULL-key rule.
        for property in [
            "partitioner=murmur2",
            "partitioner=murmur2_random",
            "queuing.strategy=fifo",
        ] {
            assert!(with(property).is_ok(), "{property}");
        }
        // The alias of bootstrap.servers cannot name other brokers either.
        assert!(
            with("metadata.broker.list=other:1")
                .unwrap_err()
                .contains("--kafka-brokers")
        );
    }

    #[test]
    fn a_dead_letter_topic_the_events_can_go_to_is_refused() {
        let dead_letter = |topic: &str, dlq: &str| {
            run(&[
                &MINIMAL[..],
                &[
                    "--topic",
                    topic,
                    "--allow-aggregate-across-topics",
                    "--on-poison",
                    "dead-letter",
                    "--dead-letter-topic",
                    dlq,
                ],
            ]
            .concat())
        };
        for (topic, dlq) in [
            ("events", "events"),
            ("events.{event_type}", "events.Poison"),
            ("e.{tenant}", "e.anything"),
        ] {
            let err = dead_letter(topic, dlq).unwrap_err();
            assert!(
                err.starts_with("--dead-letter-topic") && err.contains("can publish events to"),
                "{topic} / {dlq}: {err}"
            );
        }
        for (topic, dlq) in [
            ("events", "events.dlq"),
            ("events.{event_type}", "dlq.events"),
        ] {
            let c = dead_letter(topic, dlq).unwrap();
            assert_eq!(c.dead_letter_topic.as_deref(), Some(dlq));
        }
        // Only the topics --allowed-topic allows count.
        let allowed = |allowed: &str| {
            run(&[
                &MINIMAL[..],
                &[
                    "--topic",
                    "{tenant}",
                    "--allowed-topic",
                    allowed,
                    "--allow-aggregate-across-topics",
                    "--on-poison",
                    "dead-letter",
                    "--dead-letter-topic",
                    "dead",
                ],
            ]
            .concat())
        };
        assert!(allowed("orders").is_ok());
        assert!(
            allowed("d*")
                .unwrap_err()
                .starts_with("--dead-letter-topic")
        );
    }

    #[test]
    fn a_template_without_a_literal_prefix_needs_the_allowed_topics() {
        let with = |extra: &[&str]| {
            run(&[&MINIMAL[..], extra, &["--allow-aggregate-across-topics"]].concat())
        };
        for open in ["{event_type}", "{tenant}.events", "events{event_type}"] {
            let err = with(&["--topic", open]).unwrap_err();
            assert!(
                err.starts_with("--topic") && err.contains("--allowed-topic"),
                "{open}: {err}"
            );
        }
        let c = with(&[
            "--topic",
            "{event_type}",
            "--allowed-topic",
            "orders",
            "--allowed-topic",
            "audit.*",
        ])
        .unwrap();
        assert!(c.mapping.allows("orders") && c.mapping.allows("audit.x"));
        assert!(!c.mapping.allows("payments"));
        // The environment's list is comma-separated; the file takes an array.
        let c = with(&["--topic", "{event_type}", "--allowed-topic", "a,b.*"]).unwrap();
        assert!(c.mapping.allows("a") && c.mapping.allows("b.c"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            "topic = \"{event_type}\"\nallowed_topics = [\"orders\"]\n",
        )
        .unwrap();
        let c = with(&["--config", path.to_str().unwrap()]).unwrap();
        assert!(c.mapping.allows("orders") && !c.mapping.allows("a"));
        // A prefix that ends in a separator confines the template by itself.
        let c = with(&["--topic", "outbox.event.{aggregatetype}"]).unwrap();
        assert!(c.mapping.allowed_topics.is_empty());
        for bad in ["*", "a b", "a*b", ".."] {
            let err = with(&["--topic", "{x}", "--allowed-topic", bad]).unwrap_err();
            assert!(err.starts_with("--allowed-topic"), "{bad}: {err}");
        }
        // A fixed topic the list leaves out would refuse every row.
        let err = with(&["--topic", "events", "--allowed-topic", "other"]).unwrap_err();
        assert!(err.starts_with("--allowed-topic"), "{err}");
    }

    #[test]
    fn the_column_flags_name_the_columns_of_the_event() {
        let c = run(&MINIMAL).unwrap();
        assert_eq!(c.mapping.columns, Columns::default());
        assert_eq!(
            c.mapping.needed_columns(),
            ["aggregate_id", "payload", "seq_nr"]
        );
        let c = run(&[
            &MINIMAL[..],
            &[
                "--key-column",
                "aggregateid",
                "--seq-column",
                "none",
                "--payload-column",
                "body",
                "--type-column",
                "type",
                "--payload-format",
                "bytes",
                "--header-name",
                "type=eventType",
                "--header-name",
                "event_id=id",
            ],
        ]
        .concat())
        .unwrap();
        assert_eq!(
            c.mapping.columns,
            Columns {
                key: "aggregateid".into(),
                seq: None,
                payload: "body".into(),
                event_type: Some("type".into()),
                payload_format: PayloadFormat::Bytes,
                header_names: vec![
                    ("type".into(), "eventType".into()),
                    ("event_id".into(), "id".into())
                ],
                ..Columns::default()
            }
        );
        // The file names them too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            "key_column = \"k\"\nseq_column = \"version\"\npayload_format = \"json\"\n\
             [header_names]\ntype = \"eventType\"\n",
        )
        .unwrap();
        let c = run(&[&MINIMAL[..], &["--config", path.to_str().unwrap()]].concat()).unwrap();
        assert_eq!(
            (
                c.mapping.columns.key.as_str(),
                c.mapping.columns.seq.as_deref(),
                c.mapping.columns.payload_format,
                c.mapping.seq_header(),
            ),
            ("k", Some("version"), PayloadFormat::Json, Some("version"))
        );
        assert_eq!(c.mapping.columns.header_name("type"), "eventType");
        for (args, needle) in [
            (&["--key-column", ""][..], "--key-column"),
            (&["--payload-column", "aggregate_id"], "--payload-column"),
            (&["--type-column", "seq_nr"], "--type-column"),
            (&["--seq-column", "payload"], "--seq-column"),
            (&["--payload-format", "avro"], "payload-format"),
            (&["--header-name", "type"], "--header-name"),
            (&["--header-name", "=x"], "--header-name"),
            (&["--header-name", "payload=body"], "--header-name"),
            (&["--header-name", "aggregate_id=key"], "--header-name"),
            (&["--header-name", "recorded_at=lsn"], "--header-name"),
            (&["--header-name", "a=x,b=x"], "--header-name"),
        ] {
            let err = run(&[&MINIMAL[..], args].concat()).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_per_aggregate_order_check_follows_the_key_column() {
        let with =
            |extra: &[&str]| run(&[&MINIMAL[..], &["--key-column", "aggregateid"], extra].concat());
        assert!(with(&["--topic", "e.{aggregateid}"]).is_ok());
        for topic in ["e.{aggregate_id}", "outbox.event.{aggregatetype}"] {
            let err = with(&["--topic", topic]).unwrap_err();
            assert!(err.contains("--allow-aggregate-across-topics"), "{err}");
            assert!(with(&["--topic", topic, "--allow-aggregate-across-topics"]).is_ok());
        }
    }

    #[test]
    fn a_topic_template_that_can_split_an_aggregate_needs_the_opt_in() {
        for topic in ["events.{event_type}", "t.{tenant}.{aggregate_id}"] {
            let err = run(&[&MINIMAL[..], &["--topic", topic]].concat()).unwrap_err();
            assert!(
                err.starts_with("--topic") && err.contains("--allow-aggregate-across-topics"),
                "{topic}: {err}"
            );
            let c = run(&[
                &MINIMAL[..],
                &["--topic", topic, "--allow-aggregate-across-topics"],
            ]
            .concat())
            .unwrap();
            assert_eq!(c.mapping.topic.to_string(), topic);
        }
        // The key column alone keeps each aggregate on one topic.
        let c = run(&[&MINIMAL[..], &["--topic", "events.{aggregate_id}"]].concat()).unwrap();
        assert_eq!(c.mapping.topic.to_string(), "events.{aggregate_id}");
        // The file can opt in too; the flag can opt out again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            "topic = \"events.{event_type}\"\nallow_aggregate_across_topics = true\n",
        )
        .unwrap();
        let file = ["--config", path.to_str().unwrap()];
        assert!(run(&[&MINIMAL[..], &file[..]].concat()).is_ok());
        assert!(
            run(&[
                &MINIMAL[..],
                &file[..],
                &["--allow-aggregate-across-topics=false"]
            ]
            .concat())
            .is_err()
        );
    }

    #[test]
    fn request_timeout_bounds_requests_of_run_check_and_tail() {
        assert_eq!(
            run(&MINIMAL).unwrap().postgres.requests.timeout,
            crate::pg::request::DEFAULT_REQUEST_TIMEOUT
        );
        let c = run(&[&MINIMAL[..], &["--request-timeout", "5s"]].concat()).unwrap();
        assert_eq!(c.postgres.requests.timeout, Duration::from_secs(5));
        let o = tail(&[
            "--postgres-url",
            "postgres://u@h/d",
            "--request-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(o.postgres.requests.timeout, Duration::from_secs(120));
        for bad in ["500ms", "soon", "0s"] {
            let err = run(&[&MINIMAL[..], &["--request-timeout", bad]].concat()).unwrap_err();
            assert!(err.starts_with("--request-timeout"), "{bad}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(&path, "request_timeout = \"7s\"\n").unwrap();
        let c = run(&[&MINIMAL[..], &["--config", path.to_str().unwrap()]].concat()).unwrap();
        assert_eq!(c.postgres.requests.timeout, Duration::from_secs(7));
    }

    #[test]
    fn the_password_file_wins_and_loses_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with_mode(dir.path(), "pw", "from-file\n", 0o600);
        let o = tail(&[
            "--postgres-url",
            "postgres://u:from-url@h/d",
            "--postgres-password-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(o.postgres.password(), Some("from-file"));
    }

    /// What the tests below must never see printed.
    const SECRET: &str = "pa;ss word=";

    #[test]
    fn debug_output_of_every_configuration_struct_redacts_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let encoded = "pa%3Bss%20word%3D";
        let config = file_with_mode(
            dir.path(),
            "walrelay.toml",
            &format!(
                "postgres_url = \"postgres://u:{encoded}@h/d\"\nkafka_brokers = \"k:1\"\n\
                 [kafka_properties]\n\"sasl.password\" = \"{SECRET}\"\n\"ssl.key.pem\" = \"{SECRET}\"\n"
            ),
            0o600,
        );
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--postgres-url",
            &format!("postgres://u:{encoded}@h/d?password={encoded}&sslmode=require"),
            "--kafka-property",
            &format!("sasl.oauthbearer.config={SECRET}"),
            "--kafka-property",
            &format!("sasl.password={SECRET}"),
        ];
        let cli = run_args(&args).unwrap();
        let Command::Run(run_args) = &cli.command else {
            unreachable!()
        };
        let file = FileConfig::load(&config, false).unwrap();
        let validated = run(&args).unwrap();
        assert_eq!(
            validated.kafka_properties.get("sasl.password"),
            Some(SECRET)
        );
        assert_eq!(validated.postgres.password(), Some(SECRET));
        for (what, text) in [
            ("Cli", format!("{cli:?}")),
            ("RunArgs", format!("{run_args:?}")),
            ("FileConfig", format!("{file:?}")),
            ("RunConfig", format!("{validated:?}")),
            ("RunConfig pretty", format!("{validated:#?}")),
        ] {
            assert!(
                !text.contains("pa;ss") && !text.contains(encoded) && !text.contains("pa%3B"),
                "{what}: {text}"
            );
            assert!(text.contains(kafka_properties::REDACTED), "{what}: {text}");
        }
        let tail = Cli::try_parse_from([
            "walrelay",
            "tail",
            "--postgres-url",
            &format!("postgres://u:{encoded}@h/d"),
        ])
        .unwrap();
        assert!(!format!("{tail:?}").contains(encoded), "{tail:?}");
        // A URL that does not parse is hidden whole.
        let bad = PostgresUrl::from(format!("postgres://u:{SECRET}@h:port/d"));
        assert!(!format!("{bad:?}").contains("pa;ss"), "{bad:?}");
    }

    #[test]
    fn kafka_properties_are_neither_split_nor_trimmed_and_the_environment_has_one_per_line() {
        let c = run(&[
            &MINIMAL[..],
            &["--kafka-property", &format!("sasl.password={SECRET} ")],
        ]
        .concat())
        .unwrap();
        assert_eq!(
            c.kafka_properties.get("sasl.password"),
            Some("pa;ss word= ")
        );
        let env = format!("sasl.password={SECRET}\r\n\nlinger.ms=7\n");
        let c = run_with_env(&MINIMAL, Some(&env)).unwrap();
        assert_eq!(c.kafka_properties.get("sasl.password"), Some(SECRET));
        assert_eq!(c.kafka_properties.get("linger.ms"), Some("7"));
        // Flags replace the environment's list.
        let c = run_with_env(
            &[&MINIMAL[..], &["--kafka-property", "linger.ms=9"]].concat(),
            Some(&env),
        )
        .unwrap();
        assert_eq!(c.kafka_properties.get("linger.ms"), Some("9"));
        assert_eq!(c.kafka_properties.get("sasl.password"), None);
    }

    #[test]
    fn bad_kafka_properties_are_refused_without_their_value() {
        for property in [
            format!("sasl.pasword={SECRET}"),
            format!("sasl.password:{SECRET}"),
            format!("linger.ms={SECRET}"),
            format!("acks={SECRET}"),
        ] {
            let e = run(&[&MINIMAL[..], &["--kafka-property", &property]].concat()).unwrap_err();
            assert!(!e.contains("pa;ss"), "{e}");
            assert!(e.contains("--kafka-property"), "{e}");
        }
        let e = run_with_env(
            &MINIMAL,
            Some(&format!("linger.ms=1\nsasl.password {SECRET}")),
        )
        .unwrap_err();
        assert!(
            !e.contains("pa;ss") && e.contains("WALRELAY_KAFKA_PROPERTY (line 2)"),
            "{e}"
        );
    }

    #[test]
    fn properties_that_load_code_need_to_be_allowed_by_name() {
        let unsafe_property = [
            &MINIMAL[..],
            &[
                "--kafka-property",
                "sasl.kerberos.kinit.cmd=touch /tmp/owned",
            ],
        ]
        .concat();
        let e = run(&unsafe_property).unwrap_err();
        assert!(
            e.contains("--allow-unsafe-kafka-property sasl.kerberos.kinit.cmd")
                && !e.contains("touch"),
            "{e}"
        );
        let allowed = [
            &unsafe_property[..],
            &["--allow-unsafe-kafka-property", "sasl.kerberos.kinit.cmd"],
        ]
        .concat();
        assert!(run(&allowed).is_ok());
        let e = run(&[
            &MINIMAL[..],
            &["--allow-unsafe-kafka-property", "linger.ms"],
        ]
        .concat())
        .unwrap_err();
        assert!(e.contains("not one of the properties"), "{e}");
    }

    #[test]
    fn a_properties_file_is_read_as_javas_and_flags_win_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with_mode(
            dir.path(),
            "client.properties",
            &format!(
                "# as for the Java client\nsecurity.protocol = SASL_SSL\nsasl.username: walrelay\n\
                 sasl.password={SECRET}\nlinger.ms=50\n"
            ),
            0o600,
        );
        let toml = file_with_mode(
            dir.path(),
            "walrelay.toml",
            &format!(
                "kafka_properties_file = \"{}\"\n[kafka_properties]\n\"linger.ms\" = \"7\"\n\"compression.type\" = \"zstd\"\n",
                file.display()
            ),
            0o644,
        );
        let c = run(&[
            &MINIMAL[..],
            &[
                "--config",
                toml.to_str().unwrap(),
                "--kafka-property",
                "sasl.username=flag",
            ],
        ]
        .concat())
        .unwrap();
        // The TOML's, then the properties file's, then the flags'.
        assert_eq!(c.kafka_properties.get("compression.type"), Some("zstd"));
        assert_eq!(c.kafka_properties.get("linger.ms"), Some("50"));
        assert_eq!(
            c.kafka_properties.get("security.protocol"),
            Some("SASL_SSL")
        );
        assert_eq!(c.kafka_properties.get("sasl.password"), Some(SECRET));
        assert_eq!(c.kafka_properties.get("sasl.username"), Some("flag"));
        assert!(!format!("{c:?}").contains("pa;ss"));
        // Holding a secret, it must be private: see files_holding_a_secret_must_be_private.
    }

    #[test]
    fn a_file_value_is_read_from_its_file_and_literal_keeps_a_value_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let secret = file_with_mode(dir.path(), "kafka", &format!("{SECRET}\n"), 0o600);
        let reference = format!("file:{}", secret.display());
        let c = run(&[
            &MINIMAL[..],
            &[
                "--kafka-property",
                &format!("sasl.password={reference}"),
                "--kafka-property",
                "sasl.username=literal:file:not-a-path",
                "--kafka-property",
                "client.id=literal:literal:x",
            ],
        ]
        .concat())
        .unwrap();
        assert_eq!(c.kafka_properties.get("sasl.password"), Some(SECRET));
        assert_eq!(
            c.kafka_properties.get("sasl.username"),
            Some("file:not-a-path")
        );
        assert_eq!(c.kafka_properties.get("client.id"), Some("literal:x"));
        // From the environment and the TOML file too; a TOML file that only
        // points at the secret may be read by anyone.
        let c = run_with_env(&MINIMAL, Some(&format!("sasl.password={reference}"))).unwrap();
        assert_eq!(c.kafka_properties.get("sasl.password"), Some(SECRET));
        let toml = file_with_mode(
            dir.path(),
            "walrelay.toml",
            &format!("[kafka_properties]\n\"sasl.password\" = \"{reference}\"\n"),
            0o644,
        );
        let c = run(&[&MINIMAL[..], &["--config", toml.to_str().unwrap()]].concat()).unwrap();
        assert_eq!(c.kafka_properties.get("sasl.password"), Some(SECRET));
        // The secret's file must be private; a missing one is named.
        let readable = file_with_mode(dir.path(), "readable", SECRET, 0o640);
        let with = |property: &str| run(&[&MINIMAL[..], &["--kafka-property", property]].concat());
        let e = with(&format!("sasl.password=file:{}", readable.display())).unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("pa;ss"), "{e}");
        // Not a secret's: any file will do.
        let user = file_with_mode(dir.path(), "user", "walrelay\n", 0o644);
        let c = with(&format!("sasl.username=file:{}", user.display())).unwrap();
        assert_eq!(c.kafka_properties.get("sasl.username"), Some("walrelay"));
        let e = with("sasl.password=file:/nonexistent/x").unwrap_err();
        assert!(
            e.contains("--kafka-property sasl.password: cannot read /nonexistent/x"),
            "{e}"
        );
    }

    #[test]
    fn files_holding_a_secret_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let password = file_with_mode(dir.path(), "pw", SECRET, 0o640);
        let properties = file_with_mode(
            dir.path(),
            "client.properties",
            &format!("sasl.password={SECRET}\n"),
            0o640,
        );
        for (flag, file) in [
            ("--postgres-password-file", &password),
            ("--kafka-properties-file", &properties),
        ] {
            let args = [&MINIMAL[..], &[flag, file.to_str().unwrap()]].concat();
            let e = run(&args).unwrap_err();
            assert!(
                e.starts_with(flag)
                    && e.contains("chmod 600")
                    && e.contains("0640")
                    && !e.contains("pa;ss"),
                "{e}"
            );
            let allowed = run(&[&args[..], &["--allow-world-readable-secrets"]].concat()).unwrap();
            let password = allowed.postgres.password();
            let property = allowed.kafka_properties.get("sasl.password");
            assert!(
                password == Some(SECRET) || property == Some(SECRET),
                "{flag}"
            );
        }

        let with_password = file_with_mode(
            dir.path(),
            "secret.toml",
            "postgres_url = \"postgres://u:pw@h/d\"\nkafka_brokers = \"k:1\"\n",
            0o604,
        );
        let with_property = file_with_mode(
            dir.path(),
            "property.toml",
            "postgres_url = \"postgres://u@h/d\"\nkafka_brokers = \"k:1\"\n\
             [kafka_properties]\n\"sasl.password\" = \"pw\"\n",
            0o644,
        );
        for file in [&with_password, &with_property] {
            let e = run(&["--config", file.to_str().unwrap()]).unwrap_err();
            assert!(e.contains("--config") && e.contains("chmod 600"), "{e}");
            assert!(
                run(&[
                    "--config",
                    file.to_str().unwrap(),
                    "--allow-world-readable-secrets"
                ])
                .is_ok()
            );
        }
        // Without a secret in it, anyone may read it.
        let public = file_with_mode(
            dir.path(),
            "public.toml",
            "postgres_url = \"postgres://u@h/d\"\nkafka_brokers = \"k:1\"\n",
            0o644,
        );
        assert!(run(&["--config", public.to_str().unwrap()]).is_ok());
    }
}
