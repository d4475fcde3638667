//! The query side's reads, with read-your-writes.
//!
//! The read model lags the events table: an event reaches it through
//! walrelay, Kafka and the consumer. A client that just ran a command holds
//! the `(aggregate_id, seq_nr)` the command appended; asking for the balance
//! "at least at seq_nr N" waits (bounded) until the consumer has applied N,
//! so the client sees its own write, and everything before it.
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

/// How often a waiting read looks again.
const POLL: Duration = Duration::from_millis(20);

/// The read model's view of an account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reading {
    /// The account.
    pub account_id: String,
    /// Its balance; `None` when the account is not open (yet).
    pub balance: Option<i64>,
    /// The `seq_nr` of the last of its events the consumer applied (0: none).
    pub seq_nr: i64,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The consumer had not applied the event within the time allowed.
    #[error(
        "the read model has applied {account}'s events up to seq_nr {seen}, not yet {wanted}, \
         after {waited:?}: is `bank consume` running (and walrelay)?"
    )]
    NotYet {
        /// The account.
        account: String,
        /// What it had applied.
        seen: i64,
        /// What was waited for.
        wanted: i64,
        /// For how long.
        waited: Duration,
    },
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The account as the read model has it now.
pub async fn balance(client: &Client, account: &str) -> Result<Reading, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT p.last_seq_nr, b.balance FROM balances_position p \
             LEFT JOIN balances b ON b.account_id = p.aggregate_id \
             WHERE p.aggregate_id = $1",
            &[&account],
        )
        .await?;
    Ok(Reading {
        account_id: account.to_owned(),
        seq_nr: row.as_ref().map_or(0, |r| r.get(0)),
        balance: row.and_then(|r| r.get(1)),
    })
}

/// The account once the read model has applied its event `at_least` (or a
/// later one); gives up after `timeout`.
pub async fn balance_at_least(
    client: &Client,
    account: &str,
    at_least: i64,
    timeout: Duration,
) -> Result<Reading, QueryError> {
    let started = Instant::now();
    loop {
        let reading = balance(client, account).await?;
        if reading.seq_nr >= at_least {
            return Ok(reading);
        }
        if started.elapsed() >= timeout {
            return Err(QueryError::NotYet {
                account: account.to_owned(),
                seen: reading.seq_nr,
                wanted: at_least,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
