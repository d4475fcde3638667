//! A Kafka protocol endpoint for tests: librdkafka's mock cluster, listening
//! on real TCP ports that the walrelay process connects to, and a consumer
//! that reads back what was published.
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// How long the topic must stay silent, after the last record and with the
/// reader caught up to every partition's end, before [`Kafka::read`] returns:
/// long enough for a replay in progress (a reconnect, a restart) to show the
/// late duplicates it sends.
pub const QUIET: Duration = Duration::from_secs(2);

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The partition it landed in.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The key as text.
    pub key: String,
    /// The value as text (`None` for a null value; invalid UTF-8 replaced).
    pub value: Option<String>,
    /// Headers by name (a repeated name keeps its last value; see `raw_headers`).
    pub headers: BTreeMap<String, String>,
    /// The value's bytes exactly as the broker holds them.
    pub raw_value: Option<Vec<u8>>,
    /// The headers in order, repeated names and null values included.
    pub raw_headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// A header that must be there.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no header {name}: {self:?}"))
    }

    /// The `seq_nr` header as a number.
    pub fn seq_nr(&self) -> i64 {
        self.header("seq_nr").parse().expect("numeric seq_nr")
    }

    fn from_message(message: &impl Message) -> Self {
        let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
        let raw_headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let headers = raw_headers
            .iter()
            .map(|(k, v)| (k.clone(), text(v.as_deref()).unwrap_or_default()))
            .collect();
        Record {
            partition: message.partition(),
            offset: message.offset(),
            key: text(message.key()).unwrap_or_default(),
            value: text(message.payload()),
            headers,
            raw_value: message.payload().map(<[u8]>::to_vec),
            raw_headers,
        }
    }
}

/// A running mock cluster.
pub struct Kafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
    brokers: i32,
}

impl Kafka {
    /// Starts `brokers` brokers with topic `events` of `partitions` partitions.
    pub fn start(brokers: i32, partitions: i32) -> Self {
        let cluster = MockCluster::new(brokers).expect("start the mock cluster");
        cluster
            .create_topic("events", partitions, 1)
            .expect("create topic events");
        Kafka { cluster, brokers }
    }

    /// `host:port,...` of the brokers.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The cluster, for fault injection.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }

    /// Takes every broker down (connections refused) or brings them back.
    pub fn set_all_brokers(&self, up: bool) {
        for id in 1..=self.brokers {
            if up {
                self.cluster.broker_up(id).expect("broker up");
            } else {
                self.cluster.broker_down(id).expect("broker down");
            }
        }
    }

    /// Delays every broker's answers by `rtt` (zero: back to normal).
    pub fn set_round_trip_time(&self, rtt: Duration) {
        for id in 1..=self.brokers {
            self.cluster
                .broker_round_trip_time(id, rtt)
                .expect("broker round trip time");
        }
    }

    /// A consumer of this cluster that commits nothing.
    pub fn consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "walrelay-tests")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer")
    }

    /// A [`consumer`](Self::consumer) assigned every partition of `topic`,
    /// from its beginning, and the number of partitions.
    fn assigned_from_start(&self, topic: &str) -> (BaseConsumer, i32) {
        let consumer = self.consumer();
        let partitions = partitions(&consumer, topic);
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).expect("assign");
        (consumer, partitions)
    }

    /// Reads `topic` from the beginning, in offset order per partition, until
    /// `count` distinct events (by key and `seq_nr`) arrived and then the
    /// topic stayed quiet: no record for [`QUIET`] and the reader at every
    /// partition's end. Duplicates are returned but not counted. Returns what
    /// it has when `timeout` passes first (the caller's checks then name what
    /// is missing); a topic that never goes quiet is read for `timeout` plus
    /// [`QUIET`] at most.
    pub fn read(&self, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
        self.read_by(topic, count, timeout, |r| {
            (r.key.clone(), r.headers.get("seq_nr").cloned())
        })
    }

    /// [`Kafka::read`] for events told apart by `identity` (a table without
    /// `seq_nr`: by its `id` header, say).
    pub fn read_by<I: std::hash::Hash + Eq>(
        &self,
        topic: &str,
        count: usize,
        timeout: Duration,
        identity: impl Fn(&Record) -> I,
    ) -> Vec<Record> {
        let (consumer, partitions) = self.assigned_from_start(topic);
        let deadline = Instant::now() + timeout;
        let mut records: Vec<Record> = Vec::new();
        let mut distinct = HashSet::new();
        let mut last_record = Instant::now();
        // Per partition, the offset after the last record read.
        let mut next = vec![0_i64; usize::try_from(partitions).unwrap()];
        loop {
            let now = Instant::now();
            if distinct.len() >= count && now >= last_record + QUIET {
                let ends = watermarks(&consumer, topic, partitions, Duration::from_secs(5));
                let caught_up = ends
                    .as_ref()
                    .is_some_and(|ends| ends.iter().zip(&next).all(|((_, high), n)| n >= high));
                if caught_up {
                    break;
                }
            }
            // Bounded whatever the topic does: short of events, or never quiet.
            if (distinct.len() < count && now >= deadline) || now >= deadline + QUIET {
                break;
            }
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let record = Record::from_message(&message.expect("consume"));
            last_record = Instant::now();
            next[usize::try_from(record.partition).unwrap()] = record.offset + 1;
            distinct.insert(identity(&record));
            records.push(record);
        }
        // The mock cluster keeps at most 5 MiB (and 100,000 batches) per
        // partition and drops the oldest beyond that: a test that writes more
        // would miss records through no fault of walrelay's.
        if let Some(ends) = watermarks(&consumer, topic, partitions, Duration::from_secs(5)) {
            let dropped: Vec<(i32, i64)> = (0..partitions)
                .zip(ends)
                .filter(|(_, (low, _))| *low > 0)
                .map(|(p, (low, _))| (p, low))
                .collect();
            assert!(
                dropped.is_empty(),
                "the mock cluster dropped the oldest records of {topic} (partition, first offset kept): \
                 {dropped:?}; it keeps 5 MiB per partition, so write less or use more partitions"
            );
        }
        records
    }

    /// The first record polled from `topic`, read from the beginning of
    /// every partition: one record, without waiting for the topic to go
    /// quiet as [`Kafka::read`] does.
    pub fn first_record(&self, topic: &str, timeout: Duration) -> Record {
        let (consumer, _) = self.assigned_from_start(topic);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                return Record::from_message(&message.expect("consume"));
            }
            assert!(
                Instant::now() < deadline,
                "no record on {topic} within {timeout:?}"
            );
        }
    }

    /// A reader of `topic` from the beginning of every partition, that
    /// reads up to where the partitions end at the moment it is asked.
    pub fn reader(&self, topic: &str) -> Reader {
        let (consumer, partitions) = self.assigned_from_start(topic);
        Reader {
            consumer,
            topic: topic.to_owned(),
            next: vec![0; usize::try_from(partitions).unwrap()],
            records: Vec::new(),
        }
    }

    /// Every partition's (low, high) watermark of `topic` now; `None` when
    /// the cluster does not answer within `timeout` (a broker is down).
    pub fn watermarks(&self, topic: &str, timeout: Duration) -> Option<Vec<(i64, i64)>> {
        let consumer = self.consumer();
        let partitions = partitions(&consumer, topic);
        watermarks(&consumer, topic, partitions, timeout)
    }
}

/// The number of partitions of `topic`.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> i32 {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    i32::try_from(metadata.topics()[0].partitions().len()).unwrap()
}

/// Every partition's (low, high) watermark, asked of the partitions' leaders
/// at once; `None` when one does not answer within `timeout`.
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Option<Vec<(i64, i64)>> {
    // One request per partition: in parallel, so a slow broker costs one
    // round trip, not one per partition.
    std::thread::scope(|scope| {
        let asks: Vec<_> = (0..partitions)
            .map(|p| scope.spawn(move || consumer.fetch_watermarks(topic, p, timeout).ok()))
            .collect();
        asks.into_iter()
            .map(|ask| ask.join().expect("watermark thread"))
            .collect()
    })
}

/// Reads a topic up to the ends its partitions have at the moment of each
/// [`Reader::catch_up`]: what the broker holds then, and nothing later.
pub struct Reader {
    consumer: BaseConsumer,
    topic: String,
    /// Per partition, the offset after the last record read.
    next: Vec<i64>,
    /// Every record read so far, in the order read.
    pub records: Vec<Record>,
}

impl Reader {
    /// Reads every partition up to its end as the broker reports it now,
    /// and returns how many records that added. Panics when the broker does
    /// not answer, or the records below the ends do not arrive, within
    /// `timeout`.
    pub fn catch_up(&mut self, timeout: Duration) -> usize {
        let partitions = i32::try_from(self.next.len()).unwrap();
        let ends = watermarks(&self.consumer, &self.topic, partitions, timeout)
            .unwrap_or_else(|| panic!("no watermarks of {} within {timeout:?}", self.topic));
        let before = self.records.len();
        let deadline = Instant::now() + timeout;
        while ends
            .iter()
            .zip(&self.next)
            .any(|((_, high), next)| next < high)
        {
            assert!(
                Instant::now() < deadline,
                "{}: read up to {:?}, the ends are {ends:?}",
                self.topic,
                self.next
            );
            let Some(message) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let record = Record::from_message(&message.expect("consume"));
            self.next[usize::try_from(record.partition).unwrap()] = record.offset + 1;
            self.records.push(record);
        }
        self.records.len() - before
    }
}
