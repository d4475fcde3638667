//! `bank verify`: the read model against the events table, the source of
//! truth. Once the consumer has caught up (waited for, bounded), every
//! account's balance must be the one its events add up to, every event must
//! have been applied exactly once, and no partition may be stopped.
use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use super::account::{Account, Event};

/// What `bank verify` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Whether everything matched.
    pub ok: bool,
    /// Accounts in the events table.
    pub accounts: usize,
    /// Events in the events table.
    pub events: u64,
    /// Applications the consumer logged.
    pub applications: i64,
    /// What did not match (at most a few of each kind).
    pub problems: Vec<String>,
}

/// At most this many problems of one kind are listed.
const LIST: i64 = 10;

/// Waits (at most `timeout`) until the read model has applied the last event
/// of every aggregate in the events table, then compares.
pub async fn verify(client: &Client, timeout: Duration) -> Result<Report, tokio_postgres::Error> {
    let mut report = Report::default();
    report.problems.extend(caught_up(client, timeout).await?);
    compare_balances(client, &mut report).await?;
    check_applications(client, &mut report).await?;
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// Waits until the read model has applied every aggregate's last event;
/// returns what is still behind after `timeout`.
async fn caught_up(
    client: &Client,
    timeout: Duration,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let started = Instant::now();
    loop {
        let behind: Vec<String> = client
            .query(
                "SELECT format('%s: events up to %s, applied up to %s', e.aggregate_id, e.last, \
                        coalesce(p.last_seq_nr, 0)) \
                 FROM (SELECT aggregate_id, max(seq_nr) AS last FROM events GROUP BY aggregate_id) e \
                 LEFT JOIN balances_position p USING (aggregate_id) \
                 WHERE p.last_seq_nr IS DISTINCT FROM e.last ORDER BY 1 LIMIT $1",
                &[&LIST],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if behind.is_empty() {
            return Ok(behind);
        }
        if started.elapsed() >= timeout {
            let mut problems = vec![format!(
                "the read model has not caught up after {timeout:?}"
            )];
            problems.extend(behind);
            return Ok(problems);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every account's balance, folded from its events as the command side
/// does, against the read model's.
async fn compare_balances(
    client: &Client,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT aggregate_id, seq_nr, event_type, payload::text FROM events \
             ORDER BY aggregate_id, seq_nr",
            &[],
        )
        .await?;
    let mut accounts: BTreeMap<String, Result<Account, String>> = BTreeMap::new();
    for row in &rows {
        let (id, seq_nr, event_type, payload): (String, i64, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        report.events += 1;
        let event = match Event::parse(&event_type, &payload) {
            Ok(Some(event)) => event,
            // Another kind of aggregate: no balance.
            Ok(None) => continue,
            Err(e) => {
                accounts.insert(id, Err(e.to_string()));
                continue;
            }
        };
        let account = accounts
            .entry(id.clone())
            .or_insert_with(|| Ok(Account::new(&id)));
        if let Ok(state) = account {
            if let Err(why) = state.apply(seq_nr, event) {
                *account = Err(why);
            }
        }
    }
    report.accounts = accounts.len();

    let balances: BTreeMap<String, i64> = client
        .query("SELECT account_id, balance FROM balances", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, account) in &accounts {
        match (account, balances.get(id)) {
            (Err(why), _) => report
                .problems
                .push(format!("the events table is inconsistent: {why}")),
            (Ok(account), Some(&balance)) if account.balance == balance => {}
            (Ok(account), read) => report.problems.push(format!(
                "{id}: the events add up to {}, the read model has {read:?}",
                account.balance
            )),
        }
    }
    for id in balances.keys().filter(|id| !accounts.contains_key(*id)) {
        report
            .problems
            .push(format!("{id}: in the read model, not in the events table"));
    }
    Ok(())
}

/// Every event applied once, nothing else applied, no partition stopped.
async fn check_applications(
    client: &Client,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    report.applications = client
        .query_one("SELECT count(*) FROM balances_applied", &[])
        .await?
        .get(0);
    let checks = [
        (
            "applied more than once",
            "SELECT format('%s seq_nr %s applied %s times', aggregate_id, seq_nr, count(*)) \
             FROM balances_applied GROUP BY aggregate_id, seq_nr HAVING count(*) > 1 \
             ORDER BY 1 LIMIT $1",
        ),
        (
            "never applied",
            "SELECT format('%s seq_nr %s', e.aggregate_id, e.seq_nr) FROM events e \
             WHERE NOT EXISTS (SELECT FROM balances_applied a \
                               WHERE a.aggregate_id = e.aggregate_id AND a.seq_nr = e.seq_nr) \
             ORDER BY 1 LIMIT $1",
        ),
        (
            "applied but not in the events table",
            "SELECT format('%s seq_nr %s', a.aggregate_id, a.seq_nr) FROM balances_applied a \
             WHERE NOT EXISTS (SELECT FROM events e \
                               WHERE e.aggregate_id = a.aggregate_id AND e.seq_nr = a.seq_nr) \
             ORDER BY 1 LIMIT $1",
        ),
        (
            "partition stopped",
            "SELECT format('%s [%s] at offset %s: %s', kafka_topic, kafka_partition, kafka_offset, \
                    reason) FROM balances_stuck ORDER BY 1 LIMIT $1",
        ),
    ];
    for (what, sql) in checks {
        for row in client.query(sql, &[&LIST]).await? {
            report
                .problems
                .push(format!("{what}: {}", row.get::<_, String>(0)));
        }
    }
    Ok(())
}
