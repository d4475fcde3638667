//! Configuration: command-line flags, each also settable as `WALRELAY_<NAME>`,
//! checked before anything connects.
//!
//! Every problem is reported naming the setting, and exits with code 2.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::event::{TableName, TopicTemplate};
use crate::pg::params::{ConnectParams, ParamsError};
use crate::tail::TailOptions;

/// The default publication.
pub const DEFAULT_PUBLICATION: &str = "walrelay_events";
/// The default events table.
pub const DEFAULT_TABLE: &str = "public.events";
/// The default topic.
pub const DEFAULT_TOPIC: &str = "events";

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
        let Command::Tail(tail) = cli.command;
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
