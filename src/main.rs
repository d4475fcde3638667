//! The `walrelay` command: parses the configuration, sets up logging and the
//! runtime, and hands over to the library.
use std::io::BufWriter;
use std::process::ExitCode;

use clap::Parser;
use walrelay::config::{Cli, Command, HealthcheckArgs};
use walrelay::service::{self, ServiceError};
use walrelay::{check, demo, shutdown, tail};

/// jemalloc serves every allocation of the process, librdkafka's included.
/// Each event costs librdkafka a handful of small allocations on the thread
/// that decodes the stream, freed later on its delivery-report thread; glibc's
/// malloc handles that hand-over poorly (a fifth of walrelay's CPU time went
/// to `_int_malloc` in the drain benchmark), jemalloc's thread caches do not.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runtime failure.
const EXIT_FAILURE: u8 = 1;
/// Bad configuration or a failed check.
const EXIT_CONFIG: u8 = 2;
/// Halted (a poison row, a refused event, an unexpected change, an
/// invalidated or vanished slot): needs a person, not a restart.
const EXIT_HALT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A probe: no runtime, no logging set-up, one line out.
    if let Command::Healthcheck(args) = &cli.command {
        return healthcheck(args);
    }
    let log = walrelay::logging::init(cli.log_format);
    // `run` is one pipeline: one thread runs it, the socket it reads and the
    // timers it sets, so a message arriving wakes no other thread (librdkafka
    // has its own; blocking producer calls go to tokio's blocking pool). The
    // other commands write to stdout, which may block: on more threads, the
    // replication connection's status updates go on meanwhile.
    let runtime = if matches!(cli.command, Command::Run(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match cli.command {
        Command::Tail(args) => {
            let options = match args.validate() {
                Ok(options) => options,
                Err(error) => return config_error(&error),
            };
            let stdout = BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
            let result = runtime.block_on(tail::run(&options, stdout, stop()));
            exit(result.map_err(|e| (e.to_string(), EXIT_FAILURE)))
        }
        Command::Run(args) => {
            if let Some(slot) = &args.slot {
                log.set_slot(slot);
            }
            let config = match args.validate() {
                Ok(config) => config,
                Err(error) => return config_error(&error),
            };
            log.set_slot(&config.slot);
            let result = runtime.block_on(service::run(config, stop()));
            match result {
                // Said once, when it halted.
                Err(e) if e.halt_reason().is_some() => ExitCode::from(EXIT_HALT),
                result => exit(result.map_err(|e| {
                    let code = if matches!(e, ServiceError::Bind { .. }) {
                        EXIT_CONFIG
                    } else {
                        EXIT_FAILURE
                    };
                    (e.to_string(), code)
                })),
            }
        }
        Command::Check(args) => {
            let config = match args.validate() {
                Ok(config) => config,
                Err(error) => return config_error(&error),
            };
            log.set_slot(&config.slot);
            let findings = runtime.block_on(check::findings(&config));
            match check::report(&findings, &mut std::io::stdout().lock()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_CONFIG),
                Err(error) => exit(Err((
                    format!("cannot write the report: {error}"),
                    EXIT_FAILURE,
                ))),
            }
        }
        Command::Healthcheck(args) => healthcheck(&args),
        Command::Demo(args) => {
            log.set_slot(walrelay::config::DEFAULT_SLOT);
            let addr = match args.validate() {
                Ok(addr) => addr,
                Err(error) => return config_error(&error),
            };
            let result = runtime.block_on(demo::run(addr, stop(), std::io::stdout()));
            exit(result.map_err(|e| (e.to_string(), EXIT_FAILURE)))
        }
    }
}

/// `walrelay healthcheck`: 0 when the endpoint answers 200, 1 otherwise
/// (bad flags included: Docker reserves 2), printing the answer or why not.
fn healthcheck(args: &HealthcheckArgs) -> ExitCode {
    let result = args
        .validate()
        .map_err(|e| e.to_string())
        .and_then(|(addr, timeout)| {
            walrelay::healthcheck::check(addr, args.probe, timeout).map_err(|e| e.to_string())
        });
    match result {
        Ok(body) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("unhealthy: {why}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Completes on SIGINT or SIGTERM, logging which.
async fn stop() {
    let signal = shutdown::signal_received().await;
    tracing::info!(signal, "stopping");
}

fn config_error(error: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!("invalid configuration: {error}");
    ExitCode::from(EXIT_CONFIG)
}

fn exit(result: Result<(), (String, u8)>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            tracing::error!("{message}");
            ExitCode::from(code)
        }
    }
}
