//! Runs the bank example (`examples/bank`) as its user would: the built
//! binary, as a child process, configured by its environment.
//!
//! Cargo gives integration tests the paths of the package's binaries, not of
//! its examples; but `cargo test` and `cargo nextest run` build every example
//! with the tests, into `target/<profile>/examples/`, beside the `deps/`
//! directory the test binary runs from.
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

use super::walrelay::Walrelay;

/// The built example.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test binary>");
    let path = profile_dir.join("examples").join("bank");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` and `cargo nextest run` build it with the tests; \
         alone, `cargo build --example bank`",
        path.display()
    );
    path
}

/// The environment of the example's commands.
#[derive(Debug, Clone, Default)]
pub struct BankEnv {
    /// `BANK_POSTGRES_URL`.
    pub postgres_url: String,
    /// `BANK_KAFKA_BROKERS`.
    pub kafka_brokers: String,
    /// `BANK_WALRELAY_URL`.
    pub walrelay_url: String,
}

impl BankEnv {
    /// The variables that are set (an empty one would be an empty value),
    /// and `BANK_LOG` from the test's `BANK_TEST_LOG` (`debug`, for a
    /// failing test).
    fn vars(&self) -> Vec<(&'static str, String)> {
        [
            ("BANK_POSTGRES_URL", self.postgres_url.clone()),
            ("BANK_KAFKA_BROKERS", self.kafka_brokers.clone()),
            ("BANK_WALRELAY_URL", self.walrelay_url.clone()),
            (
                "BANK_LOG",
                std::env::var("BANK_TEST_LOG").unwrap_or_default(),
            ),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .collect()
    }

    /// Runs `bank ARGS...` to its end (bounded by `timeout`).
    pub async fn run_for(&self, args: &[&str], timeout: Duration) -> Output {
        let mut command = Command::new(binary());
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.vars())
            .kill_on_drop(true);
        tokio::time::timeout(timeout, command.output())
            .await
            .unwrap_or_else(|_| panic!("bank {args:?} did not end within {timeout:?}"))
            .expect("run bank")
    }

    /// Runs `bank ARGS...` to its end, within a minute.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_for(args, Duration::from_secs(60)).await
    }

    /// Runs `bank ARGS...`, which must succeed; returns its output.
    pub async fn ok(&self, args: &[&str]) -> Output {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "bank {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Runs `bank ARGS...`, which must succeed; returns its stdout parsed as
    /// one JSON value.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let output = self.ok(args).await;
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "bank {args:?} printed {:?}: {e}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Starts `bank ARGS...` in the background (the consumer, a load).
    pub fn spawn(&self, args: &[&str]) -> Walrelay {
        let vars = self.vars();
        let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Walrelay::spawn_program(binary(), args, &env)
    }
}

/// The exit code of a finished command.
pub fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {}", output.status))
}
