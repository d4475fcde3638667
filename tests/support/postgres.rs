//! A real, throwaway Postgres cluster for one test.
//!
//! ```text
//! which binaries:               PgOptions::version, $WALRELAY_TEST_PG_VERSION, the system's (pg_versions.rs)
//! first start in a target dir:  initdb ──► $CARGO_TARGET_TMPDIR/pg-template-<version>-<build>-u<uid>
//! every start:                  cp -a template ──► /dev/shm/walrelay-pg-XXXX/data
//!                               write TLS files, pg_hba.conf, harness.conf (port, wal_level, ...)
//!                               pg_ctl start -w   (new port and again if the port was taken)
//!                               CREATE DATABASE walrelay_test; psql -f sql/*.sql; test roles
//! drop:                         pg_ctl stop -m immediate; remove /dev/shm/walrelay-pg-XXXX
//! first start in a process:     remove what killed tests left (see `clean_stale_dirs`)
//! ```
//!
//! Things that are easy to get wrong here:
//! - nextest runs every test in its own process, so nothing can be shared in
//!   memory. initdb (about a second) runs once per target dir and Postgres
//!   version; its result appears under its final name with one `rename`, so a
//!   concurrent test process sees either no template or a complete one.
//! - `postgres`, `pg_ctl` and `initdb` refuse to run as root, and CI runs as
//!   root. Then they run as `nobody`, which must be able to reach every file
//!   they touch: the cluster lives in /dev/shm or the system temp dir (both
//!   world-traversable), never under a path such as /root/... that `nobody`
//!   cannot enter.
//! - Everything that waits on the server is `async`. A test drives walrelay in
//!   the same (single-threaded) runtime, and a clean shutdown waits for the
//!   walsender's client to confirm the last WAL: a blocking `pg_ctl stop` would
//!   keep walrelay from answering and hang until `wal_sender_timeout`.
//! - nextest kills a test that runs past its timeout; its cluster's
//!   directory stays behind (and its server too: `pg_ctl` starts the
//!   postmaster in a session of its own, out of reach of the kill). Each
//!   harness holds an exclusive `flock` on `harness.lock` in its directory for
//!   as long as it lives, so a later start can tell a directory whose test
//!   died (lock free) from one in use (lock held), even in another process.
//! - `pg_hba.conf` is matched by database name for logical replication
//!   connections (`replication=database`); the `replication` keyword only
//!   matches physical replication. The file lists both so either kind works.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _, chown};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;
use walrelay::pg::lsn::Lsn;

use super::pg_versions;

/// The database every test cluster has, with `sql/*.sql` applied.
pub const DATABASE: &str = "walrelay_test";

/// The superuser; trusted over the unix socket, SCRAM over TCP.
pub const SUPERUSER: &str = "postgres";
/// The superuser's password over TCP.
pub const SUPERUSER_PASSWORD: &str = "postgres-pw";

/// A role that must authenticate with SCRAM-SHA-256.
pub const SCRAM_USER: &str = "scram_user";
/// `scram_user`'s password; distinctive so a test can assert it never shows up in output.
pub const SCRAM_PASSWORD: &str = "s3cr3t-scram-Zq9";

/// A role that must authenticate with MD5 (its password is stored as an MD5 hash,
/// otherwise Postgres would silently upgrade the `md5` method to SCRAM).
pub const MD5_USER: &str = "md5_user";
/// `md5_user`'s password.
pub const MD5_PASSWORD: &str = "s3cr3t-md5-Kx4";

/// A role that must send its password in clear text (the `password` method).
pub const PLAIN_USER: &str = "plain_user";
/// `plain_user`'s password.
pub const PLAIN_PASSWORD: &str = "s3cr3t-plain-Wv7";

/// A role that needs no password at all (`trust`).
pub const TRUST_USER: &str = "trust_user";

/// How the server reaches the test roles' clients over TCP.
const SERVER_ADDR: &str = "127.0.0.1";

/// The unprivileged account the server runs as when the tests run as root.
/// 65534 is `nobody` (and `nogroup`) on Debian, Ubuntu and most other systems.
const NOBODY: u32 = 65534;

/// Generous bound for `pg_ctl -w` (start, stop, restart): a loaded CI machine
/// with 2 cores can take several seconds for crash recovery.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Attempts at finding a port no other process takes between our probe and
/// the server's bind.
const PORT_ATTEMPTS: usize = 5;

/// A login role of the test cluster and how `pg_hba.conf` makes it
/// authenticate over TCP.
#[derive(Debug, Clone, Copy)]
pub struct TestRole {
    /// Role name.
    pub name: &'static str,
    /// Its password, `None` for `trust_user`.
    pub password: Option<&'static str>,
    /// The `pg_hba.conf` method for it.
    pub method: &'static str,
}

/// The four login roles every test cluster has, each with LOGIN REPLICATION
/// and SELECT on `events`, like the production role of `sql/004_role.sql`.
pub const TEST_ROLES: [TestRole; 4] = [
    TestRole {
        name: SCRAM_USER,
        password: Some(SCRAM_PASSWORD),
        method: "scram-sha-256",
    },
    TestRole {
        name: MD5_USER,
        password: Some(MD5_PASSWORD),
        method: "md5",
    },
    TestRole {
        name: PLAIN_USER,
        password: Some(PLAIN_PASSWORD),
        method: "password",
    },
    TestRole {
        name: TRUST_USER,
        password: None,
        method: "trust",
    },
];

/// How to configure a test cluster.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `wal_level`; `"replica"` makes a server walrelay must refuse.
    pub wal_level: &'static str,
    /// Serve TLS with a certificate for `localhost` and `127.0.0.1`, signed by
    /// a fresh CA whose certificate is at [`PgServer::ca_cert_path`].
    pub tls: bool,
    /// More `postgresql.conf` lines, applied last so they win.
    pub extra_conf: Vec<String>,
    /// The PostgreSQL major to run (14-18), for a test about one version's
    /// behaviour; `None` runs the test run's version (`$WALRELAY_TEST_PG_VERSION`,
    /// else the system's: see `pg_versions`).
    pub version: Option<u32>,
    /// The names in the server's certificate.
    pub cert_names: CertNames,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            wal_level: "logical",
            tls: true,
            extra_conf: Vec::new(),
            version: None,
            cert_names: CertNames::default(),
        }
    }
}

/// The names a test server's certificate carries.
#[derive(Debug, Clone)]
pub struct CertNames {
    /// subjectAltName entries: DNS names, or IP addresses where they parse as one.
    pub subject_alt_names: Vec<&'static str>,
    /// The subject's Common Name.
    pub common_name: &'static str,
}

impl Default for CertNames {
    /// `localhost` and `127.0.0.1` as subjectAltNames, `localhost` as CN.
    fn default() -> Self {
        CertNames {
            subject_alt_names: vec!["localhost", SERVER_ADDR],
            common_name: "localhost",
        }
    }
}

/// A running throwaway cluster. Dropping it kills the server and removes
/// every file it had.
pub struct PgServer {
    bin_dir: PathBuf,
    /// The `psql` for the harness's SQL: the npm packages have none.
    psql: PathBuf,
    /// Holds data dir, sockets, log and TLS files; removed on drop.
    dir: TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    ca_cert_path: Option<PathBuf>,
    port: u16,
    run_as: Option<u32>,
    version_num: u32,
    /// Held while this harness lives: tells `clean_stale_dirs` of other
    /// processes that the directory is in use. Dropped last, after the
    /// server stopped and the directory was removed.
    _lock: Flock<fs::File>,
}

/// The prefix of every cluster directory the harness makes.
const DIR_PREFIX: &str = "walrelay-pg-";
/// The prefix of initdb's scratch directories.
const INITDB_PREFIX: &str = "walrelay-initdb-";
/// The lock file in a cluster directory.
const LOCK_FILE: &str = "harness.lock";
/// A directory without a lock file (made by an older harness, or one being
/// made right now) counts as abandoned only when nothing in it changed for
/// this long and no server runs there.
const UNLOCKED_IDLE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

impl PgServer {
    /// Starts a cluster with the default options: `wal_level=logical`, TLS on.
    pub async fn start_default() -> Self {
        Self::start(PgOptions::default()).await
    }

    /// Starts a cluster, creates [`DATABASE`] with the project's schema, and
    /// the [`TEST_ROLES`]. Panics, with the server log's tail, if it cannot.
    pub async fn start(opts: PgOptions) -> Self {
        static CLEANED: std::sync::Once = std::sync::Once::new();
        let started = Instant::now();
        let bin_dir = pg_versions::server_bin_dir(opts.version);
        let run_as = running_as_root().then_some(NOBODY);
        CLEANED.call_once(|| clean_stale_dirs(&bin_dir));
        let (template, template_fresh) = template(&bin_dir, run_as).await;

        let dir = scratch_dir(DIR_PREFIX);
        let lock = lock_dir(dir.path());
        // The server creates its socket, lock file and log here.
        set_mode(dir.path(), 0o755);
        give_to(dir.path(), run_as);

        let data_dir = dir.path().join("data");
        run_std(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&template)
                .arg(&data_dir),
        );

        let ca_cert_path = opts
            .tls
            .then(|| write_tls_files(dir.path(), run_as, &opts.cert_names));
        write_server_file(&data_dir.join("pg_hba.conf"), &hba_conf(), run_as);
        // Our settings live in their own file so a retry on another port, or a
        // restart, needs no editing of postgresql.conf.
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data_dir.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(conf, "\ninclude = 'harness.conf'").expect("append to postgresql.conf");

        let mut server = Self {
            psql: pg_versions::psql_path(&bin_dir),
            bin_dir,
            log_path: dir.path().join("server.log"),
            data_dir,
            dir,
            ca_cert_path,
            port: 0,
            run_as,
            version_num: 0,
            _lock: lock,
        };
        server.start_on_free_port(&opts).await;

        server
            .psql_in("postgres", &format!("CREATE DATABASE {DATABASE};"))
            .await
            .unwrap_or_else(|err| panic!("CREATE DATABASE failed: {err}"));
        server.apply_schema().await;
        server.psql(&roles_sql()).await;
        server.version_num = server
            .psql("SHOW server_version_num")
            .await
            .parse()
            .expect("server_version_num is a number");

        eprintln!(
            "postgres {} on port {} ready in {} ms ({})",
            server.version_num,
            server.port,
            started.elapsed().as_millis(),
            if template_fresh {
                "ran initdb"
            } else {
                "from the cached template"
            },
        );
        server
    }

    /// Picks a free port and starts the server on it, again on another port
    /// when someone else bound it between our probe and the server's bind.
    async fn start_on_free_port(&mut self, opts: &PgOptions) {
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port();
            let conf = harness_conf(
                opts,
                self.port,
                self.dir.path(),
                self.ca_cert_path.is_some(),
            );
            write_server_file(&self.data_dir.join("harness.conf"), &conf, self.run_as);

            // The log is appended to: only this attempt's part tells why it failed.
            let log_len_before = fs::read(&self.log_path).map_or(0, |log| log.len());
            let output = self.pg_ctl(&["start"]).await;
            if output.status.success() {
                return;
            }
            let log = fs::read(&self.log_path).unwrap_or_default();
            let attempt_log =
                String::from_utf8_lossy(log.get(log_len_before..).unwrap_or_default());
            if !attempt_log.contains("Address already in use") {
                self.fail("pg_ctl start", &output);
            }
        }
        panic!(
            "no free port for PostgreSQL after {PORT_ATTEMPTS} attempts\n{}",
            self.log_tail(40)
        );
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM) that signed the server's certificate; `None`
    /// when the cluster was started with `tls: false`.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        self.ca_cert_path.clone()
    }

    /// The URL query that verifies the server's certificate and host name
    /// (`sslmode=verify-full` with this cluster's CA); panics without TLS. A
    /// standby made from a copy of this cluster serves the same certificate.
    pub fn verify_full_params(&self) -> String {
        format!(
            "sslmode=verify-full&sslrootcert={}",
            self.ca_cert_path().expect("TLS is on").display()
        )
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of the server binaries in use (`initdb`, `pg_ctl`,
    /// `postgres`; `psql` only where the system installed them: see
    /// [`psql_path`](Self::psql_path)).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A `psql` that talks to this server.
    pub fn psql_path(&self) -> &Path {
        &self.psql
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `server_version_num`, e.g. 150014.
    pub fn version_num(&self) -> u32 {
        self.version_num
    }

    /// The major version, e.g. 15.
    pub fn major(&self) -> u32 {
        self.version_num / 10_000
    }

    /// `postgres://user[:password]@127.0.0.1:PORT/walrelay_test[?params]`,
    /// with user and password percent-encoded; `params` is used as given
    /// (e.g. `"sslmode=disable"`, or `""` for none).
    pub fn url(&self, user: &str, password: Option<&str>, params: &str) -> String {
        build_url(self.port, user, password, params)
    }

    /// The superuser over TCP, without TLS.
    pub fn superuser_url(&self) -> String {
        self.url(SUPERUSER, Some(SUPERUSER_PASSWORD), "sslmode=disable")
    }

    /// An ordinary (not replication) connection as the superuser, without
    /// TLS. Its connection task runs on the current runtime until the client
    /// is dropped.
    pub async fn client(&self) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host(SERVER_ADDR)
            .port(self.port)
            .user(SUPERUSER)
            .password(SUPERUSER_PASSWORD)
            .dbname(DATABASE)
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("connect as {SUPERUSER}: {err}"));
        tokio::spawn(async move {
            // Ends with an error when the test restarts or stops the server;
            // the client's next call reports that, so this only notes it.
            if let Err(err) = connection.await {
                eprintln!("superuser connection closed: {err}");
            }
        });
        client
    }

    /// Runs SQL as the superuser in [`DATABASE`] and returns psql's unaligned,
    /// tuples-only output (`-At`: one row a line, columns split by `|`),
    /// without the last newline. Panics with psql's error on failure.
    ///
    /// The SQL is fed on stdin, so each statement runs on its own (unlike
    /// `psql -c`, which sends one multi-statement string as one transaction).
    pub async fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .await
            .unwrap_or_else(|err| panic!("psql failed: {err}\nSQL:\n{sql}"))
    }

    /// Like [`psql`](Self::psql), but an error (psql's stderr) is returned:
    /// for tests that expect the server to refuse something.
    pub async fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.psql_in(DATABASE, sql).await
    }

    /// Applies `sql/*.sql` to [`DATABASE`] in name order, each file on its
    /// own as an operator does. The files must be safe to apply again, so a
    /// test may call this on a cluster that already has them.
    pub async fn apply_schema(&self) {
        for file in schema_files() {
            let output = self
                .psql_command(DATABASE)
                .arg("-q")
                .arg("-f")
                .arg(&file)
                .stdin(Stdio::null())
                .output()
                .await
                .expect("run psql");
            if !output.status.success() {
                self.fail(&format!("psql -f {}", file.display()), &output);
            }
        }
    }

    /// Restarts the server (`pg_ctl restart -m fast`) on the same port, or
    /// starts it again after [`stop`](Self::stop). A fast shutdown waits for
    /// walsenders to send all WAL to their clients, so keep walrelay running
    /// meanwhile.
    pub async fn restart(&self) {
        let output = self.pg_ctl(&["restart", "-m", "fast"]).await;
        if !output.status.success() {
            self.fail("pg_ctl restart", &output);
        }
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`); [`restart`](Self::restart)
    /// starts it again.
    pub async fn stop(&self) {
        let output = self.pg_ctl(&["stop", "-m", "fast"]).await;
        if !output.status.success() {
            self.fail("pg_ctl stop", &output);
        }
    }

    /// Kills the server the way a crash would (`pg_ctl stop -m immediate`:
    /// no shutdown checkpoint, clients cut off mid-stream, crash recovery at
    /// the next start).
    pub async fn crash(&self) {
        let output = self.pg_ctl(&["stop", "-m", "immediate"]).await;
        if !output.status.success() {
            self.fail("pg_ctl stop -m immediate", &output);
        }
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Where each logical decoding session of `slot` started, in the order
    /// they started: the server logs, for every `START_REPLICATION`, the
    /// slot's `confirmed_flush_lsn` it resumes from ("Streaming transactions
    /// committing after X/Y"), and sends every transaction whose commit
    /// record starts at or after it. Replays are bounded by these.
    pub fn decoding_sessions(&self, slot: &str) -> Vec<Lsn> {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        parse_decoding_sessions(&log, slot)
    }

    /// Terminates the walsender streaming from `slot` (`pg_terminate_backend`),
    /// as an operator or a failing network would; returns whether one was.
    pub async fn terminate_walsender(&self, slot: &str) -> bool {
        self.psql(&format!(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
             WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
        ))
        .await
            == "1"
    }

    /// Opens a replication connection (`replication=database`) as the
    /// superuser and keeps it open and idle until the returned process is
    /// dropped: it takes one of `max_wal_senders`.
    pub async fn hold_wal_sender(&self) -> tokio::process::Child {
        let count = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'";
        let before: u32 = self.psql(count).await.parse().expect("a count");
        let mut cmd = Command::new(&self.psql);
        clear_pg_env(cmd.as_std_mut());
        let child = cmd
            .args(["-X", "-q"])
            .arg(format!(
                "host={} port={} user={SUPERUSER} dbname={DATABASE} replication=database",
                self.dir.path().display(),
                self.port
            ))
            // psql reads its commands from here, and none come.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run psql");
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while self.psql(count).await.parse::<u32>().expect("a count") <= before {
            assert!(
                Instant::now() < deadline,
                "the replication connection did not show up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        child
    }

    async fn psql_in(&self, database: &str, sql: &str) -> Result<String, String> {
        let mut child = self
            .psql_command(database)
            .arg("-At")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        let mut stdin = child.stdin.take().expect("psql's stdin is piped");
        let sql = sql.to_owned();
        // Written concurrently with reading the output, so a large result
        // cannot fill the pipe while we are still writing.
        let write = async move {
            let result = stdin.write_all(sql.as_bytes()).await;
            drop(stdin);
            result
        };
        let (written, output) = tokio::join!(write, child.wait_with_output());
        let output = output.expect("wait for psql");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        written.expect("write SQL to psql");
        let mut stdout = String::from_utf8(output.stdout).expect("psql prints UTF-8");
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        Ok(stdout)
    }

    /// psql as the superuser over the unix socket (trusted), ignoring the
    /// caller's `~/.psqlrc` and `PG*` variables.
    fn psql_command(&self, database: &str) -> Command {
        let mut cmd = Command::new(&self.psql);
        clear_pg_env(cmd.as_std_mut());
        cmd.arg("-X")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
            ]);
        cmd
    }

    async fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        as_server_user(cmd.as_std_mut(), self.dir.path(), self.run_as);
        cmd.args(args)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run pg_ctl")
    }

    fn fail(&self, what: &str, output: &Output) -> ! {
        panic!(
            "{what} failed ({}):\n{}{}\n--- server log (tail) ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_tail(40),
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log (tail) of the failed test ---\n{}",
                self.log_tail(60)
            );
        }
        // Immediate: nothing of this cluster is worth a shutdown checkpoint.
        // `-w` so no server process writes into the directory while the
        // TempDir removes it. Errors are ignored: the server may be stopped
        // already, and a panic in drop would abort the test binary.
        stop_immediately(&self.bin_dir, self.dir.path(), &self.data_dir, self.run_as);
    }
}

/// `pg_ctl stop -m immediate -w` of the cluster in `data`, as `run_as`, with
/// `dir` as the working directory, blocking; returns whether it succeeded.
fn stop_immediately(bin_dir: &Path, dir: &Path, data: &Path, run_as: Option<u32>) -> bool {
    let mut cmd = std::process::Command::new(bin_dir.join("pg_ctl"));
    as_server_user(&mut cmd, dir, run_as);
    cmd.args([
        "stop",
        "-m",
        "immediate",
        "-w",
        "-t",
        PG_CTL_TIMEOUT_SECS,
        "-D",
    ])
    .arg(data)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()
    .is_ok_and(|s| s.success())
}

/// Whether this process runs as root, in which case the server must run as
/// `nobody`.
pub fn running_as_root() -> bool {
    effective_uid() == 0
}

/// Asked of the file system (a file we create is owned by our effective
/// uid), which needs neither `unsafe` libc calls nor /proc.
fn effective_uid() -> u32 {
    static UID: OnceLock<u32> = OnceLock::new();
    *UID.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        tempfile::tempfile()
            .and_then(|probe| probe.metadata())
            .expect("create and stat a probe file in the temp dir")
            .uid()
    })
}

/// The initdb'd template for these binaries, made on first use. Returns its
/// path and whether this call ran initdb (for the timing note).
async fn template(bin_dir: &Path, run_as: Option<u32>) -> (PathBuf, bool) {
    // "15.14": data directories of one release are interchangeable.
    let version = pg_versions::initdb_version(bin_dir);
    // The owner is part of the name: a template made for `nobody` is no use
    // to an ordinary user, and the other way round. So is the build (Debian's
    // 15.18 and npm's 15.18 may differ in compile options): by its path.
    let uid = run_as.unwrap_or_else(effective_uid);
    let build = {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bin_dir.hash(&mut hasher);
        hasher.finish() & 0xffff_ffff
    };
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let template = cache.join(format!("pg-template-{version}-{build:08x}-u{uid}"));
    if template.join("PG_VERSION").is_file() {
        return (template, false);
    }

    // initdb runs in a scratch dir that `nobody` can reach, then the result
    // is copied next to the template's final path, to be renamed into place:
    // rename is atomic within one file system.
    let scratch = scratch_dir(INITDB_PREFIX);
    set_mode(scratch.path(), 0o755);
    give_to(scratch.path(), run_as);
    let data = scratch.path().join("data");
    let mut initdb = Command::new(bin_dir.join("initdb"));
    as_server_user(initdb.as_std_mut(), scratch.path(), run_as);
    // Trust here; each cluster's own pg_hba.conf replaces initdb's.
    // --no-sync: the template is a cache of throwaway data, not worth fsyncs
    // (after a machine crash, delete target/tmp/pg-template-*).
    let output = initdb
        .arg("-D")
        .arg(&data)
        .args([
            "--auth=trust",
            "-U",
            SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run initdb");
    assert!(
        output.status.success(),
        "initdb failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    fs::create_dir_all(cache).expect("create CARGO_TARGET_TMPDIR");
    let staging = tempfile::Builder::new()
        .prefix(".pg-template-staging-")
        .tempdir_in(cache)
        .expect("create staging dir");
    let staged = staging.path().join("data");
    run_std(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(&staged),
    );
    if let Err(err) = fs::rename(&staged, &template) {
        // Another test process renamed its template first: use that one.
        assert!(
            template.join("PG_VERSION").is_file(),
            "move the template into {}: {err}",
            template.display()
        );
    }
    (template, true)
}

/// A new directory for a cluster (or initdb), in /dev/shm where there is
/// one: on this project's machines copying the template to tmpfs takes 70 ms
/// against 400-1000 ms on the disk, and CREATE DATABASE 40 ms against 300.
/// Falls back to the system temp dir. Both are world-traversable, as the
/// server's user (`nobody` under root) needs.
fn scratch_dir(prefix: &str) -> TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    builder
        .tempdir_in("/dev/shm")
        .or_else(|_| builder.tempdir())
        .unwrap_or_else(|err| panic!("create a {prefix}* temp dir: {err}"))
}

/// Takes the lock that marks `dir` as in use for as long as the returned
/// guard lives.
fn lock_dir(dir: &Path) -> Flock<fs::File> {
    let file = fs::File::create(dir.join(LOCK_FILE))
        .unwrap_or_else(|err| panic!("create {}/{LOCK_FILE}: {err}", dir.display()));
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .unwrap_or_else(|(_, err)| panic!("lock {}/{LOCK_FILE}: {err}", dir.display()))
}

/// Removes the cluster directories that tests killed before their drop ran
/// left in /dev/shm and the temp dir. Only directories named as the harness
/// names them are looked at, and of those only the ones nobody uses:
/// - with a lock file: its lock is free, so the process that made it is
///   gone. Its server, if it still runs, is stopped (immediate) first: it
///   belongs to a test that no longer exists.
/// - without one (an older harness, or one being made this instant): no
///   server runs there and nothing in it changed for [`UNLOCKED_IDLE`].
fn clean_stale_dirs(bin_dir: &Path) {
    let roots = [PathBuf::from("/dev/shm"), std::env::temp_dir()];
    for entry in roots
        .iter()
        .filter_map(|r| fs::read_dir(r).ok())
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !(name.starts_with(DIR_PREFIX) || name.starts_with(INITDB_PREFIX))
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let data = path.join("data");
        let _guard = match fs::File::open(path.join(LOCK_FILE)) {
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(guard) => Some(guard),
                // Held: a live test's cluster.
                Err(_) => continue,
            },
            Err(_) if postmaster_running(&data) || !idle_for(&path, UNLOCKED_IDLE) => continue,
            Err(_) => None,
        };
        if postmaster_running(&data) {
            let owner = {
                use std::os::unix::fs::MetadataExt as _;
                fs::metadata(&data).map(|m| m.uid()).ok()
            };
            let run_as = owner.filter(|uid| *uid != effective_uid());
            if !stop_immediately(bin_dir, &path, &data, run_as) || postmaster_running(&data) {
                continue;
            }
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => eprintln!("removed {} left by a test that was killed", path.display()),
            Err(err) => eprintln!("cannot remove {}: {err}", path.display()),
        }
    }
}

/// Whether the postmaster of the data directory `data` runs: its
/// `postmaster.pid` names a live process.
fn postmaster_running(data: &Path) -> bool {
    let Ok(pid_file) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let Some(pid) = pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        // Being written: count it as running.
        return true;
    };
    // Signal 0 checks existence; EPERM means it exists under another user.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Whether neither `dir` nor anything directly in it, or in its `data`,
/// changed for `idle`.
fn idle_for(dir: &Path, idle: std::time::Duration) -> bool {
    let newest = [dir.to_path_buf(), dir.join("data"), dir.join("server.log")]
        .iter()
        .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    newest.is_some_and(|t| t.elapsed().is_ok_and(|age| age > idle))
}

/// The resume positions of `parse_decoding_sessions`'s log lines for `slot`.
fn parse_decoding_sessions(log: &str, slot: &str) -> Vec<Lsn> {
    let start = format!("LOG:  starting logical decoding for slot \"{slot}\"");
    let mut sessions = Vec::new();
    let mut lines = log.lines();
    while let Some(line) = lines.next() {
        let Some(at) = line.find(&start) else {
            continue;
        };
        // The DETAIL follows on the next line, with the same prefix
        // (time and PID): one message, written at once.
        let prefix = &line[..at];
        let detail = lines.next().unwrap_or_default();
        let lsn = detail
            .strip_prefix(prefix)
            .and_then(|d| d.strip_prefix("DETAIL:  Streaming transactions committing after "))
            .and_then(|d| d.split(',').next())
            .and_then(|lsn| lsn.parse().ok())
            .unwrap_or_else(|| panic!("no resume position after {line:?}: {detail:?}"));
        sessions.push(lsn);
    }
    sessions
}

/// `sql/*.sql` of this crate, in name order.
fn schema_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("read {}: {err}", dir.display()))
        .map(|entry| entry.expect("read sql/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .sql files in {}", dir.display());
    files
}

/// The settings every test cluster runs with (in `harness.conf`).
fn harness_conf(opts: &PgOptions, port: u16, dir: &Path, tls: bool) -> String {
    let mut conf = format!(
        "# Written by tests/support/postgres.rs for one test.\n\
         listen_addresses = '{SERVER_ADDR}'\n\
         port = {port}\n\
         unix_socket_directories = '{dir}'\n\
         wal_level = {wal_level}\n\
         max_replication_slots = 20\n\
         max_wal_senders = 20\n\
         # Throwaway data: durability would only cost time.\n\
         fsync = off\n\
         full_page_writes = off\n\
         wal_sender_timeout = '60s'\n\
         log_min_messages = warning\n",
        dir = dir.display(),
        wal_level = opts.wal_level,
    );
    if tls {
        let _ = write!(
            conf,
            "ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n",
            dir = dir.display()
        );
    }
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

/// `pg_hba.conf`: the superuser is trusted on the unix socket (the harness's
/// own psql); over TCP every role gets exactly its method, for ordinary and
/// physical-replication connections alike, and any other role is rejected.
/// `host` lines match TLS and plain TCP connections both.
fn hba_conf() -> String {
    let mut hba = String::from(
        "# Written by tests/support/postgres.rs for one test.\n\
         # TYPE  DATABASE     USER           ADDRESS        METHOD\n\
         local   all          postgres                      trust\n",
    );
    let roles = TEST_ROLES
        .iter()
        .map(|role| (role.name, role.method))
        .chain([(SUPERUSER, "scram-sha-256"), ("all", "reject")]);
    for (user, method) in roles {
        for database in ["all", "replication"] {
            let _ = writeln!(
                hba,
                "host    {database:<12} {user:<14} {SERVER_ADDR}/32   {method}"
            );
        }
    }
    hba
}

/// Creates the test roles and the superuser's TCP password.
fn roles_sql() -> String {
    let mut sql = format!("ALTER ROLE {SUPERUSER} PASSWORD '{SUPERUSER_PASSWORD}';\n");
    for role in TEST_ROLES {
        let name = role.name;
        match (role.password, role.method) {
            (Some(password), "md5") => {
                // The hash format is chosen when the password is set; an md5
                // method with a SCRAM hash would authenticate with SCRAM.
                // PostgreSQL 18 warns that MD5 is deprecated: not news here.
                let _ = write!(
                    sql,
                    "SET password_encryption = 'md5';\nSET client_min_messages = error;\n\
                     CREATE ROLE {name} LOGIN REPLICATION PASSWORD '{password}';\n\
                     RESET password_encryption;\nRESET client_min_messages;\n"
                );
            }
            (Some(password), _) => {
                let _ = writeln!(
                    sql,
                    "CREATE ROLE {name} LOGIN REPLICATION PASSWORD '{password}';"
                );
            }
            (None, _) => {
                let _ = writeln!(sql, "CREATE ROLE {name} LOGIN REPLICATION;");
            }
        }
        // What the production role of sql/004_role.sql has: tests write
        // events through the superuser.
        let _ = writeln!(sql, "GRANT SELECT ON events TO {name};");
    }
    sql
}

/// A CA and a server certificate with `names` (by default for `localhost`
/// and `127.0.0.1`) signed by it, written to `dir`; returns the CA
/// certificate's path.
fn write_tls_files(dir: &Path, run_as: Option<u32>, names: &CertNames) -> PathBuf {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "walrelay test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("self-sign the CA");

    // rcgen makes "127.0.0.1" an IP address SAN, which is what a client
    // verifying `host=127.0.0.1` looks for.
    let mut server_params = CertificateParams::new(
        names
            .subject_alt_names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<Vec<_>>(),
    )
    .expect("server certificate parameters");
    server_params.distinguished_name = rcgen::DistinguishedName::new();
    server_params
        .distinguished_name
        .push(DnType::CommonName, names.common_name);
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate().expect("server key");
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .expect("sign the server certificate");

    let ca_path = dir.join("ca.crt");
    fs::write(&ca_path, ca.pem()).expect("write ca.crt");
    write_server_file(&dir.join("server.crt"), &server_cert.pem(), run_as);
    // The server refuses a key that others can read.
    write_server_file(&dir.join("server.key"), &server_key.serialize_pem(), run_as);
    ca_path
}

/// Writes a file only the server's user may read or write (0600, owned by
/// it): Postgres insists on that for its key, and it is harmless for the rest.
fn write_server_file(path: &Path, contents: &str, run_as: Option<u32>) {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|err| panic!("create {}: {err}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    give_to(path, run_as);
}

fn give_to(path: &Path, run_as: Option<u32>) {
    if let Some(uid) = run_as {
        chown(path, Some(uid), Some(uid))
            .unwrap_or_else(|err| panic!("chown {}: {err}", path.display()));
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|err| panic!("chmod {}: {err}", path.display()));
}

/// Runs a server program as `run_as` (from root) with a working directory
/// it can enter, without the caller's `PG*` variables.
fn as_server_user(cmd: &mut std::process::Command, cwd: &Path, run_as: Option<u32>) {
    clear_pg_env(cmd);
    cmd.current_dir(cwd);
    if let Some(uid) = run_as {
        // std drops the supplementary groups too when root sets a uid.
        cmd.uid(uid).gid(uid);
    }
}

/// A developer's `PGHOST`, `PGPASSWORD`, `PGOPTIONS`, ... must not steer the
/// harness's own clients.
fn clear_pg_env(cmd: &mut std::process::Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// Runs a quick local command that must succeed; returns its stdout.
fn run_std(cmd: &mut std::process::Command) -> String {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {cmd:?}: {err}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A port nothing listens on right now. Another process can take it before
/// the server binds it; [`PgServer::start`] then tries another.
fn free_port() -> u16 {
    TcpListener::bind((SERVER_ADDR, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind a probe socket on 127.0.0.1")
        .port()
}

fn build_url(port: u16, user: &str, password: Option<&str>, params: &str) -> String {
    let mut url = format!("postgres://{}", percent_encode(user));
    if let Some(password) = password {
        url.push(':');
        url.push_str(&percent_encode(password));
    }
    let _ = write!(url, "@{SERVER_ADDR}:{port}/{DATABASE}");
    if !params.is_empty() {
        url.push('?');
        url.push_str(params);
    }
    url
}

/// Percent-encodes all but RFC 3986's unreserved characters, which is safe
/// in the userinfo part of a URL.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Physical standbys, for the failover tests (included, not `mod standby;`,
/// so that the file is found where the bench includes this one as well).
mod standby {
    include!("postgres/standby.rs");
}

mod tests {
    use super::*;

    async fn connect(
        server: &PgServer,
        user: &str,
        password: Option<&str>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let url = server.url(user, password, "sslmode=disable");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    #[test]
    fn decoding_sessions_are_read_from_the_server_log() {
        let log = "\
2026-01-01 10:00:00.000 UTC [11] LOG:  starting logical decoding for slot \"walrelay\"
2026-01-01 10:00:00.000 UTC [11] DETAIL:  Streaming transactions committing after 0/1A2B3C0, reading WAL from 0/1A2B000.
2026-01-01 10:00:00.000 UTC [11] STATEMENT:  START_REPLICATION SLOT \"walrelay\" LOGICAL 0/0
2026-01-01 10:00:01.000 UTC [12] LOG:  starting logical decoding for slot \"other\"
2026-01-01 10:00:01.000 UTC [12] DETAIL:  Streaming transactions committing after 0/2000000, reading WAL from 0/1000000.
2026-01-01 10:00:02.000 UTC [13] LOG:  starting logical decoding for slot \"walrelay\"
2026-01-01 10:00:02.000 UTC [13] DETAIL:  Streaming transactions committing after 1/10, reading WAL from 1/0.
";
        assert_eq!(
            parse_decoding_sessions(log, "walrelay"),
            [Lsn(0x01A2_B3C0), Lsn(0x1_0000_0010)]
        );
        assert_eq!(parse_decoding_sessions(log, "other"), [Lsn(0x0200_0000)]);
    }

    #[test]
    fn stale_cluster_dirs_go_and_live_ones_stay() {
        let make = |lock: bool| {
            let dir = tempfile::Builder::new()
                .prefix(DIR_PREFIX)
                .tempdir_in("/dev/shm")
                .expect("/dev/shm");
            fs::create_dir(dir.path().join("data")).unwrap();
            // A postmaster PID no process has (PIDs stay below 2^22 on Linux).
            fs::write(dir.path().join("data/postmaster.pid"), "4194303\n").unwrap();
            if lock {
                fs::File::create(dir.path().join(LOCK_FILE)).unwrap();
            }
            dir.keep()
        };
        // Its test died: the lock file is there and nobody holds it.
        let abandoned = make(true);
        // A live test's: the lock is held.
        let live = make(true);
        let _held = Flock::lock(
            fs::File::open(live.join(LOCK_FILE)).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        // No lock file and fresh: maybe being made right now, or an older harness's.
        let unlocked = make(false);

        clean_stale_dirs(&pg_versions::server_bin_dir(None));
        assert!(!abandoned.exists());
        assert!(live.exists() && unlocked.exists());
        fs::remove_dir_all(live).unwrap();
        fs::remove_dir_all(unlocked).unwrap();
    }

    #[test]
    fn url_percent_encodes_user_and_password() {
        assert_eq!(
            build_url(5432, "a b", Some("p@ss:w/rd%"), "sslmode=require"),
            "postgres://a%20b:p%40ss%3Aw%2Frd%25@127.0.0.1:5432/walrelay_test?sslmode=require"
        );
        assert_eq!(
            build_url(1, "u", None, ""),
            "postgres://u@127.0.0.1:1/walrelay_test"
        );
    }

    #[tokio::test]
    async fn cluster_starts_logical_with_tls_and_schema() {
        let pg = PgServer::start_default().await;
        assert_eq!(pg.psql("SHOW wal_level").await, "logical");
        assert_eq!(pg.psql("SHOW ssl").await, "on");
        assert!(pg.version_num() >= 140_000, "version {}", pg.version_num());
        assert!(pg.ca_cert_path().expect("TLS is on by default").is_file());
        assert_eq!(
            pg.psql("SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = 'walrelay_events'")
                .await,
            "t|f|f|f"
        );
        // The superuser client works, over TCP with SCRAM.
        let client = pg.client().await;
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), SUPERUSER);
    }

    /// What a test about one version's behaviour relies on: it gets that
    /// major whatever the run's version is.
    #[tokio::test]
    async fn a_test_gets_the_major_it_asks_for() {
        let other = if pg_versions::run_major() == 17 {
            16
        } else {
            17
        };
        let pg = PgServer::start(PgOptions {
            version: Some(other),
            tls: false,
            ..PgOptions::default()
        })
        .await;
        assert_eq!(pg.major(), other);
        assert_eq!(
            pg.psql("SELECT current_setting('server_version_num')::int / 10000")
                .await,
            other.to_string()
        );
        // The harness's psql and schema work with it, as with the default.
        assert_eq!(pg.psql("SELECT count(*) FROM events").await, "0");
    }

    #[tokio::test]
    async fn options_reach_the_server() {
        let pg = PgServer::start(PgOptions {
            wal_level: "replica",
            tls: false,
            extra_conf: vec!["wal_sender_timeout = '7s'".to_owned()],
            ..PgOptions::default()
        })
        .await;
        assert_eq!(pg.psql("SHOW wal_level").await, "replica");
        assert_eq!(pg.psql("SHOW ssl").await, "off");
        assert_eq!(pg.psql("SHOW wal_sender_timeout").await, "7s");
        assert!(pg.ca_cert_path().is_none());
    }

    #[tokio::test]
    async fn schema_applies_twice_and_guards_the_table() {
        let pg = PgServer::start_default().await;
        pg.apply_schema().await;

        pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'Created', '{}')")
            .await;
        for (statement, op) in [
            ("UPDATE events SET event_type = 'x'", "UPDATE"),
            ("DELETE FROM events", "DELETE"),
            ("TRUNCATE events", "TRUNCATE"),
        ] {
            let err = pg.try_psql(statement).await.expect_err(statement);
            assert!(
                err.contains(&format!("events is append-only: {op} is not allowed")),
                "{err}"
            );
            assert!(err.contains("HINT:"), "{err}");
        }
        let err = pg
            .try_psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'Again', '{}')")
            .await
            .expect_err("duplicate seq_nr");
        assert!(err.contains("events_pkey"), "{err}");
        let err = pg
            .try_psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('b', 0, 'Zero', '{}')")
            .await
            .expect_err("seq_nr 0");
        assert!(err.contains("events_seq_nr_check"), "{err}");
        assert_eq!(pg.psql("SELECT count(*) FROM events").await, "1");

        // The production role of sql/004_role.sql reads and nothing more.
        assert_eq!(
            pg.psql(
                "SELECT rolcanlogin, rolreplication, rolsuper, \
                        has_table_privilege('walrelay', 'events', 'SELECT'), \
                        has_table_privilege('walrelay', 'events', 'INSERT, UPDATE, DELETE, TRUNCATE'), \
                        has_database_privilege('walrelay', current_database(), 'CONNECT'), \
                        has_database_privilege('walrelay', current_database(), 'CREATE') \
                 FROM pg_roles WHERE rolname = 'walrelay'"
            )
            .await,
            "t|t|f|t|f|t|f"
        );
    }

    #[tokio::test]
    async fn roles_authenticate_over_tcp_with_their_method() {
        let pg = PgServer::start(PgOptions {
            tls: false,
            ..PgOptions::default()
        })
        .await;
        for role in TEST_ROLES {
            let client = connect(&pg, role.name, role.password)
                .await
                .unwrap_or_else(|err| panic!("{} cannot log in: {err}", role.name));
            let row = client
                .query_one("SELECT current_user::text, count(*) FROM events", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), role.name);

            if role.password.is_some() {
                let err = connect(&pg, role.name, Some("wrong-password"))
                    .await
                    .expect_err("wrong password");
                assert_eq!(
                    err.code(),
                    Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
                    "{err}"
                );
            }
        }
        // Otherwise the `md5` method would quietly run SCRAM.
        assert_eq!(
            pg.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user'")
                .await,
            "md5"
        );
        let err = connect(&pg, "walrelay", Some("x"))
            .await
            .expect_err("no pg_hba line");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tls_certificate_verifies_for_localhost_and_ip() {
        let pg = PgServer::start_default().await;
        let ca = pg.ca_cert_path().unwrap();
        for host in ["localhost", SERVER_ADDR] {
            // libpq's verify-full checks the chain and the name (DNS or IP SAN).
            let conninfo = format!(
                "host={host} port={} dbname={DATABASE} user={SCRAM_USER} sslmode=verify-full sslrootcert={}",
                pg.port(),
                ca.display()
            );
            let mut cmd = Command::new(pg.psql_path());
            clear_pg_env(cmd.as_std_mut());
            let output = cmd
                .args([
                    "-X",
                    "-At",
                    "-c",
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &conninfo,
                ])
                .env("PGPASSWORD", SCRAM_PASSWORD)
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "{host}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "t");
        }
    }

    /// walrelay's own TLS stack must accept the certificate too, not only
    /// libpq (OpenSSL): webpki is the stricter of the two.
    #[tokio::test]
    async fn tls_certificate_verifies_with_rustls() {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName};
        use tokio::io::AsyncReadExt as _;

        let pg = PgServer::start_default().await;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pg.ca_cert_path().unwrap()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));

        for name in ["localhost", SERVER_ADDR] {
            let mut tcp = tokio::net::TcpStream::connect((SERVER_ADDR, pg.port()))
                .await
                .unwrap();
            // SSLRequest: length 8, code 80877103; the server answers 'S'.
            tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .await
                .unwrap();
            assert_eq!(tcp.read_u8().await.unwrap(), b'S');
            let server_name = ServerName::try_from(name.to_owned()).unwrap();
            connector
                .connect(server_name, tcp)
                .await
                .unwrap_or_else(|err| panic!("TLS handshake for {name}: {err}"));
        }
    }

    #[tokio::test]
    async fn restart_keeps_port_and_data() {
        let pg = PgServer::start(PgOptions {
            tls: false,
            ..PgOptions::default()
        })
        .await;
        let port = pg.port();
        pg.psql("INSERT INTO events (aggregate_id, seq_nr, event_type, payload) VALUES ('a', 1, 'Created', '{}')")
            .await;
        pg.restart().await;
        pg.stop().await;
        assert!(
            pg.try_psql("SELECT 1").await.is_err(),
            "stopped server answered"
        );
        pg.restart().await;
        pg.crash().await;
        pg.restart().await;
        assert_eq!(pg.port(), port);
        assert_eq!(pg.psql("SELECT count(*) FROM events").await, "1");
    }
}
