//! `bank load`: several concurrent clients running random commands against
//! a set of accounts, so that writers race for the same `seq_nr`. Each client
//! has its own connection; a lost connection is made again.
//!
//! With `--read-your-writes`, a client reads the balance after each command
//! that appended, waiting until the read model has applied its event, and
//! checks what it reads: the balance the command left when the read model is
//! exactly at the event, the event applied in any case. With
//! `--wait-published`, it also waits, after each command, until walrelay's
//! `/progress` confirms it.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::account::{Command, Refusal};
use super::command::{self, CommandError};
use super::{db, published, query};

/// What `bank load` does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Concurrent clients.
    pub clients: usize,
    /// Accounts `<prefix>-0` ... `<prefix>-<accounts - 1>`.
    pub accounts: usize,
    /// The accounts' name prefix.
    pub prefix: String,
    /// Commands per client (`None`: until `duration` has passed).
    pub commands: Option<u64>,
    /// How long to run at most.
    pub duration: Duration,
    /// A client's pause after each command.
    pub pause: Duration,
    /// Seed of the random choices.
    pub seed: u64,
    /// Attempts per command.
    pub max_attempts: u32,
    /// Check read-your-writes after every appended event, waiting this long.
    pub read_your_writes: Option<Duration>,
    /// Wait until walrelay confirms every appended event, this long at most.
    pub wait_published: Option<(url::Url, Duration)>,
}

/// What the clients did, summed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    /// Commands run.
    pub commands: u64,
    /// Events appended.
    pub appended: u64,
    /// Commands the account's state refused (withdrawals past the balance,
    /// opening an open account, ...).
    pub refused: u64,
    /// Of those, withdrawals refused because the balance would go negative.
    pub overdrafts_refused: u64,
    /// Transactions that lost the race for a `seq_nr` and were retried.
    pub conflicts: u64,
    /// Commands that gave up after `--max-attempts` races lost.
    pub gave_up: u64,
    /// Commands that failed otherwise (connection lost, ...).
    pub errors: u64,
    /// Reads that found the client's own write.
    pub reads_checked: u64,
    /// Reads that did not (or timed out): must be 0.
    pub reads_failed: u64,
    /// Events confirmed by `/progress` after their command.
    pub published: u64,
    /// Events `/progress` did not confirm in time: must be 0.
    pub publish_failed: u64,
}

impl Summary {
    fn add(&mut self, other: &Summary) {
        self.commands += other.commands;
        self.appended += other.appended;
        self.refused += other.refused;
        self.overdrafts_refused += other.overdrafts_refused;
        self.conflicts += other.conflicts;
        self.gave_up += other.gave_up;
        self.errors += other.errors;
        self.reads_checked += other.reads_checked;
        self.reads_failed += other.reads_failed;
        self.published += other.published;
        self.publish_failed += other.publish_failed;
    }
}

/// Runs the clients until each has run its commands, `plan.duration` has
/// passed or `stop` is set; returns their summary.
pub async fn run(url: &str, plan: &Plan, stop: Arc<AtomicBool>) -> Summary {
    let deadline = Instant::now() + plan.duration;
    let clients: Vec<_> = (0..plan.clients)
        .map(|i| {
            let (url, plan, stop) = (url.to_owned(), plan.clone(), Arc::clone(&stop));
            tokio::spawn(async move { client(&url, &plan, i as u64, deadline, &stop).await })
        })
        .collect();
    let mut summary = Summary::default();
    for client in clients {
        match client.await {
            Ok(s) => summary.add(&s),
            Err(e) => {
                tracing::error!(error = %e, "a client failed");
                summary.errors += 1;
            }
        }
    }
    summary
}

async fn client(
    url: &str,
    plan: &Plan,
    index: u64,
    deadline: Instant,
    stop: &AtomicBool,
) -> Summary {
    let mut rng = fastrand::Rng::with_seed(plan.seed.wrapping_mul(1_000_003).wrapping_add(index));
    let mut summary = Summary::default();
    let mut connection = None;
    while plan.commands.is_none_or(|n| summary.commands < n)
        && Instant::now() < deadline
        && !stop.load(Ordering::Relaxed)
    {
        let client = match &mut connection {
            Some(client) => client,
            None => match db::connect(url).await {
                Ok(client) => connection.insert(client),
                Err(e) => {
                    tracing::warn!(error = %e, "client {index}: cannot connect; trying again");
                    summary.errors += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        if !plan.pause.is_zero() && summary.commands > 0 {
            tokio::time::sleep(plan.pause).await;
        }
        let account = format!("{}-{}", plan.prefix, rng.usize(..plan.accounts.max(1)));
        let command = match rng.u8(..20) {
            0..2 => Command::Open,
            2..11 => Command::Deposit(rng.i64(1..=100)),
            _ => Command::Withdraw(rng.i64(1..=100)),
        };
        summary.commands += 1;
        let appended = match command::execute(client, &account, command, plan.max_attempts).await {
            Ok(appended) => appended,
            Err(CommandError::Refused(
                refusal @ (Refusal::AlreadyOpen(_)
                | Refusal::NotOpen(_)
                | Refusal::InsufficientFunds { .. }),
            )) => {
                summary.refused += 1;
                if let Refusal::InsufficientFunds { .. } = refusal {
                    summary.overdrafts_refused += 1;
                }
                continue;
            }
            Err(CommandError::Contention { attempts, .. }) => {
                summary.gave_up += 1;
                summary.conflicts += u64::from(attempts);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, account, "client {index}: command failed");
                summary.errors += 1;
                if client.is_closed() {
                    connection = None;
                }
                continue;
            }
        };
        summary.appended += 1;
        summary.conflicts += u64::from(appended.attempts - 1);
        if let Some((walrelay, timeout)) = &plan.wait_published {
            match published::wait(walrelay, &appended.wal_lsn, appended.wal_lsn_int, *timeout).await
            {
                Ok(()) => summary.published += 1,
                Err(e) => {
                    tracing::error!(error = %e, account, seq_nr = appended.seq_nr, "client {index}: not published");
                    summary.publish_failed += 1;
                }
            }
        }
        if let Some(timeout) = plan.read_your_writes {
            match query::balance_at_least(client, &account, appended.seq_nr, timeout).await {
                // At its event exactly, the read model has the balance the command left.
                Ok(reading)
                    if reading.seq_nr > appended.seq_nr
                        || reading.balance == Some(appended.balance) =>
                {
                    summary.reads_checked += 1;
                }
                Ok(reading) => {
                    tracing::error!(account, seq_nr = appended.seq_nr, balance = appended.balance,
                        read = ?reading, "client {index}: the read model disagrees with the command");
                    summary.reads_failed += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "client {index}: read-your-writes failed");
                    summary.reads_failed += 1;
                }
            }
        }
    }
    summary
}
