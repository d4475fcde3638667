//! The command side: open, deposit, withdraw.
//!
//! Each command is one transaction on the events table, READ COMMITTED:
//!
//! 1. read the account's events (`ORDER BY seq_nr`) and fold them into its
//!    state;
//! 2. decide (refuse, or choose the event);
//! 3. append the event as `seq_nr = version + 1`, and commit.
//!
//! The primary key `(aggregate_id, seq_nr)` is the concurrency check: when
//! another writer appended to the account after step 1, the insert fails with
//! `unique_violation` (23505; if the other transaction has not committed yet,
//! the insert waits for it first). Nothing was written, so the command
//! starts over from step 1 on the new state, a bounded number of times with
//! a short, jittered pause. A decision is thus always made on the account's
//! whole history, and appending never needs a lock on the aggregate.
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::account::{Account, Command, Event, Refusal};

/// What a command appended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Appended {
    /// The account (the event's `aggregate_id`).
    pub aggregate_id: String,
    /// The event's `seq_nr`: what a query waits for to read its own write.
    pub seq_nr: i64,
    /// The event's type.
    pub event_type: &'static str,
    /// The balance after it.
    pub balance: i64,
    /// Transactions it took (1 unless another writer got there first).
    pub attempts: u32,
    /// `pg_current_wal_lsn()` read after the commit returned: the event is in
    /// Kafka once walrelay's `/progress` confirms this position.
    pub wal_lsn: String,
    /// The same position as a number, as `/progress` has `confirmed_lsn_int`.
    pub wal_lsn_int: u64,
}

/// Why a command appended nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The account's state does not allow it.
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// Every attempt lost the race for the next `seq_nr`.
    #[error(
        "gave up after {attempts} attempts: each time another writer appended to {account:?} \
         first (unique_violation on (aggregate_id, seq_nr)); try again, or raise --max-attempts"
    )]
    Contention {
        /// The account.
        account: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The account's events do not fold (a bug upstream).
    #[error("the events of {0} are inconsistent: {1}")]
    Corrupt(String, String),
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Carries out `command` on `account`, in at most `max_attempts` transactions.
pub async fn execute(
    client: &mut Client,
    account: &str,
    command: Command,
    max_attempts: u32,
) -> Result<Appended, CommandError> {
    for attempt in 1..=max_attempts {
        let Some((seq_nr, event, balance)) = try_once(client, account, command).await? else {
            tracing::debug!(account, attempt, "another writer appended first; retrying");
            let ceiling = MAX_PAUSE.min(Duration::from_millis(1 << attempt.min(6)));
            tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
            continue;
        };
        // After COMMIT returned: at or past the end of its commit record.
        let row = client
            .query_one(
                "SELECT l::text, (l - '0/0')::bigint FROM pg_current_wal_lsn() AS l",
                &[],
            )
            .await?;
        return Ok(Appended {
            aggregate_id: account.to_owned(),
            seq_nr,
            event_type: event.event_type(),
            balance,
            attempts: attempt,
            wal_lsn: row.get(0),
            wal_lsn_int: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        });
    }
    Err(CommandError::Contention {
        account: account.to_owned(),
        attempts: max_attempts,
    })
}

/// One transaction: `Some((seq_nr, event, balance after))` when it
/// committed, `None` when another writer appended first.
async fn try_once(
    client: &mut Client,
    account: &str,
    command: Command,
) -> Result<Option<(i64, Event, i64)>, CommandError> {
    let txn = client.transaction().await?;
    let rows = txn
        .query(
            "SELECT seq_nr, event_type, payload::text FROM events \
             WHERE aggregate_id = $1 ORDER BY seq_nr",
            &[&account],
        )
        .await?;
    let mut state = Account::new(account);
    for row in &rows {
        let (seq_nr, event_type, payload): (i64, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let event = Event::parse(&event_type, &payload)
            .map_err(|e| CommandError::Corrupt(account.to_owned(), e.to_string()))?
            .ok_or_else(|| {
                CommandError::Corrupt(
                    account.to_owned(),
                    format!("event {seq_nr} is a {event_type}, not an account event"),
                )
            })?;
        state
            .apply(seq_nr, event)
            .map_err(|why| CommandError::Corrupt(account.to_owned(), why))?;
    }
    let event = state.decide(command)?;
    let seq_nr = state.version + 1;
    let inserted = txn
        .execute(
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             VALUES ($1, $2, $3, $4::text::jsonb)",
            &[&account, &seq_nr, &event.event_type(), &event.payload()],
        )
        .await;
    match inserted {
        // Dropping the transaction rolls it back.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(None),
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    txn.commit().await?;
    state
        .apply(seq_nr, event)
        .map_err(|why| CommandError::Corrupt(account.to_owned(), why))?;
    Ok(Some((seq_nr, event, state.balance)))
}
