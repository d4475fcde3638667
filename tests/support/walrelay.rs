//! Runs the built `walrelay` binary as a child process, as an operator would,
//! and collects what it prints.
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The lines a stream produced so far.
type Lines = Arc<Mutex<Vec<String>>>;

/// A running `walrelay` process.
pub struct Walrelay {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl Walrelay {
    /// Starts `walrelay ARGS...` with `env` added to a clean environment
    /// (no PG* or WALRELAY_* variables leak in from the test runner).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_walrelay"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // WALRELAY_TEST_LOG=debug makes the children log more, for a failing test.
            .env(
                "WALRELAY_LOG",
                std::env::var("WALRELAY_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn walrelay");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Walrelay {
            child,
            stdout,
            stderr,
        }
    }

    /// Starts `walrelay tail` on `url` and waits until its slot exists, so
    /// that everything committed afterwards is shown.
    pub async fn tail(url: &str, extra: &[&str]) -> Self {
        let mut args = vec!["tail", "--postgres-url", url];
        args.extend_from_slice(extra);
        let mut w = Self::spawn(&args, &[]);
        w.wait_for_stderr("tailing", Duration::from_secs(30)).await;
        w
    }

    /// Waits until a stderr line contains `needle`; panics with all output on timeout or exit.
    pub async fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers drain what it printed last.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "walrelay exited ({status}) before printing {needle:?}:\n{}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {timeout:?}:\n{}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` stderr lines contain `needle`.
    pub async fn wait_for_stderr_count(&mut self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            if count >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{count} of {n} {needle:?} within {timeout:?}:\n{}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until stdout has at least `n` lines and returns the first `n`.
    pub async fn wait_for_lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let lines = self.stdout.lock().unwrap();
                if lines.len() >= n {
                    return lines[..n].to_vec();
                }
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} lines within {timeout:?}; stderr:\n{}",
                    lines.len(),
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// All stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// All stderr so far, one string.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Sends `signal` without waiting (SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id().expect("still running")).unwrap());
        kill(pid, signal).expect("signal walrelay");
    }

    /// Sends `signal` and waits (bounded) for the exit.
    pub async fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id().expect("still running")).unwrap());
        kill(pid, signal).expect("signal walrelay");
        self.wait(Duration::from_secs(30)).await
    }

    /// Waits (bounded) for the process to exit on its own.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "walrelay did not exit within {timeout:?}:\n{}",
                    self.stderr_text()
                )
            })
            .expect("wait for walrelay");
        // The pipes close with the process; give the readers a moment to finish.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let sink = Arc::clone(&lines);
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Walrelay {
    /// Starts `walrelay run` against `postgres_url` and `brokers`, with the
    /// metrics endpoint on a free local port, and waits until it streams.
    pub async fn run(
        postgres_url: &str,
        brokers: &str,
        extra: &[&str],
    ) -> (Self, std::net::SocketAddr) {
        let metrics = free_local_addr();
        let metrics_arg = metrics.to_string();
        let mut args = vec![
            "run",
            "--postgres-url",
            postgres_url,
            "--kafka-brokers",
            brokers,
            "--metrics-addr",
            &metrics_arg,
        ];
        args.extend_from_slice(extra);
        let mut w = Self::spawn(&args, &[]);
        w.wait_for_stderr("streaming", Duration::from_secs(60))
            .await;
        (w, metrics)
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

/// A local address nothing listens on right now.
pub fn free_local_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

/// `GET path` over HTTP/1.0; returns the status code and body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of an integer metric (summed over its labels).
pub fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
