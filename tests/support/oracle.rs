//! An oracle for confirm-after-ack, watching from outside: the slot's
//! `confirmed_flush_lsn` sampled every 50 ms, and right after each sample
//! every partition's high watermark. At the end, with the topic read:
//!
//! - the confirmed position only moves forward, and never past the server's
//!   WAL end at that moment;
//! - every event whose commit LSN (its `lsn` header, the commit record's
//!   start) is below a sampled confirmed position C sits at an offset below
//!   the high watermark recorded right after that sample: PostgreSQL was told
//!   "done up to C" only for events already on the topic.
//!
//! While a test has the brokers down, watermarks cannot be asked for. The
//! test then hands the oracle the watermarks it read right before the outage,
//! with nothing in flight ([`ConfirmSampler::freeze`]): the topic cannot grow
//! while the brokers are down, so they stay exact. A sample whose watermarks
//! could not be read otherwise takes those of the next sample that has them,
//! a bound looser by at most that gap.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use walrelay::pg::lsn::Lsn;

use super::kafka::{Kafka, Record, partitions, watermarks};
use super::postgres::PgServer;

/// How often the slot is sampled.
pub const PERIOD: Duration = Duration::from_millis(50);

/// One look at the slot and the topic.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The slot's `confirmed_flush_lsn`.
    pub confirmed: Lsn,
    /// `pg_current_wal_lsn()` right after.
    pub wal_end: Lsn,
    /// Each partition's high watermark right after that, when known.
    pub high: Option<Vec<i64>>,
}

/// Samples a slot and a topic until finished.
pub struct ConfirmSampler {
    stop: CancellationToken,
    frozen: Arc<Mutex<Option<Vec<i64>>>>,
    task: JoinHandle<Vec<Sample>>,
}

impl ConfirmSampler {
    /// Starts sampling `slot` of `pg` and `topic` of `kafka`.
    pub async fn start(pg: &PgServer, kafka: &Kafka, topic: &str, slot: &str) -> Self {
        let client = pg.client().await;
        let consumer = Arc::new(kafka.consumer());
        let partitions = partitions(&consumer, topic);
        let stop = CancellationToken::new();
        let frozen: Arc<Mutex<Option<Vec<i64>>>> = Arc::default();
        let task = tokio::spawn(sample(
            client,
            consumer,
            topic.to_owned(),
            partitions,
            slot.to_owned(),
            stop.clone(),
            Arc::clone(&frozen),
        ));
        ConfirmSampler { stop, frozen, task }
    }

    /// From now on, samples take `high` as the watermarks instead of asking
    /// the brokers: call with the watermarks read with nothing in flight,
    /// right before taking the brokers down, and [`thaw`](Self::thaw)
    /// before bringing them back.
    pub fn freeze(&self, high: Vec<i64>) {
        *self.frozen.lock().unwrap() = Some(high);
    }

    /// Samples ask the brokers again.
    pub fn thaw(&self) {
        *self.frozen.lock().unwrap() = None;
    }

    /// Stops sampling and returns the samples.
    pub async fn finish(self) -> Vec<Sample> {
        self.stop.cancel();
        self.task.await.expect("the sampler")
    }
}

async fn sample(
    client: tokio_postgres::Client,
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
    slot: String,
    stop: CancellationToken,
    frozen: Arc<Mutex<Option<Vec<i64>>>>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        ticker.tick().await;
        let confirmed = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read the slot")
            .and_then(|row| row.get::<_, Option<String>>(0));
        let Some(confirmed) = confirmed else {
            continue;
        };
        let wal_end: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("read the WAL end")
            .get(0);
        let frozen = frozen.lock().unwrap().clone();
        let high = if frozen.is_some() {
            frozen
        } else {
            let consumer = Arc::clone(&consumer);
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || {
                watermarks(&consumer, &topic, partitions, Duration::from_secs(1))
            })
            .await
            .expect("the watermark query")
            .map(|w| w.into_iter().map(|(_, high)| high).collect())
        };
        samples.push(Sample {
            confirmed: confirmed.parse().expect("an LSN"),
            wal_end: wal_end.parse().expect("an LSN"),
            high,
        });
    }
    samples
}

/// Asserts confirm-after-ack on `samples` against `records`, the whole
/// topic: see the module documentation. Returns how many samples checked
/// coverage and how many distinct confirmed positions they saw.
pub fn assert_confirmed_only_what_was_on_the_topic(
    samples: &[Sample],
    records: &[Record],
) -> (usize, usize) {
    let mut problems = Vec::new();
    for pair in samples.windows(2) {
        if pair[1].confirmed < pair[0].confirmed {
            problems.push(format!(
                "confirmed_flush_lsn moved back from {} to {}",
                pair[0].confirmed, pair[1].confirmed
            ));
        }
    }
    for s in samples.iter().filter(|s| s.confirmed > s.wal_end) {
        problems.push(format!(
            "confirmed_flush_lsn {} beyond the WAL end {}",
            s.confirmed, s.wal_end
        ));
    }

    // A sample without watermarks takes the next known ones.
    let mut high: Vec<Option<&Vec<i64>>> = samples.iter().map(|s| s.high.as_ref()).collect();
    for i in (0..high.len().saturating_sub(1)).rev() {
        if high[i].is_none() {
            high[i] = high[i + 1];
        }
    }

    // Each event's first delivery: where it landed and its commit LSN.
    let mut first: std::collections::HashMap<(&str, &str), (i32, i64, Lsn)> =
        std::collections::HashMap::new();
    for r in records {
        let lsn: Lsn = r.header("lsn").parse().expect("an lsn header");
        let entry = first
            .entry((r.key.as_str(), r.header("seq_nr")))
            .or_insert((r.partition, r.offset, lsn));
        if r.offset < entry.1 {
            *entry = (r.partition, r.offset, lsn);
        }
    }
    let mut checked = 0;
    for (s, high) in samples.iter().zip(&high) {
        let Some(high) = high else {
            continue;
        };
        checked += 1;
        for ((key, seq), (partition, offset, lsn)) in &first {
            let end = high[usize::try_from(*partition).unwrap()];
            if *lsn < s.confirmed && *offset >= end {
                problems.push(format!(
                    "confirmed {} while {key} seq_nr {seq} (lsn {lsn}) was not on the topic: \
                     offset {offset} in partition {partition}, whose end was {end}",
                    s.confirmed
                ));
            }
        }
    }
    let mut distinct: Vec<Lsn> = samples.iter().map(|s| s.confirmed).collect();
    distinct.dedup();
    assert!(
        problems.is_empty(),
        "confirm-after-ack violated ({} findings, first ones): {:#?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    (checked, distinct.len())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn record(key: &str, offset: i64, lsn: &str) -> Record {
        let headers: BTreeMap<String, String> = [("lsn", lsn), ("seq_nr", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Record {
            partition: 0,
            offset,
            key: key.to_owned(),
            value: None,
            raw_value: None,
            raw_headers: headers
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone().into_bytes())))
                .collect(),
            headers,
        }
    }

    fn sample(confirmed: u64, high: Option<i64>) -> Sample {
        Sample {
            confirmed: Lsn(confirmed),
            wal_end: Lsn(0x1000),
            high: high.map(|h| vec![h]),
        }
    }

    #[test]
    fn a_confirm_covers_only_what_is_on_the_topic() {
        let records = [record("a", 0, "0/100"), record("b", 1, "0/200")];
        // b (offset 1) is on the topic once the end is 2.
        let fine = [
            sample(0x101, Some(1)),
            sample(0x201, None),
            sample(0x201, Some(2)),
        ];
        assert_eq!(
            assert_confirmed_only_what_was_on_the_topic(&fine, &records),
            (3, 2)
        );
        for bad in [
            // Past b while the topic ended before it.
            vec![sample(0x201, Some(1))],
            // Backwards.
            vec![sample(0x101, Some(2)), sample(0x100, Some(2))],
            // Beyond the WAL end.
            vec![sample(0x2000, Some(2))],
        ] {
            let outcome = std::panic::catch_unwind(|| {
                assert_confirmed_only_what_was_on_the_topic(&bad, &records)
            });
            assert!(outcome.is_err(), "{bad:?}");
        }
    }
}
