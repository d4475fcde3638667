// Physical standbys of a test cluster, for the failover tests.
//
// ```text
// primary:  pg_create_physical_replication_slot(slot) ──► pg_ctl stop -m fast
//           cp -a data ──► /dev/shm/walrelay-pg-YYYY/data     (a cold copy: no pg_basebackup needed)
//           pg_ctl start again
// standby:  standby.signal, harness.conf: port, primary_conninfo (with dbname),
//           primary_slot_name, hot_standby_feedback, sync_replication_slots (17+)
//           pg_ctl start; wait until the primary shows the slot active
// ```
//
// Things that are easy to get wrong here:
// - The copy must come from a cleanly stopped primary: a running one's data
//   directory is not consistent without a backup's WAL. The copy carries the
//   primary's replication slots too (`pg_replslot/`): a logical slot copied
//   this way would be a non-synchronized slot of the same name on the
//   standby, which slot synchronization refuses to overwrite, so take the
//   standby before walrelay creates its slot.
// - Slot synchronization needs `wal_level = logical` on the standby as
//   well, `hot_standby_feedback`, `primary_slot_name` and a `dbname` in
//   `primary_conninfo`; the slot sync worker naps up to 30 s when nothing
//   changed, and a configuration reload wakes it
//   ([`PgServer::sync_slots_now`]).
// - `pg_ctl promote -w` waits for the startup process, which waits for the
//   WAL receiver to exit: with the receiver stopped (SIGSTOP), promote
//   without waiting (`pg_promote(false)`, [`PgServer::request_promotion`]).
use std::fs;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{
    DATABASE, DIR_PREFIX, PgOptions, PgServer, SERVER_ADDR, SUPERUSER, SUPERUSER_PASSWORD,
    give_to, lock_dir, run_std, scratch_dir, set_mode, write_server_file,
};

/// How long the standby helpers wait for a condition.
const WAIT: Duration = Duration::from_secs(60);

impl PgServer {
    /// Starts a physical standby of `primary` streaming through the physical
    /// slot `slot` (made here), with slot synchronization on PostgreSQL 17+,
    /// and `extra_conf` last. `primary` is stopped cleanly for the copy and
    /// started again on its port. Returns once the standby streams.
    pub async fn start_standby(primary: &PgServer, slot: &str, extra_conf: &[&str]) -> PgServer {
        let started = Instant::now();
        primary
            .psql(&format!("SELECT pg_create_physical_replication_slot('{slot}')"))
            .await;
        primary.stop().await;
        let dir = scratch_dir(DIR_PREFIX);
        let lock = lock_dir(dir.path());
        set_mode(dir.path(), 0o755);
        give_to(dir.path(), primary.run_as);
        let data_dir = dir.path().join("data");
        run_std(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&primary.data_dir)
                .arg(&data_dir),
        );
        primary.restart().await;

        // The TLS files harness.conf names live beside the data directory.
        let tls = primary.ca_cert_path.is_some();
        if tls {
            for file in ["server.crt", "server.key", "ca.crt"] {
                run_std(
                    std::process::Command::new("cp")
                        .arg("-a")
                        .arg(primary.dir.path().join(file))
                        .arg(dir.path().join(file)),
                );
            }
        }
        write_server_file(&data_dir.join("standby.signal"), "", primary.run_as);
        let _ = fs::remove_file(data_dir.join("postmaster.pid"));

        let mut conf = vec![
            format!(
                "primary_conninfo = 'host={SERVER_ADDR} port={} user={SUPERUSER} \
                 password={SUPERUSER_PASSWORD} dbname={DATABASE} application_name={slot} sslmode=disable'",
                primary.port
            ),
            format!("primary_slot_name = '{slot}'"),
            "hot_standby_feedback = on".to_owned(),
        ];
        if primary.major() >= 17 {
            conf.push("sync_replication_slots = on".to_owned());
        }
        conf.extend(extra_conf.iter().map(|line| (*line).to_owned()));
        let opts = PgOptions {
            wal_level: "logical",
            tls,
            extra_conf: conf,
            version: Some(primary.major()),
            ..PgOptions::default()
        };
        let mut standby = PgServer {
            bin_dir: primary.bin_dir.clone(),
            psql: primary.psql.clone(),
            log_path: dir.path().join("server.log"),
            data_dir,
            ca_cert_path: tls.then(|| dir.path().join("ca.crt")),
            dir,
            port: 0,
            run_as: primary.run_as,
            version_num: primary.version_num,
            _lock: lock,
        };
        standby.start_on_free_port(&opts).await;
        standby
            .wait_for(&format!("standby {slot} streams"), || async {
                primary
                    .psql(&format!(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ))
                    .await
                    == "t"
            })
            .await;
        eprintln!(
            "standby on port {} of the primary on port {} ready in {} ms",
            standby.port,
            primary.port,
            started.elapsed().as_millis()
        );
        standby
    }

    /// Polls `condition` every 50 ms until it holds; panics with the server
    /// log's tail after a minute.
    pub async fn wait_for<F, Fut>(&self, what: &str, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + WAIT;
        while !condition().await {
            assert!(
                Instant::now() < deadline,
                "never: {what}\n--- server log (tail) ---\n{}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets a parameter with `ALTER SYSTEM` and reloads the configuration.
    pub async fn set_and_reload(&self, name: &str, value: &str) {
        self.psql(&format!(
            "ALTER SYSTEM SET {name} = '{value}'; SELECT pg_reload_conf();"
        ))
        .await;
    }

    /// Wakes the slot sync worker of this standby for a synchronization
    /// cycle now (a configuration reload sets its latch).
    pub async fn sync_slots_now(&self) {
        self.psql("SELECT pg_reload_conf()").await;
    }

    /// Waits until this standby holds a sync-ready copy of `slot` (synced,
    /// not temporary) confirmed at least to `at_least`, waking the sync
    /// worker meanwhile.
    pub async fn wait_for_synced_slot(&self, slot: &str, at_least: walrelay::pg::lsn::Lsn) {
        self.wait_for(
            &format!("a sync-ready copy of slot {slot} at {at_least} or later"),
            || async {
                self.sync_slots_now().await;
                let row = self
                    .psql(&format!(
                        "SELECT synced AND NOT temporary, confirmed_flush_lsn \
                         FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ))
                    .await;
                row.split_once('|').is_some_and(|(ready, lsn)| {
                    ready == "t"
                        && lsn
                            .parse::<walrelay::pg::lsn::Lsn>()
                            .is_ok_and(|lsn| lsn >= at_least)
                })
            },
        )
        .await;
    }

    /// The PID of this standby's WAL receiver.
    pub async fn wal_receiver_pid(&self) -> Pid {
        let deadline = Instant::now() + WAIT;
        loop {
            let pid = self.psql("SELECT pid FROM pg_stat_wal_receiver").await;
            if let Ok(pid) = pid.parse() {
                return Pid::from_raw(pid);
            }
            assert!(Instant::now() < deadline, "no WAL receiver:\n{}", self.log_tail(30));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) a server process of this cluster.
    pub fn signal_process(pid: Pid, signal: Signal) {
        kill(pid, signal).unwrap_or_else(|err| panic!("{signal} to {pid}: {err}"));
    }

    /// Asks the standby to promote itself, without waiting for it.
    pub async fn request_promotion(&self) {
        assert_eq!(self.psql("SELECT pg_promote(false)").await, "t");
    }

    /// Promotes the standby and waits until it accepts writes.
    pub async fn promote(&self) {
        self.request_promotion().await;
        self.wait_until_promoted().await;
    }

    /// Waits until the server is out of recovery.
    pub async fn wait_until_promoted(&self) {
        self.wait_for("the promotion", || async {
            self.try_psql("SELECT pg_is_in_recovery()").await.as_deref() == Ok("f")
        })
        .await;
    }

    /// Whether `pid` has `signal` pending (blocked or, for a stopped process,
    /// not yet delivered), from `/proc/<pid>/status`.
    pub fn signal_pending(pid: Pid, signal: Signal) -> bool {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            return false;
        };
        let bit = 1u64 << (signal as i32 - 1);
        status
            .lines()
            .filter_map(|line| {
                line.strip_prefix("SigPnd:")
                    .or_else(|| line.strip_prefix("ShdPnd:"))
            })
            .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .any(|mask| mask & bit != 0)
    }
}
