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
        Self::spawn_program(env!("CARGO_BIN_EXE_walrelay"), args, env)
    }

    /// Starts another `program` (the bank example) the same way: a clean
    /// environment plus `env`, its output collected, killed when dropped.
    pub fn spawn_program(
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(program.as_ref());
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
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", program.as_ref()));
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
        self.wait_for_stderr_line(&format!("{needle:?}"), timeout, |l| {
            l.contains(needle).then_some(())
        })
        .await;
    }

    /// Waits until `find` returns something for a stderr line, and returns
    /// that; panics with all output on timeout or exit. `what` names what
    /// is waited for in the panic message.
    async fn wait_for_stderr_line<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        find: impl Fn(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.stderr.lock().unwrap().iter().find_map(|l| find(l));
            if let Some(found) = found {
                return found;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers drain what it printed last.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "walrelay exited ({status}) before printing {what}:\n{}",
                    self.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}:\n{}",
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
        kill(self.pid(), signal).expect("signal walrelay");
    }

    /// Sends `signal` and waits (bounded) for the exit.
    pub async fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        self.signal(signal);
        self.wait(Duration::from_secs(30)).await
    }

    /// Sends SIGKILL and asserts that the process died of it (and had not
    /// exited on its own before).
    pub async fn kill(&mut self) {
        use std::os::unix::process::ExitStatusExt as _;
        let status = self.stop_with(Signal::SIGKILL).await;
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "walrelay did not die of the SIGKILL ({status}):\n{}",
            self.stderr_text()
        );
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

/// What `--metrics-addr` is given: the system picks a free port when
/// walrelay binds, so no other process can take it between a probe and the
/// bind; [`Walrelay::metrics_addr`] reads the port from walrelay's log.
pub const ANY_LOCAL_PORT: &str = "127.0.0.1:0";

impl Walrelay {
    /// Starts `walrelay run` against `postgres_url` and `brokers`, with the
    /// metrics endpoint on a port of the system's choosing, and waits until
    /// it streams. Returns the process and its metrics address.
    pub async fn run(
        postgres_url: &str,
        brokers: &str,
        extra: &[&str],
    ) -> (Self, std::net::SocketAddr) {
        let mut w = Self::start(postgres_url, brokers, extra);
        let metrics = w.metrics_addr().await;
        w.wait_for_stderr("streaming", Duration::from_secs(60))
            .await;
        (w, metrics)
    }

    /// Starts `walrelay run` like [`run`](Self::run) without waiting for
    /// anything: for an instance that is to stand by, or to fail.
    pub fn start(postgres_url: &str, brokers: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "run",
            "--postgres-url",
            postgres_url,
            "--kafka-brokers",
            brokers,
            "--metrics-addr",
            ANY_LOCAL_PORT,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args, &[])
    }

    /// The address the metrics endpoint is bound to, from the `starting`
    /// line walrelay logs once it has bound it (`addr=127.0.0.1:40123`).
    pub async fn metrics_addr(&mut self) -> std::net::SocketAddr {
        // Bounded generously: `demo` starts a PostgreSQL of its own first.
        let found = self
            .wait_for_stderr_line(
                "a `starting ... addr=` line",
                Duration::from_secs(120),
                |line| {
                    line.contains(" starting ")
                        .then(|| {
                            line.split_whitespace()
                                .find_map(|field| field.strip_prefix("addr="))
                        })
                        .flatten()
                        .map(str::to_owned)
                },
            )
            .await;
        found
            .parse()
            .unwrap_or_else(|err| panic!("addr={found}: {err}"))
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().expect("still running")).unwrap())
    }
}

/// A local address nothing listened on when it was probed. Another process
/// can take it before walrelay binds it: prefer [`ANY_LOCAL_PORT`] and
/// [`Walrelay::metrics_addr`].
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

/// The value of an integer metric: `name` summed over its labelled series,
/// or one series when `name` carries its labels as exported
/// (`walrelay_reconnects_total{target="postgres"}`).
///
/// Panics when no series matches, so that a misspelled or unexported name
/// fails the test instead of reading as 0, and when a value is not a
/// non-negative integer.
pub fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    metric_in(&body, name).unwrap_or_else(|| panic!("no metric {name} in /metrics:\n{body}"))
}

/// Polls [`metric`] every few milliseconds until `condition` holds for its
/// value, and returns that value; panics after `timeout`.
pub async fn wait_for_metric(
    addr: std::net::SocketAddr,
    name: &str,
    condition: impl Fn(u64) -> bool,
    timeout: Duration,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = metric(addr, name);
        if condition(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still {value} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until the instance at `addr` halted for `reason` (one of
/// `walrelay_halted`'s reasons): it stays up, not ready, until stopped.
pub async fn wait_halted(addr: std::net::SocketAddr, reason: &str, timeout: Duration) {
    wait_for_metric(
        addr,
        &format!("walrelay_halted{{reason=\"{reason}\"}}"),
        |v| v == 1,
        timeout,
    )
    .await;
}

/// [`metric`] on an exposition already fetched; `None` when no series matches.
pub fn metric_in(body: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let matches = if name.contains('{') {
            series == name
        } else {
            series == name
                || series
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{'))
        };
        if !matches {
            continue;
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|err| panic!("{line:?}: not a number: {err}"));
        assert!(
            value >= 0.0 && value.fract() == 0.0 && value < 2f64.powi(63),
            "{line:?}: not a non-negative integer"
        );
        // Checked just above: a whole number in u64's range.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = value as u64;
        *found.get_or_insert(0) += value;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::metric_in;

    const BODY: &str = "# HELP walrelay_reconnects_total Connections re-established.\n\
        # TYPE walrelay_reconnects_total counter\n\
        walrelay_reconnects_total{target=\"kafka\"} 2\n\
        walrelay_reconnects_total{target=\"postgres\"} 3\n\
        walrelay_inflight_events 0\n\
        walrelay_inflight_events_max 7\n";

    #[test]
    fn a_metric_is_summed_over_its_series_and_missing_is_none() {
        assert_eq!(metric_in(BODY, "walrelay_reconnects_total"), Some(5));
        assert_eq!(
            metric_in(BODY, "walrelay_reconnects_total{target=\"postgres\"}"),
            Some(3)
        );
        // Exported at 0 is 0; a name that is only a prefix of another is not it.
        assert_eq!(metric_in(BODY, "walrelay_inflight_events"), Some(0));
        assert_eq!(metric_in(BODY, "walrelay_inflight"), None);
        assert_eq!(metric_in(BODY, "walrelay_reconnect_total"), None);
        assert_eq!(
            metric_in(BODY, "walrelay_reconnects_total{target=\"x\"}"),
            None
        );
    }
}
