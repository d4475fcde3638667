//! The `walrelay` command: parses the configuration, sets up logging and the
//! runtime, and hands over to the library.
use std::io::{BufWriter, IsTerminal};
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use walrelay::config::{Cli, Command, LogFormat};
use walrelay::{shutdown, tail};

/// Runtime failure.
const EXIT_FAILURE: u8 = 1;
/// Bad configuration or a failed check.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let Command::Tail(args) = cli.command;
    let options = match args.validate() {
        Ok(options) => options,
        Err(error) => {
            tracing::error!("invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let stdout = BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let result = runtime.block_on(tail::run(&options, stdout, async {
        let signal = shutdown::signal_received().await;
        tracing::info!(signal, "stopping");
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WALRELAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
