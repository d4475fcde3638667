//! A Kafka protocol endpoint for tests: librdkafka's mock cluster, listening
//! on real TCP ports that the walrelay process connects to, and a consumer
//! that reads back what was published.
use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The partition it landed in.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The key as text.
    pub key: String,
    /// The value as text (`None` for a null value).
    pub value: Option<String>,
    /// Headers by name.
    pub headers: BTreeMap<String, String>,
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

    /// Reads `topic` from the beginning until `count` distinct events (by key
    /// and `seq_nr`) arrived, or `timeout` passed, plus a short quiet period
    /// to catch any extra ones. Duplicates are returned but not counted.
    pub fn read(&self, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "walrelay-tests")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let partitions = metadata.topics()[0].partitions().len();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, i32::try_from(p).unwrap(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).expect("assign");
        let deadline = std::time::Instant::now() + timeout;
        let mut records: Vec<Record> = Vec::new();
        let mut distinct = std::collections::HashSet::new();
        let mut quiet_until = None;
        loop {
            let now = std::time::Instant::now();
            if distinct.len() >= count {
                let until = *quiet_until.get_or_insert(now + Duration::from_millis(500));
                if now >= until {
                    break;
                }
            } else if now >= deadline {
                break;
            }
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = message.expect("consume");
            let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), text(h.value).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            let key = text(message.key()).unwrap_or_default();
            let seq = headers_seq(&headers);
            distinct.insert((key, seq));
            records.push(Record {
                partition: message.partition(),
                offset: message.offset(),
                key: text(message.key()).unwrap_or_default(),
                value: text(message.payload()),
                headers,
            });
        }
        records
    }
}

fn headers_seq(headers: &BTreeMap<String, String>) -> Option<String> {
    headers.get("seq_nr").cloned()
}
