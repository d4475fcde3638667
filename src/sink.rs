//! The Kafka side: the rdkafka producer, its delivery reports, and the
//! watermark they move.
//!
//! Events are produced with the transaction's [`TxnId`] as the delivery
//! opaque. The delivery callback, on librdkafka's polling thread, counts the
//! acknowledgement in the [`Checkpoint`] and, when the watermark moves, hands
//! the new position to the replication connection's [`Feedback`], whose own
//! task reports it to PostgreSQL.
//!
//! Errors are sorted on purpose:
//! - a full producer queue is backpressure: [`Sink::send`] waits for room, and
//!   while it waits nothing reads the replication socket;
//! - network and broker trouble is retried by the producer itself
//!   (`message.timeout.ms=0`: retry for ever, in order, thanks to
//!   idempotence), so an outage is a pause, never a loss;
//! - an event the broker refuses for good (too large, not authorised, ...)
//!   or a fatal producer error poisons its transaction: the watermark never
//!   passes it, and the pipeline stops with a [`PublishFailure`] naming the
//!   aggregate, `seq_nr` and LSN.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::Notify;

use crate::checkpoint::{Advance, Checkpoint, TxnId};
use crate::event::{Event, LSN_HEADER, SEQ_NR_COLUMN};
use crate::metrics::Metrics;
use crate::pg::conn::Feedback;
use crate::pg::lsn::Lsn;

/// Producer settings walrelay sets unless told otherwise.
const DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // The partition the Java client and Kafka Streams choose for a key.
    ("partitioner", "murmur2_random"),
    // Retry for ever: an outage delays events, it never drops them.
    ("message.timeout.ms", "0"),
    // Long enough to batch a busy stream, short enough to stay out of the
    // commit-to-ack latency (see the performance section of the README).
    ("linger.ms", "2"),
    // Bounds memory: when full, walrelay stops reading the replication stream.
    ("queue.buffering.max.messages", "20000"),
    ("queue.buffering.max.kbytes", "32768"),
    ("client.id", "walrelay"),
];

/// Settings that would break walrelay's guarantees, with why.
const FORBIDDEN: &[(&str, &str, &str)] = &[
    (
        "acks",
        "all",
        "only acks=all (or -1) makes an acknowledgement mean the event is safe",
    ),
    (
        "enable.idempotence",
        "true",
        "without idempotence, retries can reorder or duplicate events within an aggregate",
    ),
    (
        "delivery.report.only.error",
        "false",
        "walrelay confirms the slot from the delivery reports of successful events",
    ),
];

/// The producer cannot be configured as asked.
#[derive(Debug, thiserror::Error)]
pub enum SinkConfigError {
    /// A `--kafka-property` that is not `key=value`.
    #[error("--kafka-property {0:?}: expected key=value")]
    Syntax(String),
    /// A property that would break the guarantees.
    #[error("--kafka-property {key}={value}: not allowed: {why}")]
    Forbidden {
        /// The property.
        key: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// `bootstrap.servers` set twice, differently.
    #[error(
        "--kafka-property bootstrap.servers conflicts with --kafka-brokers; set the brokers once"
    )]
    Brokers,
    /// librdkafka refused a property.
    #[error("--kafka-property: {0}")]
    Rejected(#[source] KafkaError),
}

/// Parses `key=value` pairs, checking each against the guarantees.
pub fn parse_properties(pairs: &[String]) -> Result<BTreeMap<String, String>, SinkConfigError> {
    let mut map = BTreeMap::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| SinkConfigError::Syntax(pair.clone()))?;
        let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
        for (forbidden, allowed, why) in FORBIDDEN {
            let acks_all = key == "acks" && value == "-1";
            if key == *forbidden && value != *allowed && !acks_all {
                return Err(SinkConfigError::Forbidden { key, value, why });
            }
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// The producer configuration: walrelay's defaults, then the user's properties.
pub fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
) -> Result<ClientConfig, SinkConfigError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in DEFAULTS {
        config.set(*k, *v);
    }
    for (k, v) in properties {
        if k == "bootstrap.servers" && v != brokers {
            return Err(SinkConfigError::Brokers);
        }
        config.set(k, v);
    }
    config.set_log_level(RDKafkaLogLevel::Warning);
    Ok(config)
}

/// Why an event was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// The aggregate (the key's text).
    pub aggregate: String,
    /// The `seq_nr` header, or `?`.
    pub seq_nr: String,
    /// The commit LSN (the `lsn` header), or `?`.
    pub lsn: String,
    /// The topic.
    pub topic: String,
    /// The metric label: `refused`, `timed_out` or `fatal`.
    pub kind: &'static str,
    /// The broker's or producer's error.
    pub reason: String,
}

impl std::fmt::Display for PublishFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the event of aggregate {:?} seq_nr {} (transaction {}) could not be published to topic {:?}: {}",
            self.aggregate, self.seq_nr, self.lsn, self.topic, self.reason
        )
    }
}

/// The producer failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Creating the producer failed.
    #[error("cannot create the Kafka producer: {0}")]
    Create(#[source] KafkaError),
    /// An event was refused for good.
    #[error("{0}")]
    Publish(Box<PublishFailure>),
    /// The topic does not exist and the broker does not create it.
    #[error(
        "topic {0:?} does not exist on the Kafka cluster; create it (kafka-topics.sh --create --topic {0}) or fix --topic"
    )]
    TopicMissing(String),
    /// The broker answered a metadata request with an error.
    #[error("Kafka metadata for topic {topic:?}: {error:?}")]
    TopicError {
        /// The topic.
        topic: String,
        /// The broker's error.
        error: RDKafkaRespErr,
    },
    /// The cluster cannot be reached (transient).
    #[error("cannot reach the Kafka cluster: {0}")]
    Unreachable(#[source] KafkaError),
}

/// State shared with the delivery callback.
struct Shared {
    checkpoint: Mutex<Checkpoint>,
    feedback: Feedback,
    metrics: Metrics,
    failure: Mutex<Option<PublishFailure>>,
    failed: Notify,
    room: Notify,
    /// `--dead-letter-topic` with `--on-poison dead-letter`.
    dead_letter_topic: Option<String>,
    /// Refused events on their way to the dead-letter topic.
    dead_letters: Option<tokio::sync::mpsc::UnboundedSender<(TxnId, PublishFailure)>>,
}

impl Shared {
    fn checkpoint(&self) -> std::sync::MutexGuard<'_, Checkpoint> {
        // A panic while holding the lock cannot leave the counters half-updated
        // in a way that confirms too much: every update is one field at a time.
        self.checkpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn apply(&self, advance: Advance) {
        if let Some(lsn) = advance.confirmed {
            self.feedback.confirm(lsn);
            Metrics::set_lsn(&self.metrics.confirmed_lsn, lsn);
        }
        if advance.completed > 0 {
            self.metrics.transactions.inc_by(advance.completed);
        }
        if let Some(ts) = advance.last_commit_ts {
            let t = crate::pg::pgoutput::pg_timestamp_to_system_time(ts);
            if let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH) {
                self.metrics.last_commit_timestamp.set(since.as_secs_f64());
            }
        }
    }

    fn fail(&self, failure: PublishFailure) {
        tracing::error!(aggregate = %failure.aggregate, seq_nr = %failure.seq_nr, lsn = %failure.lsn,
            topic = %failure.topic, reason = %failure.reason, "event refused; the slot is not confirmed past it");
        self.metrics
            .publish_errors
            .with_label_values(&[failure.kind])
            .inc();
        let mut slot = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(failure);
        }
        drop(slot);
        self.failed.notify_one();
    }
}

/// The producer's context: delivery reports and client events.
pub struct SinkContext(Arc<Shared>);

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "kafka: {message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "kafka: {message}"),
            _ => tracing::debug!(facility = fac, "kafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.0.metrics.health().set_broker_up(false);
        }
        if code == Some(RDKafkaErrorCode::Fatal) {
            self.0.fail(PublishFailure {
                aggregate: "?".into(),
                seq_nr: "?".into(),
                lsn: "?".into(),
                topic: "?".into(),
                kind: "fatal",
                reason: format!("fatal producer error: {reason}"),
            });
        } else {
            tracing::warn!(error = %error, "kafka: {reason}");
        }
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, txn: usize) {
        let shared = &self.0;
        shared.metrics.inflight_events.dec();
        shared.room.notify_one();
        let txn = txn as TxnId;
        match result {
            Ok(message) => {
                shared.metrics.health().set_broker_up(true);
                let ack = shared.checkpoint().acked(txn);
                if shared.dead_letter_topic.as_deref() == Some(message.topic()) {
                    shared.metrics.dead_lettered.inc();
                } else {
                    shared.metrics.events_published.inc();
                    shared.metrics.bytes_published.inc_by(message_size(message));
                }
                if let Some(ts) = ack.commit_ts {
                    let committed = crate::pg::pgoutput::pg_timestamp_to_system_time(ts);
                    let latency = SystemTime::now()
                        .duration_since(committed)
                        .unwrap_or_default();
                    shared.metrics.commit_to_ack.observe(latency.as_secs_f64());
                }
                shared.apply(ack.advance);
            }
            Err((error, message)) => {
                let header = |name: &str| {
                    message
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                        .map_or_else(
                            || "?".to_owned(),
                            |v| String::from_utf8_lossy(v).into_owned(),
                        )
                };
                let kind = match error.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
                    Some(RDKafkaErrorCode::Fatal) => "fatal",
                    _ => "refused",
                };
                let failure = PublishFailure {
                    aggregate: message.key().map_or_else(
                        || "?".to_owned(),
                        |k| String::from_utf8_lossy(k).into_owned(),
                    ),
                    seq_nr: header(SEQ_NR_COLUMN),
                    lsn: header(LSN_HEADER),
                    topic: message.topic().to_owned(),
                    kind,
                    reason: error.to_string(),
                };
                let to_dead_letter = shared
                    .dead_letter_topic
                    .as_deref()
                    .is_some_and(|t| t != message.topic());
                if let Some(queue) = shared.dead_letters.as_ref().filter(|_| to_dead_letter) {
                    // The dead-letter record takes the event's place in its
                    // transaction: its acknowledgement completes it.
                    shared
                        .metrics
                        .publish_errors
                        .with_label_values(&[failure.kind])
                        .inc();
                    tracing::warn!(aggregate = %failure.aggregate, seq_nr = %failure.seq_nr, lsn = %failure.lsn,
                        reason = %failure.reason, "event refused; sending it to the dead-letter topic");
                    let _ = queue.send((txn, failure));
                } else {
                    shared.checkpoint().poison(txn);
                    shared.fail(failure);
                }
            }
        }
    }
}

fn message_size(message: &rdkafka::message::BorrowedMessage<'_>) -> u64 {
    let headers = message.headers().map_or(0, |h| {
        h.iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum::<usize>()
    });
    let size =
        message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len) + headers;
    size as u64
}

/// The Kafka producer with its watermark.
pub struct Sink {
    producer: ThreadedProducer<SinkContext>,
    shared: Arc<Shared>,
}

impl Sink {
    /// Creates the producer. `checkpoint` starts at the slot's confirmed position.
    /// With `dead_letter_topic`, events refused for good go there instead of
    /// stopping walrelay (`--on-poison dead-letter`).
    pub fn new(
        config: &ClientConfig,
        checkpoint: Checkpoint,
        feedback: Feedback,
        metrics: Metrics,
        dead_letter_topic: Option<String>,
    ) -> Result<Self, SinkError> {
        let (queue, refused) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            checkpoint: Mutex::new(checkpoint),
            feedback,
            metrics,
            failure: Mutex::new(None),
            failed: Notify::new(),
            room: Notify::new(),
            dead_letters: dead_letter_topic.as_ref().map(|_| queue),
            dead_letter_topic,
        });
        let producer: ThreadedProducer<SinkContext> = config
            .create_with_context(SinkContext(Arc::clone(&shared)))
            .map_err(SinkError::Create)?;
        let sink = Sink { producer, shared };
        if sink.shared.dead_letter_topic.is_some() {
            let forwarder = Sink {
                producer: sink.producer.clone(),
                shared: Arc::clone(&sink.shared),
            };
            tokio::spawn(forwarder.forward_dead_letters(refused));
        }
        Ok(sink)
    }

    /// Sends the events the broker refused to the dead-letter topic.
    async fn forward_dead_letters(
        self,
        mut refused: tokio::sync::mpsc::UnboundedReceiver<(TxnId, PublishFailure)>,
    ) {
        while let Some((txn, failure)) = refused.recv().await {
            if let Err(e) = self.dead_letter(txn, &failure).await {
                tracing::error!(error = %e, "cannot send to the dead-letter topic");
            }
        }
    }

    /// Publishes a record describing `failure` to the dead-letter topic, as
    /// one event of transaction `txn`. Without a dead-letter topic, `failure`
    /// stops walrelay instead.
    pub async fn dead_letter(&self, txn: TxnId, failure: &PublishFailure) -> Result<(), SinkError> {
        let Some(topic) = self.shared.dead_letter_topic.clone() else {
            self.shared.checkpoint().poison(txn);
            self.shared.fail(failure.clone());
            return Err(SinkError::Publish(Box::new(failure.clone())));
        };
        let value = serde_json::json!({
            "reason": failure.kind,
            "error": failure.reason,
            "aggregate_id": failure.aggregate,
            "seq_nr": failure.seq_nr,
            "lsn": failure.lsn,
            "topic": failure.topic,
        })
        .to_string();
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: LSN_HEADER,
                value: Some(failure.lsn.as_bytes()),
            })
            .insert(Header {
                key: SEQ_NR_COLUMN,
                value: Some(failure.seq_nr.as_bytes()),
            });
        let opaque = usize::try_from(txn).unwrap_or(usize::MAX);
        let record: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(&topic, opaque)
            .key(failure.aggregate.as_bytes())
            .payload(value.as_bytes())
            .headers(headers);
        self.enqueue(record).await.map_err(|error| {
            let lost = PublishFailure {
                reason: format!(
                    "{}; and the dead-letter topic refused it too: {error}",
                    failure.reason
                ),
                ..failure.clone()
            };
            self.shared.checkpoint().poison(txn);
            self.shared.fail(lost.clone());
            SinkError::Publish(Box::new(lost))
        })
    }

    /// Hands `record` to the producer, waiting while its queue is full (the
    /// backpressure that stops the replication stream from being read).
    async fn enqueue(
        &self,
        mut record: BaseRecord<'_, [u8], [u8], usize>,
    ) -> Result<(), KafkaError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.shared.metrics.inflight_events.inc();
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    // Room comes with each delivery report; the timeout covers
                    // a notification that raced with the check.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(50),
                        self.shared.room.notified(),
                    )
                    .await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// A transaction began.
    pub fn begin(&self, commit_ts: i64) -> TxnId {
        self.shared.checkpoint().begin(commit_ts)
    }

    /// Transaction `txn` committed at `end_lsn` with `sent` events produced.
    pub fn commit(&self, txn: TxnId, sent: u64, end_lsn: Lsn) {
        let advance = self.shared.checkpoint().commit(txn, sent, end_lsn);
        self.shared.apply(advance);
    }

    /// A keepalive outside a transaction reported the server's WAL end.
    pub fn idle(&self, wal_end: Lsn) {
        let advance = self.shared.checkpoint().idle(wal_end);
        self.shared.apply(advance);
    }

    /// The replication session ended inside transaction `txn`; the next one
    /// replays it under a new ID.
    pub fn abandon(&self, txn: TxnId) {
        let advance = self.shared.checkpoint().abandon(txn);
        self.shared.apply(advance);
    }

    /// The confirmed position.
    pub fn confirmed(&self) -> Lsn {
        self.shared.checkpoint().confirmed()
    }

    /// The positions reported to PostgreSQL.
    pub fn feedback(&self) -> &Feedback {
        &self.shared.feedback
    }

    /// The first event refused for good, if any.
    pub fn failure(&self) -> Option<PublishFailure> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Completes once an event has been refused for good.
    pub async fn failed(&self) -> PublishFailure {
        loop {
            if let Some(failure) = self.failure() {
                return failure;
            }
            self.shared.failed.notified().await;
        }
    }

    /// Hands `event` of transaction `txn` to the producer, waiting while its
    /// queue is full.
    pub async fn send(&self, txn: TxnId, event: &Event) -> Result<(), SinkError> {
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for (name, value) in &event.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(&value[..]),
            });
        }
        let opaque = usize::try_from(txn).unwrap_or(usize::MAX);
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&event.topic, opaque)
                .key(&event.key[..])
                .headers(headers);
        if let Some(value) = &event.value {
            record = record.payload(&value[..]);
        }
        match self.enqueue(record).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let failure = PublishFailure {
                    aggregate: String::from_utf8_lossy(&event.key).into_owned(),
                    seq_nr: event.header(SEQ_NR_COLUMN).map_or_else(
                        || "?".to_owned(),
                        |v| String::from_utf8_lossy(v).into_owned(),
                    ),
                    lsn: event.commit_lsn.to_string(),
                    topic: event.topic.clone(),
                    kind: "refused",
                    reason: error.to_string(),
                };
                if self.shared.dead_letter_topic.is_some() {
                    self.shared
                        .metrics
                        .publish_errors
                        .with_label_values(&[failure.kind])
                        .inc();
                    tracing::warn!(aggregate = %failure.aggregate, seq_nr = %failure.seq_nr, lsn = %failure.lsn,
                            reason = %failure.reason, "event refused; sending it to the dead-letter topic");
                }
                self.dead_letter(txn, &failure).await
            }
        }
    }

    /// Checks that `topic` exists, waiting out an unreachable cluster for up
    /// to `timeout`.
    pub async fn check_topic(&self, topic: &str, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|_| SinkError::Unreachable(KafkaError::Canceled))
        .and_then(|r| r.map_err(SinkError::Unreachable))?;
        self.shared.metrics.health().set_broker_up(true);
        match metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(rdkafka::metadata::MetadataTopic::error)
        {
            // A topic whose leader is being elected exists all the same.
            None | Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE) => Ok(()),
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                Err(SinkError::TopicMissing(topic.to_owned()))
            }
            Some(error) => Err(SinkError::TopicError {
                topic: topic.to_owned(),
                error,
            }),
        }
    }

    /// Checks that the cluster answers a metadata request (for no topic, so
    /// that nothing is auto-created).
    pub async fn check_cluster(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
            .await
            .map_err(|_| SinkError::Unreachable(KafkaError::Canceled))?
            .map(|_| ())
            .map_err(SinkError::Unreachable)
    }

    /// Waits up to `timeout` for every produced event to be acknowledged;
    /// returns how many were not.
    pub async fn flush(&self, timeout: Duration) -> i32 {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            let _ = producer.flush(timeout);
            producer.in_flight_count()
        })
        .await
        .unwrap_or(-1)
    }
}
