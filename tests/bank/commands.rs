//! The command side: decisions on the account's whole history, and the
//! optimistic concurrency check on `(aggregate_id, seq_nr)`.
use std::time::Duration;

use tokio::time::Instant;
use walrelay::pg::lsn::Lsn;

use crate::support::bank::{BankEnv, code};
use crate::support::postgres::PgServer;

const WAIT: Duration = Duration::from_secs(60);

/// The bank on `pg`, without Kafka or walrelay: commands only write the
/// events table.
fn bank(pg: &PgServer) -> BankEnv {
    BankEnv {
        postgres_url: pg.superuser_url(),
        ..BankEnv::default()
    }
}

/// `(seq_nr, event_type, payload)` of `account`'s events.
async fn events(pg: &PgServer, account: &str) -> Vec<String> {
    let rows = pg
        .psql(&format!(
            "SELECT seq_nr || ' ' || event_type || ' ' || payload::text FROM events \
             WHERE aggregate_id = '{account}' ORDER BY seq_nr"
        ))
        .await;
    rows.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_withdrawal_past_the_balance_is_refused_and_appends_nothing() {
    let pg = PgServer::start_default().await;
    let bank = bank(&pg);
    let opened = bank.json(&["open", "acc"]).await;
    assert_eq!(opened["seq_nr"], 1);
    assert_eq!(opened["event_type"], "AccountOpened");
    let deposited = bank.json(&["deposit", "acc", "100"]).await;
    assert_eq!(
        (&deposited["seq_nr"], &deposited["balance"]),
        (&2.into(), &100.into())
    );

    for (args, why) in [
        (
            &["withdraw", "acc", "130"][..],
            "holds 100, less than the 130",
        ),
        (&["open", "acc"][..], "is open already"),
        (&["deposit", "nobody", "5"][..], "does not exist"),
    ] {
        let output = bank.run(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(code(&output), 3, "bank {args:?}: {stderr}");
        assert!(stderr.contains(why), "bank {args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "bank {args:?} printed an event");
    }
    // Amounts are positive: a usage error, before anything is read.
    assert_eq!(code(&bank.run(&["deposit", "acc", "0"]).await), 2);

    let emptied = bank.json(&["withdraw", "acc", "100"]).await;
    assert_eq!(
        (&emptied["seq_nr"], &emptied["balance"]),
        (&3.into(), &0.into())
    );
    assert_eq!(
        events(&pg, "acc").await,
        [
            "1 AccountOpened {}",
            "2 MoneyDeposited {\"amount\": 100}",
            "3 MoneyWithdrawn {\"amount\": 100}"
        ]
    );
    assert!(events(&pg, "nobody").await.is_empty());
    // Read after the commit: at or past the event's commit record.
    let lsn: Lsn = emptied["wal_lsn"].as_str().unwrap().parse().unwrap();
    assert_eq!(emptied["wal_lsn_int"].as_u64(), Some(lsn.0));
    let now: Lsn = pg
        .psql("SELECT pg_current_wal_lsn()")
        .await
        .parse()
        .unwrap();
    assert!(lsn <= now);
}

/// Opens `account` with 100 in it, then races a `bank withdraw` with
/// `args` against a transaction of the test that appends seq_nr 3 (a
/// withdrawal of 50): the test's transaction inserts first and holds its
/// row uncommitted, the bank's insert of seq_nr 3 waits on it, and the
/// test commits. Returns the bank's exit code and output.
async fn lose_the_race(
    pg: &PgServer,
    bank: &BankEnv,
    account: &str,
    args: &[&str],
) -> (i32, String, String) {
    bank.json(&["open", account]).await;
    bank.json(&["deposit", account, "100"]).await;
    let rival = pg.client().await;
    rival.batch_execute("BEGIN").await.unwrap();
    rival
        .execute(
            "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
             VALUES ($1, 3, 'MoneyWithdrawn', '{\"amount\": 50}')",
            &[&account],
        )
        .await
        .unwrap();
    let mut command = vec!["withdraw", account];
    command.extend_from_slice(args);
    let mut writer = bank.spawn(&command);
    // The bank has read two events and waits to insert the third.
    let watcher = pg.client().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'bank' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            writer.exited().is_none(),
            "bank withdraw ended before it waited on the lock:\n{}",
            writer.stderr_text()
        );
        assert!(
            Instant::now() < deadline,
            "bank withdraw never waited on the rival's row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rival.batch_execute("COMMIT").await.unwrap();
    let status = writer.wait(WAIT).await;
    (
        status.code().expect("exited"),
        writer.stdout_lines().join("\n"),
        writer.stderr_text(),
    )
}

#[tokio::test]
async fn a_writer_that_loses_the_race_for_a_seq_nr_decides_again_on_the_new_state() {
    let pg = PgServer::start_default().await;
    let bank = bank(&pg);

    // 30 still fits after the rival's 50: appended as seq_nr 4, on the
    // second attempt.
    let (code, stdout, stderr) = lose_the_race(&pg, &bank, "a", &["30"]).await;
    assert_eq!(code, 0, "{stderr}");
    let appended: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(appended["seq_nr"], 4, "{stdout}");
    assert_eq!(appended["attempts"], 2, "{stdout}");
    assert_eq!(appended["balance"], 20, "{stdout}");

    // 80 fitted the balance the bank first read (100), not the one after the
    // rival's withdrawal (50): refused, not appended as seq_nr 4 regardless.
    let (code, stdout, stderr) = lose_the_race(&pg, &bank, "b", &["80"]).await;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(stderr.contains("holds 50, less than the 80"), "{stderr}");

    // Bounded: with one attempt allowed, losing the race is the end.
    let (code, stdout, stderr) =
        lose_the_race(&pg, &bank, "c", &["30", "--max-attempts", "1"]).await;
    assert_eq!(code, 4, "{stdout}\n{stderr}");
    assert!(stderr.contains("gave up after 1 attempts"), "{stderr}");

    for (account, balance_events) in [("a", 4), ("b", 3), ("c", 3)] {
        assert_eq!(
            events(&pg, account).await.len(),
            balance_events,
            "{account}"
        );
    }
}
