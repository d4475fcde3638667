//! `bank`: an event-sourced bank on walrelay, the reference for consuming
//! what walrelay publishes. See `examples/bank/README.md`.
//!
//! ```text
//! bank open/deposit/withdraw ──INSERT (aggregate_id, seq_nr)──► events table
//!        │  (optimistic concurrency: unique_violation → retry)      │ WAL
//!        │                                                           ▼
//!        │ --wait-published: pg_current_wal_lsn() vs /progress    walrelay ──► Kafka topic `events`
//!        ▼                                                                      │
//! bank balance --at-least-seq N ◄── balances (read model) ◄── bank consume ◄────┘
//!                                   + position per aggregate, one transaction per event
//! ```
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod account;
mod command;
mod consumer;
mod db;
mod load;
mod projection;
mod published;
mod query;
mod sandbox;
mod verify;

use account::Command;
use command::CommandError;

/// Exit code: the account's state refused the command.
const REFUSED: u8 = 3;
/// Exit code: every attempt lost the race for the next `seq_nr`.
const CONTENTION: u8 = 4;
/// Exit code: a bounded wait (read-your-writes, publication) ran out.
const TIMED_OUT: u8 = 5;
/// Exit code: `verify` or `load` found the read model wrong.
const MISMATCH: u8 = 6;

/// An event-sourced bank on walrelay: commands append events, a Kafka
/// consumer builds the balances.
#[derive(Debug, Parser)]
#[command(name = "bank", version)]
struct Cli {
    /// PostgreSQL URL (tokio-postgres form; no TLS) of the database that
    /// holds the events table and the read model.
    #[arg(long, env = "BANK_POSTGRES_URL", global = true, hide_env_values = true)]
    postgres_url: Option<String>,
    #[command(subcommand)]
    command: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Create the read model's tables (balances, positions) where missing.
    Setup,
    /// Open an account.
    Open {
        /// The account (the events' aggregate_id).
        account: String,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Deposit money.
    Deposit {
        /// The account.
        account: String,
        /// A positive whole amount.
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        amount: i64,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Withdraw money; refused (exit 3) when the balance would go negative.
    Withdraw {
        /// The account.
        account: String,
        /// A positive whole amount.
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        amount: i64,
        #[command(flatten)]
        options: CommandOptions,
    },
    /// Read an account's balance from the read model.
    Balance {
        /// The account.
        account: String,
        /// Wait until the read model has applied this seq_nr of the account
        /// (the one a command printed): read your own write.
        #[arg(long, default_value_t = 0)]
        at_least_seq: i64,
        /// How long to wait for it (then exit 5).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run the consumer that builds the read model, until SIGTERM or SIGINT.
    Consume(ConsumeArgs),
    /// Run concurrent clients with random commands; print a summary.
    Load(LoadArgs),
    /// Compare the read model with the events table (exit 6 on a difference).
    Verify {
        /// How long to wait for the consumer to catch up first.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// A throwaway PostgreSQL and mock Kafka cluster, until SIGTERM or SIGINT.
    Sandbox {
        /// Partitions of the topic `events`.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        /// Where walrelay's metrics endpoint is to listen (WALRELAY_METRICS_ADDR
        /// and BANK_WALRELAY_URL are set to it).
        #[arg(long, default_value = "127.0.0.1:9643")]
        metrics_addr: std::net::SocketAddr,
        /// Also write the environment to this file, once everything is up.
        #[arg(long)]
        env_file: Option<PathBuf>,
    },
}

/// Options of open, deposit and withdraw.
#[derive(Debug, Args)]
struct CommandOptions {
    /// Transactions to try before giving up (exit 4) when other writers keep
    /// appending to the account first.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    #[command(flatten)]
    publish: PublishOptions,
}

/// Waiting until walrelay has published an event.
#[derive(Debug, Args)]
struct PublishOptions {
    /// After the commit, wait until walrelay's /progress confirms the event
    /// is in Kafka.
    #[arg(long)]
    wait_published: bool,
    /// walrelay's metrics endpoint.
    #[arg(
        long,
        env = "BANK_WALRELAY_URL",
        default_value = "http://127.0.0.1:9643"
    )]
    walrelay_url: url::Url,
    /// How long --wait-published waits (then exit 5).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    publish_timeout: Duration,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "BANK_KAFKA_BROKERS")]
    kafka_brokers: String,
    /// The topic walrelay publishes to.
    #[arg(long, env = "BANK_TOPIC", default_value = "events")]
    topic: String,
    /// The consumer group.
    #[arg(long, default_value = "bank-balances")]
    group: String,
    /// More librdkafka consumer properties, key=value (repeatable).
    #[arg(long = "kafka-property", value_parser = key_value)]
    kafka_properties: Vec<(String, String)>,
    /// How long a partition stopped at a record it cannot apply waits
    /// before trying the record again.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    stuck_retry: Duration,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Accounts the clients share: fewer accounts, more races.
    #[arg(long, default_value_t = 10)]
    accounts: usize,
    /// Accounts are named PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "acc")]
    prefix: String,
    /// Commands per client (default: until --duration has passed).
    #[arg(long)]
    commands: Option<u64>,
    /// How long to run at most.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A client's pause after each command (default: none).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// Seed of the random commands.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Transactions per command before giving up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// After each appended event, read the balance at least at its seq_nr
    /// and check it (exit 6 when one is wrong or times out).
    #[arg(long)]
    read_your_writes: bool,
    /// How long a --read-your-writes read waits.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    read_timeout: Duration,
    #[command(flatten)]
    publish: PublishOptions,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?}: expected key=value"))
}

/// Completes on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn print(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).expect("serializable"));
}

/// An error for the user, and the exit code it gets.
struct Failure(u8, String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(1, e.to_string())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BANK_LOG")
                .unwrap_or_else(|_| "info,rdkafka=warn,tokio_postgres=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("bank: {message}");
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let url = || {
        cli.postgres_url
            .clone()
            .ok_or_else(|| Failure(2, "--postgres-url (or BANK_POSTGRES_URL) is needed".into()))
    };
    match cli.command {
        Action::Setup => {
            db::setup(&db::connect(&url()?).await?).await?;
        }
        Action::Open {
            ref account,
            ref options,
        } => {
            execute(&url()?, account, Command::Open, options).await?;
        }
        Action::Deposit {
            ref account,
            amount,
            ref options,
        } => {
            execute(&url()?, account, Command::Deposit(amount), options).await?;
        }
        Action::Withdraw {
            ref account,
            amount,
            ref options,
        } => {
            execute(&url()?, account, Command::Withdraw(amount), options).await?;
        }
        Action::Balance {
            ref account,
            at_least_seq,
            timeout,
        } => {
            let client = db::connect(&url()?).await?;
            match query::balance_at_least(&client, account, at_least_seq, timeout).await {
                Ok(reading) => print(&reading),
                Err(e @ query::QueryError::NotYet { .. }) => {
                    return Err(Failure(TIMED_OUT, e.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Action::Consume(ref args) => {
            let settings = consumer::Settings {
                brokers: args.kafka_brokers.clone(),
                topic: args.topic.clone(),
                group: args.group.clone(),
                properties: args.kafka_properties.clone(),
                stuck_retry: args.stuck_retry,
            };
            consumer::run(&url()?, &settings, terminated()).await?;
        }
        Action::Load(ref args) => load(&url()?, args).await?,
        Action::Verify { timeout } => {
            let client = db::connect(&url()?).await?;
            let report = verify::verify(&client, timeout).await?;
            print(&report);
            if !report.ok {
                return Err(Failure(
                    MISMATCH,
                    "the read model differs from the events table".into(),
                ));
            }
        }
        Action::Sandbox {
            partitions,
            metrics_addr,
            ref env_file,
        } => {
            sandbox::run(partitions, metrics_addr, env_file.as_deref(), terminated()).await?;
        }
    }
    Ok(())
}

/// Runs one command and prints what it appended.
async fn execute(
    url: &str,
    account: &str,
    command: Command,
    options: &CommandOptions,
) -> Result<(), Failure> {
    let mut client = db::connect(url).await?;
    let appended = match command::execute(&mut client, account, command, options.max_attempts).await
    {
        Ok(appended) => appended,
        Err(e @ CommandError::Refused(_)) => return Err(Failure(REFUSED, e.to_string())),
        Err(e @ CommandError::Contention { .. }) => return Err(Failure(CONTENTION, e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let publish = &options.publish;
    if publish.wait_published {
        published::wait(
            &publish.walrelay_url,
            &appended.wal_lsn,
            appended.wal_lsn_int,
            publish.publish_timeout,
        )
        .await
        .map_err(|e| Failure(TIMED_OUT, e.to_string()))?;
    }
    let mut json = serde_json::to_value(&appended).expect("serializable");
    json["published"] = serde_json::Value::Bool(publish.wait_published);
    print(&json);
    Ok(())
}

async fn load(url: &str, args: &LoadArgs) -> Result<(), Failure> {
    let plan = load::Plan {
        clients: args.clients,
        accounts: args.accounts,
        prefix: args.prefix.clone(),
        commands: args.commands,
        duration: args.duration,
        pause: args.pause,
        seed: args.seed,
        max_attempts: args.max_attempts,
        read_your_writes: args.read_your_writes.then_some(args.read_timeout),
        wait_published: args.publish.wait_published.then(|| {
            (
                args.publish.walrelay_url.clone(),
                args.publish.publish_timeout,
            )
        }),
    };
    // SIGTERM or SIGINT ends the run early, with a summary.
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = Arc::clone(&stop);
    tokio::spawn(async move {
        terminated().await;
        on_signal.store(true, Ordering::Relaxed);
    });
    let summary = load::run(url, &plan, stop).await;
    print(&summary);
    if summary.reads_failed > 0 || summary.publish_failed > 0 {
        return Err(Failure(
            MISMATCH,
            "some reads or publications were not as they should be".into(),
        ));
    }
    Ok(())
}
