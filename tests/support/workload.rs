//! Writing events as services do, and checking what reached Kafka against
//! what committed: the invariants of DESIGN.md as one reusable checker.
use std::collections::{BTreeMap, HashMap, HashSet};

use super::kafka::Record;

/// One committed event, identified as consumers identify it.
pub type EventId = (String, i64);

/// Writes `transactions` transactions of 1 to 5 events over `aggregates`
/// aggregates named `{prefix}-{n}`, rolling back every `rollback_every`-th;
/// returns the committed events in commit order. Sequence numbers continue
/// from `next_seq`, which is updated.
pub async fn write_mixed(
    client: &mut tokio_postgres::Client,
    prefix: &str,
    aggregates: usize,
    transactions: usize,
    rollback_every: usize,
    next_seq: &mut HashMap<String, i64>,
) -> Vec<EventId> {
    let mut committed = Vec::new();
    let mut rng = fastrand::Rng::with_seed(transactions as u64 ^ aggregates as u64);
    for t in 0..transactions {
        let txn = client.transaction().await.expect("begin");
        let mut seqs = next_seq.clone();
        let mut rows = Vec::new();
        for _ in 0..rng.usize(1..=5) {
            let aggregate = format!("{prefix}-{}", rng.usize(0..aggregates));
            let seq = seqs.entry(aggregate.clone()).or_insert(1);
            txn.execute(
                "INSERT INTO events (aggregate_id, seq_nr, event_type, payload) \
                 VALUES ($1, $2, 'Tested', jsonb_build_object('t', $3::int))",
                &[&aggregate, &*seq, &i32::try_from(t).unwrap()],
            )
            .await
            .expect("insert");
            rows.push((aggregate, *seq));
            *seq += 1;
        }
        if rollback_every > 0 && t % rollback_every == rollback_every - 1 {
            txn.rollback().await.expect("rollback");
        } else {
            txn.commit().await.expect("commit");
            *next_seq = seqs;
            committed.extend(rows);
        }
    }
    committed
}

/// What a comparison of the topic with the committed events found.
#[derive(Debug, Default)]
pub struct Report {
    /// Committed events that never arrived.
    pub missing: Vec<EventId>,
    /// Events that arrived but never committed.
    pub unexpected: Vec<EventId>,
    /// Events that arrived more than once, with their count.
    pub duplicates: BTreeMap<EventId, usize>,
    /// Aggregates whose events landed in more than one partition.
    pub split_aggregates: Vec<String>,
    /// Aggregates whose first deliveries are not in seq_nr order.
    pub out_of_order: Vec<String>,
    /// Records without a parseable `lsn` or `seq_nr` header.
    pub bad_headers: usize,
}

impl Report {
    /// Panics with the findings (and `context`, walrelay's log say) unless
    /// every invariant holds; duplicates are allowed only when `allow_duplicates`.
    pub fn assert_clean(&self, allow_duplicates: bool, context: &str) {
        let clean = self.missing.is_empty()
            && self.unexpected.is_empty()
            && (allow_duplicates || self.duplicates.is_empty())
            && self.split_aggregates.is_empty()
            && self.out_of_order.is_empty()
            && self.bad_headers == 0;
        assert!(clean, "delivery invariants violated: {self:#?}\n{context}");
    }
}

/// Compares `records` (in partition offset order) with `committed`.
pub fn check(committed: &[EventId], records: &[Record]) -> Report {
    let mut report = Report::default();
    let expected: HashSet<&EventId> = committed.iter().collect();
    let mut seen: HashMap<EventId, usize> = HashMap::new();
    let mut partitions: HashMap<&str, HashSet<i32>> = HashMap::new();
    // Records come in offset order per partition; per aggregate, the first
    // delivery of each seq_nr must come in increasing order.
    let mut by_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut last_first: HashMap<&str, i64> = HashMap::new();
    for list in by_partition.values_mut() {
        list.sort_by_key(|r| r.offset);
        for r in list.iter() {
            let lsn_ok = r.headers.get("lsn").is_some_and(|l| l.contains('/'));
            let Some(seq) = r.headers.get("seq_nr").and_then(|s| s.parse::<i64>().ok()) else {
                report.bad_headers += 1;
                continue;
            };
            if !lsn_ok {
                report.bad_headers += 1;
            }
            let id = (r.key.clone(), seq);
            partitions.entry(&r.key).or_default().insert(r.partition);
            let count = seen.entry(id.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                let last = last_first.entry(&r.key).or_insert(0);
                if seq < *last && !report.out_of_order.contains(&r.key) {
                    report.out_of_order.push(r.key.clone());
                }
                *last = (*last).max(seq);
            }
            if !expected.contains(&id) && *count == 1 {
                report.unexpected.push(id);
            }
        }
    }
    report.missing = committed
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .cloned()
        .collect();
    report.duplicates = seen.into_iter().filter(|(_, n)| *n > 1).collect();
    report.split_aggregates = partitions
        .into_iter()
        .filter(|(_, p)| p.len() > 1)
        .map(|(a, _)| a.to_owned())
        .collect();
    report
}
