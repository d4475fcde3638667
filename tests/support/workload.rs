//! Writing events as services do, and checking what reached Kafka against
//! what committed: the invariants of DESIGN.md as one reusable checker.
//!
//! ```text
//! writer:   BEGIN; INSERT ... RETURNING (PostgreSQL's own text of every column)
//!           insert LSN and clock before COMMIT ─┐ the commit record starts in
//!           COMMIT                               │ between, and its timestamp
//!           insert LSN and clock after COMMIT ──┘ lies in between
//! checker:  every record against its row: key, value bytes, every header
//! ```
//!
//! Rolled-back transactions write to aggregates of their own
//! (`rolledback-{prefix}-{n}`) that no committed transaction touches, so a
//! leaked aborted row is reported as unexpected, never excused as a
//! duplicate of a committed one.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use walrelay::pg::lsn::Lsn;

use super::kafka::Record;

/// One committed event, identified as consumers identify it.
pub type EventId = (String, i64);

/// The prefix of the aggregates that only rolled-back transactions write.
pub const ROLLED_BACK: &str = "rolledback-";

/// The headers a record of the `events` table carries: every column but the
/// key and the value, plus `lsn` and `commit_ts` (README, "Message contract").
pub const EVENT_HEADERS: [&str; 6] = [
    "commit_ts",
    "event_type",
    "lsn",
    "metadata",
    "recorded_at",
    "seq_nr",
];

/// Numbers transactions uniquely within a test process.
static TXN_NUMBERS: AtomicU64 = AtomicU64::new(0);

/// What the writer saw around one transaction's COMMIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnBounds {
    /// Unique within the test process.
    pub number: u64,
    /// The WAL insert position before COMMIT: the commit record starts at or after it.
    pub lsn_from: Lsn,
    /// The WAL insert position after COMMIT: the commit record starts before it.
    pub lsn_to: Lsn,
    /// The server's clock before COMMIT, RFC 3339 UTC with microseconds.
    pub ts_from: String,
    /// The server's clock after COMMIT, same format.
    pub ts_to: String,
}

/// A committed event and everything its record must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Key and `seq_nr`.
    pub id: EventId,
    /// The `event_type` column.
    pub event_type: String,
    /// The `payload` column as PostgreSQL renders it: the record's value.
    pub payload: String,
    /// The `metadata` column as PostgreSQL renders it.
    pub metadata: String,
    /// The `recorded_at` column as PostgreSQL renders it (ISO, UTC).
    pub recorded_at: String,
    /// Its transaction.
    pub txn: Arc<TxnBounds>,
}

/// What the checker knows an event must look like.
pub trait Expected {
    /// Key and `seq_nr`.
    fn id(&self) -> &EventId;
    /// Its transaction, when known.
    fn txn(&self) -> Option<&TxnBounds> {
        None
    }
    /// How `record` differs from the event; `None` when it matches.
    fn mismatch(&self, record: &Record) -> Option<String>;
}

/// Only the identity is known (rows inserted in bulk by a test).
impl Expected for EventId {
    fn id(&self) -> &EventId {
        self
    }

    fn mismatch(&self, _: &Record) -> Option<String> {
        None
    }
}

impl Expected for Written {
    fn id(&self) -> &EventId {
        &self.id
    }

    fn txn(&self) -> Option<&TxnBounds> {
        Some(&self.txn)
    }

    fn mismatch(&self, record: &Record) -> Option<String> {
        let mut problems = Vec::new();
        if record.raw_value.as_deref() != Some(self.payload.as_bytes()) {
            problems.push(format!("value {:?}, not {:?}", record.value, self.payload));
        }
        let mut names: Vec<&str> = record.raw_headers.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        if names != EVENT_HEADERS {
            problems.push(format!("headers {names:?}, not {EVENT_HEADERS:?}"));
        }
        let seq = self.id.1.to_string();
        for (name, want) in [
            ("seq_nr", seq.as_str()),
            ("event_type", &self.event_type),
            ("metadata", &self.metadata),
            ("recorded_at", &self.recorded_at),
        ] {
            let got = raw_header(record, name);
            if got != Some(want.as_bytes()) {
                problems.push(format!(
                    "header {name} {:?}, not {want:?}",
                    got.map(String::from_utf8_lossy)
                ));
            }
        }
        match record
            .headers
            .get("lsn")
            .and_then(|l| l.parse::<Lsn>().ok())
        {
            Some(lsn) if self.txn.lsn_from <= lsn && lsn < self.txn.lsn_to => {}
            other => problems.push(format!(
                "lsn {other:?} is not the commit LSN: that starts in [{}, {})",
                self.txn.lsn_from, self.txn.lsn_to
            )),
        }
        match record.headers.get("commit_ts") {
            Some(ts)
                if is_rfc3339_micros(ts)
                    && self.txn.ts_from.as_str() <= ts.as_str()
                    && ts.as_str() <= self.txn.ts_to.as_str() => {}
            other => problems.push(format!(
                "commit_ts {other:?} is not the commit time: that lies in [{}, {}]",
                self.txn.ts_from, self.txn.ts_to
            )),
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

fn raw_header<'r>(record: &'r Record, name: &str) -> Option<&'r [u8]> {
    record
        .raw_headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

/// `2026-11-25T10:18:50.969472Z`: the README's format of `commit_ts`, which
/// makes timestamps of it compare correctly as text.
pub fn is_rfc3339_micros(ts: &str) -> bool {
    let pattern = b"dddd-dd-ddTdd:dd:dd.ddddddZ";
    ts.len() == pattern.len()
        && ts.bytes().zip(pattern).all(|(c, p)| match p {
            b'd' => c.is_ascii_digit(),
            p => c == *p,
        })
}

/// The server's clock as text comparable with `commit_ts`.
const CLOCK: &str =
    "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// The rows of one transaction, ready to insert.
#[derive(Debug, Default)]
struct Rows {
    aggregates: Vec<String>,
    seqs: Vec<i64>,
    event_types: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl Rows {
    fn push(&mut self, aggregate: String, seq: i64, rng: &mut fastrand::Rng) {
        const TYPES: [&str; 5] = [
            "Created",
            "ItemAdded",
            "Renamed to \"x\"",
            "Überwiesen",
            "with  spaces ",
        ];
        let n = self.seqs.len();
        let t = TXN_NUMBERS.load(Ordering::Relaxed);
        // Shapes whose text jsonb normalizes (key order, spacing, number
        // text), escapes, and characters beyond ASCII.
        let payload = match rng.u8(0..5) {
            0 => format!(r#"{{"t": {t}, "i": {n}}}"#),
            1 => format!(
                r#"{{"t":{t},"text":"quote \" backslash \\ tab \t newline \n ünïcødé ✓ 🚀"}}"#
            ),
            2 => format!(
                r#"{{"nested": {{"list": [1, 2.50, -3e2, null, true, "x"], "empty": {{}}}}, "t": {t}}}"#
            ),
            3 => {
                format!(r#"{{"big": 123456789012345678901234567890, "small": 0.000001, "t": {t}}}"#)
            }
            _ => format!(r#"[{t}, "{n}", {{"b": 1, "a": 2}}]"#),
        };
        self.aggregates.push(aggregate);
        self.seqs.push(seq);
        self.event_types
            .push(TYPES[rng.usize(0..TYPES.len())].to_owned());
        self.payloads.push(payload);
        self.metadata.push(format!(
            r#"{{"correlation_id": "c-{t}-{n}", "actor": "user-{}"}}"#,
            rng.u16(..)
        ));
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }
}

/// The next transaction's rows: `events` events over `aggregates` aggregates
/// named `{prefix}-{n}` continuing `next_seq`, or, for a transaction that
/// is to roll back, over `rolledback-{prefix}-{n}` continuing `rolled_back_seq`.
fn plan(
    rng: &mut fastrand::Rng,
    prefix: &str,
    aggregates: usize,
    events: usize,
    rollback: bool,
    next_seq: &mut HashMap<String, i64>,
) -> Rows {
    let mut rows = Rows::default();
    for _ in 0..events {
        let n = rng.usize(0..aggregates);
        let aggregate = if rollback {
            format!("{ROLLED_BACK}{prefix}-{n}")
        } else {
            format!("{prefix}-{n}")
        };
        let seq = next_seq.entry(aggregate.clone()).or_insert(1);
        rows.push(aggregate, *seq, rng);
        *seq += 1;
    }
    rows
}

/// Where one transaction got to.
enum Attempt {
    /// Committed; its events.
    Committed(Vec<Written>),
    /// Rolled back as planned.
    RolledBack,
    /// Failed before COMMIT was sent: not committed.
    Failed(tokio_postgres::Error),
    /// Failed after COMMIT was sent: committed or not, the server knows.
    InDoubt {
        error: tokio_postgres::Error,
        inserted: Vec<Written>,
    },
}

/// Inserts `rows` in one transaction and commits it (or rolls it back).
async fn attempt(client: &mut Client, rows: &Rows, rollback: bool) -> Attempt {
    let number = TXN_NUMBERS.fetch_add(1, Ordering::Relaxed);
    let txn = match client.transaction().await {
        Ok(txn) => txn,
        Err(error) => return Attempt::Failed(error),
    };
    // PostgreSQL's text of every column, in the session settings walrelay's
    // replication connection pins, so the writer knows each header exactly.
    let inserted = txn
        .batch_execute("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD';")
        .await;
    let inserted = match inserted {
        Ok(()) => {
            txn.query(
                "INSERT INTO events (aggregate_id, seq_nr, event_type, payload, metadata)
                 SELECT a, s, e, p::jsonb, m::jsonb
                   FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[])
                        WITH ORDINALITY AS u(a, s, e, p, m, o)
                  ORDER BY o
                 RETURNING aggregate_id, seq_nr, event_type, payload::text, metadata::text,
                           recorded_at::text",
                &[
                    &rows.aggregates,
                    &rows.seqs,
                    &rows.event_types,
                    &rows.payloads,
                    &rows.metadata,
                ],
            )
            .await
        }
        Err(error) => Err(error),
    };
    let inserted = match inserted {
        Ok(inserted) => inserted,
        Err(error) => return Attempt::Failed(error),
    };
    assert_eq!(inserted.len(), rows.len(), "INSERT ... RETURNING");
    if rollback {
        return match txn.rollback().await {
            Ok(()) => Attempt::RolledBack,
            Err(error) => Attempt::Failed(error),
        };
    }
    let before = match txn
        .query_one(
            &format!("SELECT pg_current_wal_insert_lsn()::text, {CLOCK}"),
            &[],
        )
        .await
    {
        Ok(row) => row,
        Err(error) => return Attempt::Failed(error),
    };
    let bounds = TxnBounds {
        number,
        lsn_from: before.get::<_, String>(0).parse().expect("an LSN"),
        lsn_to: Lsn(u64::MAX),
        ts_from: before.get(1),
        ts_to: "9999".to_owned(),
    };
    let events = |bounds: TxnBounds| {
        let bounds = Arc::new(bounds);
        inserted
            .iter()
            .map(|row| Written {
                id: (row.get(0), row.get(1)),
                event_type: row.get(2),
                payload: row.get(3),
                metadata: row.get(4),
                recorded_at: row.get(5),
                txn: Arc::clone(&bounds),
            })
            .collect::<Vec<_>>()
    };
    if let Err(error) = txn.commit().await {
        return Attempt::InDoubt {
            error,
            inserted: events(bounds),
        };
    }
    match after_commit(client, bounds.clone()).await {
        Ok(bounds) => Attempt::Committed(events(bounds)),
        // Committed; the server went away before the bounds were read.
        Err(error) => Attempt::InDoubt {
            error,
            inserted: events(bounds),
        },
    }
}

/// Completes `bounds` with the insert position and clock after the commit.
async fn after_commit(
    client: &Client,
    mut bounds: TxnBounds,
) -> Result<TxnBounds, tokio_postgres::Error> {
    let after = client
        .query_one(
            &format!("SELECT pg_current_wal_insert_lsn()::text, {CLOCK}"),
            &[],
        )
        .await?;
    bounds.lsn_to = after.get::<_, String>(0).parse().expect("an LSN");
    bounds.ts_to = after.get(1);
    Ok(bounds)
}

/// Writes `transactions` transactions of 1 to 5 events over `aggregates`
/// aggregates named `{prefix}-{n}`, rolling back every `rollback_every`-th
/// (those write to `rolledback-{prefix}-{n}` only); returns the committed
/// events in commit order. Sequence numbers continue from `next_seq`, which
/// is updated. Panics on any database error.
pub async fn write_mixed(
    client: &mut Client,
    prefix: &str,
    aggregates: usize,
    transactions: usize,
    rollback_every: usize,
    next_seq: &mut HashMap<String, i64>,
) -> Vec<Written> {
    let mut committed = Vec::new();
    let mut rng = fastrand::Rng::with_seed(transactions as u64 ^ aggregates as u64);
    for t in 0..transactions {
        let rollback = rollback_every > 0 && t % rollback_every == rollback_every - 1;
        let events = rng.usize(1..=5);
        let rows = plan(&mut rng, prefix, aggregates, events, rollback, next_seq);
        match attempt(client, &rows, rollback).await {
            Attempt::Committed(events) => committed.extend(events),
            Attempt::RolledBack => {}
            Attempt::Failed(error) | Attempt::InDoubt { error, .. } => {
                panic!("writing transaction {t}: {error}")
            }
        }
    }
    committed
}

/// The shape of a [`Writer`]'s transactions.
#[derive(Debug, Clone)]
pub struct Mix {
    /// Aggregates `{prefix}-0` .. `{prefix}-{aggregates - 1}`.
    pub aggregates: usize,
    /// Events of an ordinary transaction, from 1 to this.
    pub max_events: usize,
    /// Every this many transactions one has `big_events` events (0: never).
    pub big_every: usize,
    /// Events of a big transaction.
    pub big_events: usize,
    /// Every this many transactions one rolls back (0: never).
    pub rollback_every: usize,
    /// Pause between transactions.
    pub pause: Duration,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            aggregates: 50,
            max_events: 5,
            big_every: 0,
            big_events: 0,
            rollback_every: 6,
            pause: Duration::from_millis(2),
        }
    }
}

/// A writer that keeps writing through server crashes and restarts: a
/// transaction cut off after its COMMIT was sent is looked up once the
/// server is back, and counts as committed exactly when its rows are there.
/// The `(aggregate_id, seq_nr)` pairs of a transaction that did not commit
/// are never used again.
pub struct Writer {
    url: String,
    client: Option<Client>,
    prefix: String,
    mix: Mix,
    rng: fastrand::Rng,
    next_seq: HashMap<String, i64>,
    transactions: usize,
    /// Committed events, in commit order.
    pub committed: Vec<Written>,
    /// Transactions that failed because the server went away.
    pub interrupted: usize,
}

/// How long a [`Writer`] waits for the server to come back.
const RECONNECT_WAIT: Duration = Duration::from_secs(120);

impl Writer {
    /// A writer as the superuser at `url` (see `PgServer::superuser_url`).
    pub fn new(url: String, prefix: &str, mix: Mix, seed: u64) -> Self {
        Writer {
            url,
            client: None,
            prefix: prefix.to_owned(),
            mix,
            rng: fastrand::Rng::with_seed(seed),
            next_seq: HashMap::new(),
            transactions: 0,
            committed: Vec::new(),
            interrupted: 0,
        }
    }

    /// Writes the next transaction of the mix.
    pub async fn step(&mut self) {
        let t = self.transactions;
        self.transactions += 1;
        let rollback = self.mix.rollback_every > 0 && t % self.mix.rollback_every == 0;
        let events = if self.mix.big_every > 0 && t % self.mix.big_every == self.mix.big_every - 1 {
            self.mix.big_events
        } else {
            self.rng.usize(1..=self.mix.max_events)
        };
        let rows = plan(
            &mut self.rng,
            &self.prefix,
            self.mix.aggregates,
            events,
            rollback,
            &mut self.next_seq,
        );
        let client = self.client().await;
        match attempt(client, &rows, rollback).await {
            Attempt::Committed(events) => self.committed.extend(events),
            Attempt::RolledBack => {}
            Attempt::Failed(error) => self.lost_connection(&error),
            Attempt::InDoubt { error, inserted } => {
                self.lost_connection(&error);
                self.resolve(inserted).await;
            }
        }
    }

    /// Writes until `stop` is cancelled; returns the committed events.
    pub async fn run(mut self, stop: tokio_util::sync::CancellationToken) -> Self {
        while !stop.is_cancelled() {
            self.step().await;
            tokio::time::sleep(self.mix.pause).await;
        }
        self
    }

    fn lost_connection(&mut self, error: &tokio_postgres::Error) {
        // A server going away shows as an I/O error, a closed connection, or
        // a shutdown notice (class 57, operator intervention; 08, connection
        // exception); anything else the server says is a bug of the test.
        let refused = error.as_db_error().is_some_and(|e| {
            let code = e.code().code();
            !code.starts_with("57") && !code.starts_with("08")
        });
        assert!(
            !refused,
            "the writer failed for another reason than a lost server: {error}"
        );
        self.interrupted += 1;
        self.client = None;
    }

    /// Settles a transaction whose COMMIT had no answer: committed exactly
    /// when its rows are in the table.
    async fn resolve(&mut self, inserted: Vec<Written>) {
        let aggregates: Vec<&str> = inserted.iter().map(|w| w.id.0.as_str()).collect();
        let seqs: Vec<i64> = inserted.iter().map(|w| w.id.1).collect();
        let client = self.client().await;
        let found: i64 = client
            .query_one(
                "SELECT count(*) FROM events e
                   JOIN unnest($1::text[], $2::int8[]) AS u(a, s)
                     ON e.aggregate_id = u.a AND e.seq_nr = u.s",
                &[&aggregates, &seqs],
            )
            .await
            .expect("look up an in-doubt transaction")
            .get(0);
        if found == 0 {
            return;
        }
        assert_eq!(
            usize::try_from(found).unwrap(),
            inserted.len(),
            "part of a transaction committed"
        );
        let bounds = after_commit(client, (*inserted[0].txn).clone())
            .await
            .expect("read the WAL position");
        let bounds = Arc::new(bounds);
        self.committed.extend(inserted.into_iter().map(|mut w| {
            w.txn = Arc::clone(&bounds);
            w
        }));
    }

    async fn client(&mut self) -> &mut Client {
        if self.client.is_none() {
            let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
            let client = loop {
                match tokio_postgres::connect(&self.url, NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(connection);
                        break client;
                    }
                    Err(error) => {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "the server did not come back within {RECONNECT_WAIT:?}: {error}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            self.client = Some(client);
        }
        self.client.as_mut().expect("connected just above")
    }
}

/// One event seen more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// How many times it is on the topic.
    pub deliveries: usize,
    /// Its `lsn` header.
    pub lsn: Option<Lsn>,
}

/// What a comparison of the topic with the committed events found.
#[derive(Debug, Default)]
pub struct Report {
    /// Committed events that never arrived.
    pub missing: Vec<EventId>,
    /// Where the missing events committed, as far as the writer knows.
    pub missing_commits: Vec<String>,
    /// Events that arrived but never committed (a leaked rolled-back row included).
    pub unexpected: Vec<EventId>,
    /// Events that arrived more than once.
    pub duplicates: BTreeMap<EventId, Duplicate>,
    /// Aggregates whose events landed in more than one partition.
    pub split_aggregates: Vec<String>,
    /// First deliveries that come after a higher `seq_nr` of their aggregate.
    pub out_of_order: Vec<String>,
    /// Records whose content differs from the committed row, or from the
    /// first delivery of the same event, or whose headers are malformed.
    pub mismatched: Vec<String>,
}

/// How many items of each finding a failure message shows.
const SHOWN: usize = 10;

impl Report {
    /// Panics with the findings (and `context`, walrelay's log say) unless
    /// every invariant holds; duplicates are allowed only when `allow_duplicates`.
    pub fn assert_clean(&self, allow_duplicates: bool, context: &str) {
        let clean = self.clean_but_duplicates() && (allow_duplicates || self.duplicates.is_empty());
        assert!(
            clean,
            "delivery invariants violated:\n{}\n{context}",
            self.summary()
        );
    }

    /// Like [`assert_clean`](Self::assert_clean), with duplicates bounded
    /// by the replays: each logical decoding session starting at `resumes[j]`
    /// sends every transaction whose commit starts at or after it once, so an
    /// event may be on the topic at most as many times as there are sessions
    /// that began at or before its `lsn` (`PgServer::decoding_sessions`).
    pub fn assert_clean_replays(&self, resumes: &[Lsn], context: &str) {
        assert!(!resumes.is_empty(), "no decoding session in the server log");
        let excessive: Vec<String> = self
            .duplicates
            .iter()
            .filter_map(|(id, d)| {
                let sessions = d
                    .lsn
                    .map_or(0, |lsn| resumes.iter().filter(|r| **r <= lsn).count());
                (d.deliveries > sessions).then(|| {
                    format!(
                        "{id:?} (lsn {:?}) is on the topic {} times, but only {sessions} sessions started at or before it",
                        d.lsn, d.deliveries
                    )
                })
            })
            .collect();
        assert!(
            self.clean_but_duplicates() && excessive.is_empty(),
            "delivery invariants violated:\n{}\nreplays beyond the sessions that started before them ({}): {:#?}\nsessions resumed at {resumes:?}\n{context}",
            self.summary(),
            excessive.len(),
            &excessive[..excessive.len().min(SHOWN)],
        );
    }

    fn clean_but_duplicates(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.split_aggregates.is_empty()
            && self.out_of_order.is_empty()
            && self.mismatched.is_empty()
    }

    /// The findings, each list cut to its first few items.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let mut list = |name: &str, items: Vec<String>| {
            if !items.is_empty() {
                let _ = writeln!(
                    out,
                    "{name} ({}): {:#?}",
                    items.len(),
                    &items[..items.len().min(SHOWN)]
                );
            }
        };
        list("missing", debug_all(&self.missing));
        list(
            "missing, where they committed",
            self.missing_commits.clone(),
        );
        list("unexpected", debug_all(&self.unexpected));
        list(
            "duplicates",
            self.duplicates
                .iter()
                .map(|(id, d)| format!("{id:?}: {d:?}"))
                .collect(),
        );
        list("split aggregates", self.split_aggregates.clone());
        list("out of order", self.out_of_order.clone());
        list("mismatched", self.mismatched.clone());
        out
    }
}

fn debug_all<T: std::fmt::Debug>(items: &[T]) -> Vec<String> {
    items.iter().map(|i| format!("{i:?}")).collect()
}

/// Compares `records` (as read, in offset order per partition) with
/// `committed`: each committed event arrives, nothing else does, each
/// record's key, value and headers are the committed row's, the events of
/// one transaction share one `lsn` and `commit_ts`, an aggregate stays in one
/// partition, and its first deliveries come in `seq_nr` order.
pub fn check<E: Expected>(committed: &[E], records: &[Record]) -> Report {
    let mut report = Report::default();
    let expected: HashMap<&EventId, &E> = committed.iter().map(|e| (e.id(), e)).collect();
    // Per event: its first delivery, and how often it came.
    let mut seen: HashMap<EventId, (&Record, usize)> = HashMap::new();
    let mut partitions: HashMap<&str, HashSet<i32>> = HashMap::new();
    let mut txns: HashMap<u64, (&str, &str)> = HashMap::new();
    let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    // Per aggregate: the highest seq_nr first-delivered so far, and where.
    let mut last_first: HashMap<&str, (i64, i64)> = HashMap::new();
    for list in by_partition.values_mut() {
        list.sort_by_key(|r| r.offset);
        for r in list.iter() {
            let at = format!("{}@{}/{}", r.key, r.partition, r.offset);
            if let Some(problem) = malformed(r) {
                report.mismatched.push(format!("{at}: {problem}"));
                continue;
            }
            let seq: i64 = r.header("seq_nr").parse().expect("checked by malformed");
            let id = (r.key.clone(), seq);
            partitions.entry(&r.key).or_default().insert(r.partition);
            let entry = seen.entry(id.clone()).or_insert((r, 0));
            entry.1 += 1;
            if entry.1 == 1 {
                let last = last_first.entry(&r.key).or_insert((0, -1));
                if seq < last.0 {
                    report.out_of_order.push(format!(
                        "{at}: seq_nr {seq} first arrives after seq_nr {} (offset {})",
                        last.0, last.1
                    ));
                } else {
                    *last = (seq, r.offset);
                }
            } else if content(entry.0) != content(r) {
                report.mismatched.push(format!(
                    "{at}: differs from the first delivery (offset {}): {:?} against {:?}",
                    entry.0.offset,
                    content(r),
                    content(entry.0)
                ));
            }
            match expected.get(&id) {
                None if entry.1 == 1 => report.unexpected.push(id),
                None => {}
                Some(e) => {
                    if let Some(problem) = e.mismatch(r) {
                        report.mismatched.push(format!("{at}: {problem}"));
                    }
                    if let Some(txn) = e.txn() {
                        let stamp = (r.header("lsn"), r.header("commit_ts"));
                        let first = *txns.entry(txn.number).or_insert(stamp);
                        if first != stamp {
                            report.mismatched.push(format!(
                                "{at}: lsn and commit_ts {stamp:?}, but another event of its transaction has {first:?}"
                            ));
                        }
                    }
                }
            }
        }
    }
    for e in committed.iter().filter(|e| !seen.contains_key(e.id())) {
        report.missing.push(e.id().clone());
        if let Some(txn) = e.txn() {
            report.missing_commits.push(format!(
                "{:?}: committed in [{}, {}) at [{}, {}]",
                e.id(),
                txn.lsn_from,
                txn.lsn_to,
                txn.ts_from,
                txn.ts_to
            ));
        }
    }
    report.duplicates = seen
        .into_iter()
        .filter(|(_, (_, n))| *n > 1)
        .map(|(id, (first, deliveries))| {
            let lsn = first.headers.get("lsn").and_then(|l| l.parse().ok());
            (id, Duplicate { deliveries, lsn })
        })
        .collect();
    report.split_aggregates = partitions
        .into_iter()
        .filter(|(_, p)| p.len() > 1)
        .map(|(a, _)| a.to_owned())
        .collect();
    report
}

/// A header's name and value.
type Header<'r> = (&'r str, Option<&'r [u8]>);

/// What every copy of an event carries alike: the value and the headers but
/// `lsn` and `commit_ts`. Those two differ where an initial snapshot was
/// published again (a new snapshot, a new position and time); for events
/// whose commit the writer saw, they are checked on every copy against it.
fn content(r: &Record) -> (Option<&[u8]>, Vec<Header<'_>>) {
    let headers = r
        .raw_headers
        .iter()
        .filter(|(name, _)| name != "lsn" && name != "commit_ts")
        .map(|(name, value)| (name.as_str(), value.as_deref()))
        .collect();
    (r.raw_value.as_deref(), headers)
}

/// What is wrong with a record whatever its row: a header named twice or
/// without a value, or an `lsn`, `seq_nr` or `commit_ts` that does not parse.
fn malformed(r: &Record) -> Option<String> {
    let mut names = HashSet::new();
    for (name, value) in &r.raw_headers {
        if !names.insert(name) {
            return Some(format!("header {name} twice"));
        }
        if value.is_none() {
            return Some(format!("header {name} without a value"));
        }
    }
    if r.headers
        .get("lsn")
        .and_then(|l| l.parse::<Lsn>().ok())
        .is_none()
    {
        return Some(format!("lsn header {:?}", r.headers.get("lsn")));
    }
    if r.headers
        .get("seq_nr")
        .and_then(|s| s.parse::<i64>().ok())
        .is_none()
    {
        return Some(format!("seq_nr header {:?}", r.headers.get("seq_nr")));
    }
    if !r
        .headers
        .get("commit_ts")
        .is_some_and(|ts| is_rfc3339_micros(ts))
    {
        return Some(format!("commit_ts header {:?}", r.headers.get("commit_ts")));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(key: &str, seq: i64, txn: &Arc<TxnBounds>) -> Written {
        Written {
            id: (key.to_owned(), seq),
            event_type: "Created".into(),
            payload: r#"{"t": 1}"#.into(),
            metadata: "{}".into(),
            recorded_at: "2026-01-02 03:04:05.6+00".into(),
            txn: Arc::clone(txn),
        }
    }

    fn record(w: &Written, partition: i32, offset: i64, lsn: &str) -> Record {
        let headers: Vec<(String, Option<Vec<u8>>)> = [
            ("seq_nr", w.id.1.to_string()),
            ("event_type", w.event_type.clone()),
            ("metadata", w.metadata.clone()),
            ("recorded_at", w.recorded_at.clone()),
            ("lsn", lsn.to_owned()),
            ("commit_ts", "2026-01-02T03:04:05.700000Z".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Some(v.into_bytes())))
        .collect();
        Record {
            partition,
            offset,
            key: w.id.0.clone(),
            value: Some(w.payload.clone()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8(v.clone().unwrap()).unwrap()))
                .collect(),
            raw_value: Some(w.payload.clone().into_bytes()),
            raw_headers: headers,
        }
    }

    fn txn() -> Arc<TxnBounds> {
        Arc::new(TxnBounds {
            number: 1,
            lsn_from: Lsn(0x100),
            lsn_to: Lsn(0x200),
            ts_from: "2026-01-02T03:04:05.600000Z".into(),
            ts_to: "2026-01-02T03:04:05.800000Z".into(),
        })
    }

    #[test]
    fn matching_records_are_clean() {
        let t = txn();
        let events = [written("a", 1, &t), written("a", 2, &t)];
        let records = [
            record(&events[0], 0, 0, "0/180"),
            record(&events[1], 0, 1, "0/180"),
        ];
        let report = check(&events, &records);
        assert!(
            report.clean_but_duplicates() && report.duplicates.is_empty(),
            "{}",
            report.summary()
        );
    }

    #[test]
    fn content_lsn_and_commit_ts_are_compared() {
        let t = txn();
        let events = [written("a", 1, &t), written("a", 2, &t)];
        let mut value = record(&events[0], 0, 0, "0/180");
        value.raw_value = Some(br#"{"t":1}"#.to_vec());
        let mut header = record(&events[1], 0, 1, "0/180");
        header.raw_headers[2].1 = Some(br#"{"x": 1}"#.to_vec());
        assert_eq!(check(&events, &[value, header]).mismatched.len(), 2);
        // Outside the commit's bounds, or two LSNs in one transaction.
        let report = check(
            &events,
            &[
                record(&events[0], 0, 0, "0/200"),
                record(&events[1], 0, 1, "0/100"),
            ],
        );
        assert_eq!(report.mismatched.len(), 2, "{}", report.summary());
        // Of an event known by its identity only, a copy must equal the
        // first delivery but for lsn and commit_ts (a republished snapshot).
        let ids = [events[0].id.clone()];
        let mut again = record(&events[0], 0, 1, "0/190");
        again.raw_headers[5].1 = Some(b"2026-01-02T03:04:06.000000Z".to_vec());
        assert!(
            check(&ids, &[record(&events[0], 0, 0, "0/180"), again.clone()])
                .mismatched
                .is_empty()
        );
        again.raw_value = Some(b"{}".to_vec());
        assert_eq!(
            check(&ids, &[record(&events[0], 0, 0, "0/180"), again])
                .mismatched
                .len(),
            1
        );
        let mut extra = record(&events[0], 0, 0, "0/180");
        extra
            .raw_headers
            .push(("aggregate_id".into(), Some(b"a".to_vec())));
        assert_eq!(check(&events[..1], &[extra]).mismatched.len(), 1);
    }

    #[test]
    fn a_leaked_rolled_back_row_is_unexpected_and_replays_are_bounded() {
        let t = txn();
        let events = [written("a", 1, &t)];
        let leaked = written("rolledback-a", 1, &t);
        let records = [
            record(&events[0], 0, 0, "0/180"),
            record(&leaked, 0, 1, "0/180"),
            record(&events[0], 0, 2, "0/180"),
        ];
        let report = check(&events, &records);
        assert_eq!(report.unexpected, [("rolledback-a".to_owned(), 1)]);
        assert_eq!(report.duplicates.len(), 1);
        let twice = check(&events, &[records[0].clone(), records[2].clone()]);
        twice.assert_clean_replays(&[Lsn(0x100), Lsn(0x180)], "two sessions cover it");
        let once = std::panic::catch_unwind(|| {
            twice.assert_clean_replays(&[Lsn(0x100), Lsn(0x181)], "the second began after it");
        });
        assert!(once.is_err());
    }

    #[test]
    fn first_deliveries_out_of_order_are_found() {
        let t = txn();
        let events = [written("a", 1, &t), written("a", 2, &t)];
        let records = [
            record(&events[1], 0, 0, "0/180"),
            record(&events[0], 0, 1, "0/180"),
        ];
        assert_eq!(
            check(&events, &records).out_of_order,
            ["a@0/1: seq_nr 1 first arrives after seq_nr 2 (offset 0)"]
        );
    }
}
