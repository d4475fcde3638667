//! The Kafka side: the rdkafka producer, its delivery reports, and the
//! watermark they move.
//!
//! Events are produced with the transaction's [`TxnId`] as the delivery
//! opaque. The delivery callback, on librdkafka's polling thread, turns each
//! report into a [`Report`] for the [`Ledger`] (the confirm path's logic,
//! shared with the replication session and free of librdkafka), which moves
//! the watermark and hands the new position to the replication connection's
//! [`Feedback`]; its own task reports it to PostgreSQL. The sink carries out
//! what the ledger decides: metrics, a dead-letter record, or a halt.
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
//!   aggregate, `seq_nr` and LSN (`--on-poison halt`), or, when the refusal
//!   is about the record itself (too large, invalid, corrupt), a dead-letter
//!   record takes its place (`--on-poison dead-letter`). A refusal about its
//!   delivery (authorisation, an unknown topic, a fatal producer error)
//!   halts in either mode: the event is valid, and its replay after the
//!   restart may well go through.
//!
//! Halting keeps the first deliveries of an aggregate in `seq_nr` order: what
//! follows a refused event in its partition must not reach the broker before
//! it. In halt mode the producer runs with `enable.gapless.guarantee=true`,
//! which makes librdkafka raise a fatal error inside the broker thread that
//! handles the refusal, so that no further produce request leaves (with
//! plain idempotence it would bump the epoch and send the rest at once).
//! On top, the first refusal the broker reports purges the producer's queues
//! (queued and in flight, `rd_kafka_purge`) from a task of its own, the
//! session purges again before its last drain, and nothing is enqueued once
//! halted. (An event the producer refuses when it is handed over has nothing
//! behind it: what was queued before it is delivered and confirmed.) Purged records
//! fail with `__PURGE_QUEUE`/`__PURGE_INFLIGHT` and never count as
//! acknowledged. What purging cannot undo: a request already on the wire when
//! the refusal came back. A broker that checks idempotent sequence numbers
//! (every real Kafka) rejects the batches behind the gap; one that does not
//! (librdkafka's mock cluster) may write them.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::Notify;

use crate::checkpoint::TxnId;
use crate::confirm::{Action, Advance, Ledger, OnRefusal, Record, Report};
use crate::event::{DEFAULT_SEQ_COLUMN, Event, LSN_HEADER};
// GAPLESS: librdkafka's switch that turns a refused batch into a fatal error
// raised in the broker thread, so that nothing behind it is sent (halt mode,
// where the configuration refuses turning it off).
use crate::kafka_properties::{GAPLESS, KafkaProperties};
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
    // Topics are made by their operators, never by a row's values that a
    // topic template turns into a name nobody asked for.
    ("allow.auto.create.topics", "false"),
];

/// The producer cannot be configured as asked.
#[derive(Debug, thiserror::Error)]
pub enum SinkConfigError {
    /// `bootstrap.servers` set twice, differently.
    #[error(
        "--kafka-property bootstrap.servers conflicts with --kafka-brokers; set the brokers once"
    )]
    Brokers,
}

/// The producer configuration: walrelay's defaults, then the user's properties.
pub fn producer_config(
    brokers: &str,
    properties: &KafkaProperties,
) -> Result<ClientConfig, SinkConfigError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in DEFAULTS {
        config.set(*k, *v);
    }
    for (k, v) in properties.iter() {
        let brokers_key = k == "bootstrap.servers" || k == "metadata.broker.list";
        if brokers_key && v != brokers {
            return Err(SinkConfigError::Brokers);
        }
        config.set(k, v);
    }
    config.set_log_level(RDKafkaLogLevel::Warning);
    Ok(config)
}

pub use crate::confirm::PublishFailure;

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
    ledger: Mutex<Ledger>,
    /// The ledger's feedback, to read without the lock.
    feedback: Feedback,
    metrics: Metrics,
    /// Set on the first failure that halts: nothing is enqueued any more.
    halted: AtomicBool,
    /// Set when a refusal came from the broker (or the producer failed):
    /// what the producer still holds may be behind it, and is purged.
    purge_wanted: AtomicBool,
    /// Wakes [`Sink::failed`].
    failed: Notify,
    /// Wakes the task that purges the producer on a halt.
    purge: Notify,
    room: Notify,
    /// `--dead-letter-topic` with `--on-poison dead-letter`.
    dead_letter_topic: Option<String>,
    /// Refused events on their way to the dead-letter topic.
    dead_letters: Option<tokio::sync::mpsc::UnboundedSender<(TxnId, PublishFailure)>>,
    /// The header that carries an event's sequence, to name a refused one by.
    seq_header: Option<String>,
    /// Whether a malformed trace context was logged as a warning already.
    trace_warned: AtomicBool,
}

impl Shared {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // A panic while holding the lock cannot leave the counters half-updated
        // in a way that confirms too much: every update is one field at a time.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets `walrelay_inflight_transactions` from the (locked) ledger.
    fn count_in_flight(&self, ledger: &Ledger) {
        let in_flight = i64::try_from(ledger.in_flight()).unwrap_or(i64::MAX);
        self.metrics.inflight_transactions.set(in_flight);
    }

    /// The metrics of a watermark movement (the ledger already reported it
    /// to the feedback).
    fn observe(&self, advance: Advance) {
        if let Some(lsn) = advance.confirmed {
            Metrics::set_lsn(&self.metrics.confirmed_lsn, lsn);
            self.metrics.progress().confirmed(lsn);
        }
        if advance.completed > 0 {
            self.metrics.transactions.inc_by(advance.completed);
        }
        if let Some(ts) = advance.last_commit_ts {
            self.metrics.progress().committed(ts);
            let t = crate::pg::pgoutput::pg_timestamp_to_system_time(ts);
            if let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH) {
                self.metrics.last_commit_timestamp.set(since.as_secs_f64());
            }
        }
    }

    /// A delivery report of a record of size `size` for transaction `txn`.
    fn delivered(&self, txn: TxnId, record: Record, report: Report, size: u64) {
        match (&report, record) {
            (Report::Acked, Record::Event) => {
                self.metrics.events_published.inc();
                self.metrics.published_bytes.inc_by(size);
            }
            (Report::Acked, Record::DeadLetter) => self.metrics.dead_lettered.inc(),
            (Report::Refused(failure), _) => self.count(failure),
            (Report::Purged, _) => {}
        }
        let refusal = match &report {
            Report::Refused(failure) => Some(failure.clone()),
            _ => None,
        };
        let delivered = {
            let mut ledger = self.ledger();
            let delivered = ledger.delivered(txn, record, report);
            self.count_in_flight(&ledger);
            delivered
        };
        if let Some(failure) = refusal {
            log_refusal(
                &failure,
                &delivered.action,
                self.dead_letter_topic.is_some(),
            );
        }
        self.observe(delivered.advance);
        if let Some(ts) = delivered.commit_ts {
            let committed = crate::pg::pgoutput::pg_timestamp_to_system_time(ts);
            let latency = SystemTime::now()
                .duration_since(committed)
                .unwrap_or_default();
            self.metrics.commit_to_ack.observe(latency.as_secs_f64());
        }
        self.act(txn, delivered.action);
    }

    fn count(&self, failure: &PublishFailure) {
        self.metrics
            .publish_errors
            .with_label_values(&[failure.kind])
            .inc();
    }

    /// Carries out what the ledger decided about a refused record of `txn`.
    fn act(&self, txn: TxnId, action: Action) {
        match action {
            Action::Nothing => {}
            Action::DeadLetter(failure) => {
                if let Some(queue) = &self.dead_letters {
                    // The dead-letter record takes the event's place in its
                    // transaction: its acknowledgement completes it.
                    let _ = queue.send((txn, failure));
                }
            }
            Action::Halt => self.halt(true),
        }
    }

    /// Stops everything after a failure the ledger recorded. With `purge`
    /// (a refusal the broker reported, a failed producer), what the
    /// producer still holds may be queued behind the refused event and is
    /// purged; a refusal at hand-over has nothing behind it, and what is
    /// queued before it is still delivered and confirmed.
    fn halt(&self, purge: bool) {
        self.halted.store(true, Ordering::Release);
        if purge && !self.purge_wanted.swap(true, Ordering::AcqRel) {
            self.purge.notify_one();
        }
        self.failed.notify_one();
        self.room.notify_waiters();
    }

    /// A failure of walrelay's own (a record the producer would not take, a
    /// dead-letter record that failed): the ledger decides, the sink acts.
    fn refused(&self, txn: TxnId, record: Record, failure: &PublishFailure) -> Action {
        self.count(failure);
        let action = self.ledger().refused(txn, record, failure.clone());
        log_refusal(failure, &action, self.dead_letter_topic.is_some());
        if action == Action::Halt {
            self.halt(false);
        }
        action
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
        // librdkafka reports a fatal error by its cause (the gap-less
        // guarantee, a fenced producer, ...) as well as by __FATAL.
        if matches!(
            code,
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::GaplessGuarantee
                    | RDKafkaErrorCode::Fenced
            )
        ) {
            let failure = PublishFailure {
                aggregate: "?".into(),
                seq_nr: "?".into(),
                lsn: "?".into(),
                topic: "?".into(),
                kind: "fatal",
                reason: format!("fatal producer error: {reason}"),
                record_at_fault: false,
            };
            tracing::error!(reason = %failure.reason, "the Kafka producer failed");
            self.0.count(&failure);
            let action = self.0.ledger().fatal(failure);
            self.0.act(0, action);
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
        let message = match result {
            Ok(message) | Err((_, message)) => message,
        };
        let record = if shared.dead_letter_topic.as_deref() == Some(message.topic()) {
            Record::DeadLetter
        } else {
            Record::Event
        };
        let report = match result {
            Ok(_) => {
                shared.metrics.health().set_broker_up(true);
                Report::Acked
            }
            Err((error, _)) => match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
                    Report::Purged
                }
                code => {
                    Report::Refused(refusal(error, code, message, shared.seq_header.as_deref()))
                }
            },
        };
        shared.delivered(txn, record, report, message_size(message));
    }
}

/// Logs a refusal with what walrelay does about it; `dead_letter_mode`:
/// `--on-poison dead-letter`.
fn log_refusal(failure: &PublishFailure, action: &Action, dead_letter_mode: bool) {
    let PublishFailure {
        aggregate,
        seq_nr,
        lsn,
        topic,
        reason,
        ..
    } = failure;
    match action {
        // The halt that follows is the error line.
        Action::Halt if dead_letter_mode && !failure.record_at_fault => tracing::warn!(
            %aggregate, %seq_nr, %lsn, %topic, %reason,
            "event refused for a reason that is not about the event itself (a timeout, an \
             authorisation failure, an unknown topic or partition, a failed producer); halting \
             whatever --on-poison says, since a dead-letter record in its place would take a \
             valid event off the topic for good. The slot is not confirmed past it: fix the \
             cause and restart, and the event is published again"),
        Action::Halt => tracing::warn!(%aggregate, %seq_nr, %lsn, %topic, %reason,
            "event refused; halting, the slot is not confirmed past it"),
        Action::DeadLetter(_) => tracing::warn!(%aggregate, %seq_nr, %lsn, %topic, %reason,
            "event refused; sending it to the dead-letter topic"),
        Action::Nothing => tracing::warn!(%aggregate, %seq_nr, %lsn, %topic, %reason,
            "event of a transaction abandoned by a reconnect refused; its replay is handled like any event"),
    }
}

/// Describes the refused `message` by the headers walrelay gave it
/// (`seq_header` carries its sequence, if the table has one).
fn refusal(
    error: &KafkaError,
    code: Option<RDKafkaErrorCode>,
    message: &rdkafka::message::BorrowedMessage<'_>,
    seq_header: Option<&str>,
) -> PublishFailure {
    let header = |name: Option<&str>| {
        message
            .headers()
            .and_then(|h| h.iter().find(|h| Some(h.key) == name))
            .and_then(|h| h.value)
            .map_or_else(
                || "?".to_owned(),
                |v| String::from_utf8_lossy(v).into_owned(),
            )
    };
    PublishFailure {
        aggregate: message.key().map_or_else(
            || "?".to_owned(),
            |k| String::from_utf8_lossy(k).into_owned(),
        ),
        seq_nr: header(seq_header),
        lsn: header(Some(LSN_HEADER)),
        topic: message.topic().to_owned(),
        kind: match code {
            Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
            Some(RDKafkaErrorCode::Fatal) => "fatal",
            _ => "refused",
        },
        reason: error.to_string(),
        record_at_fault: record_at_fault(code),
    }
}

/// Whether an error refusing a record is about that record itself (see
/// [`PublishFailure::record_at_fault`]): larger than the producer's
/// `message.max.bytes` or the topic's `max.message.bytes`, or a record the
/// broker found invalid or corrupt. Everything else (a timeout, an
/// authorisation failure, an unknown topic or partition, a fatal or
/// gap-less error, `INVALID_DIFFERENT_RECORD` for a valid record in a batch
/// with an invalid one) is about its delivery.
fn record_at_fault(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::BadMessage
        )
    )
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

/// Purges what the producer holds, queued and in flight; the purged records'
/// reports (`__PURGE_*`) follow on the polling thread.
fn purge_producer(producer: &ThreadedProducer<SinkContext>) {
    let held = producer.in_flight_count();
    producer.purge(PurgeConfig::default().queue().inflight());
    if held > 0 {
        tracing::warn!(
            records = held,
            "halted: purged the records the producer still held, so that nothing behind the refused event is delivered before it"
        );
    }
}

/// The Kafka producer with its watermark.
pub struct Sink {
    producer: Arc<ThreadedProducer<SinkContext>>,
    shared: Arc<Shared>,
}

impl Sink {
    /// Creates the producer; the watermark starts at `confirmed`, the slot's
    /// position. With `dead_letter_topic`, events refused for good go there
    /// instead of stopping walrelay (`--on-poison dead-letter`); without, the
    /// producer runs with `enable.gapless.guarantee=true` unless told
    /// otherwise. `seq_header` is the header that carries an event's
    /// sequence, by which a refused one is named.
    pub fn new(
        config: &ClientConfig,
        confirmed: Lsn,
        metrics: Metrics,
        dead_letter_topic: Option<String>,
        seq_header: Option<&str>,
    ) -> Result<Self, SinkError> {
        let (queue, refused) = tokio::sync::mpsc::unbounded_channel();
        let on_refusal = if dead_letter_topic.is_some() {
            OnRefusal::DeadLetter
        } else {
            OnRefusal::Halt
        };
        let feedback = Feedback::new(confirmed);
        let shared = Arc::new(Shared {
            ledger: Mutex::new(Ledger::new(confirmed, feedback.clone(), on_refusal)),
            feedback,
            metrics,
            halted: AtomicBool::new(false),
            purge_wanted: AtomicBool::new(false),
            failed: Notify::new(),
            purge: Notify::new(),
            room: Notify::new(),
            dead_letters: dead_letter_topic.as_ref().map(|_| queue),
            dead_letter_topic,
            seq_header: seq_header.map(str::to_owned),
            trace_warned: AtomicBool::new(false),
        });
        let mut config = config.clone();
        if let Some(max) = config
            .get("queue.buffering.max.messages")
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            shared.metrics.inflight_events_max.set(max);
        }
        if on_refusal == OnRefusal::Halt && config.get(GAPLESS).is_none() {
            config.set(GAPLESS, "true");
        }
        let producer: ThreadedProducer<SinkContext> = config
            .create_with_context(SinkContext(Arc::clone(&shared)))
            .map_err(SinkError::Create)?;
        let sink = Sink {
            producer: Arc::new(producer),
            shared,
        };
        tokio::spawn(purge_on_halt(
            Arc::downgrade(&sink.producer),
            Arc::clone(&sink.shared),
        ));
        if sink.shared.dead_letter_topic.is_some() {
            let forwarder = Sink {
                producer: Arc::clone(&sink.producer),
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
            self.shared.refused(txn, Record::DeadLetter, failure);
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
                key: DEFAULT_SEQ_COLUMN,
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
            self.shared.refused(txn, Record::DeadLetter, &lost);
            SinkError::Publish(Box::new(lost))
        })
    }

    /// Hands `record` to the producer, waiting while its queue is full (the
    /// backpressure that stops the replication stream from being read).
    /// Once halted, nothing more is taken.
    async fn enqueue(
        &self,
        mut record: BaseRecord<'_, [u8], [u8], usize>,
    ) -> Result<(), KafkaError> {
        loop {
            if self.shared.halted.load(Ordering::Acquire) {
                return Err(KafkaError::Canceled);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    self.shared.metrics.inflight_events.inc();
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    // Waiting for the broker is on purpose: not a wedge.
                    self.shared.metrics.health().beat();
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

    /// The confirm path's state, locked: for the replication session's
    /// [`SessionState`](crate::confirm::SessionState) steps. Pass what a step
    /// returns to [`observe`](Self::observe).
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.shared.ledger()
    }

    /// Records the metrics of a step of the confirm path: the watermark's
    /// movement and the transactions in flight.
    pub fn observe(&self, advance: Advance) {
        self.shared.observe(advance);
        self.shared.count_in_flight(&self.shared.ledger());
    }

    /// A transaction with events began outside a replication session (the
    /// initial snapshot); its records carry the returned ID.
    pub fn begin(&self, commit_ts: i64) -> TxnId {
        self.shared.ledger().begin(commit_ts)
    }

    /// Transaction `txn` committed at `end_lsn` with `sent` events produced.
    pub fn commit(&self, txn: TxnId, sent: u64, end_lsn: Lsn) {
        let advance = self.shared.ledger().commit(txn, sent, end_lsn);
        self.observe(advance);
    }

    /// Whether transaction `txn` and every one before it is fully
    /// acknowledged (dead-letter records included) and confirmed.
    pub fn completed(&self, txn: TxnId) -> bool {
        self.shared.ledger().completed(txn)
    }

    /// The confirmed position.
    pub fn confirmed(&self) -> Lsn {
        self.shared.feedback.confirmed()
    }

    /// The positions reported to PostgreSQL.
    pub fn feedback(&self) -> &Feedback {
        &self.shared.feedback
    }

    /// The failure that halts the run, if any.
    pub fn failure(&self) -> Option<PublishFailure> {
        self.shared.ledger().failure().cloned()
    }

    /// Completes once the run must halt (an event refused for good, a fatal
    /// producer error).
    pub async fn failed(&self) -> PublishFailure {
        loop {
            if let Some(failure) = self.failure() {
                return failure;
            }
            self.shared.failed.notified().await;
        }
    }

    /// After a refusal the broker reported, purges what the producer still
    /// holds (before the last drain): nothing behind a refused event may be
    /// delivered before it.
    pub async fn purge(&self) {
        if !self.shared.purge_wanted.load(Ordering::Acquire) {
            return;
        }
        let producer = Arc::clone(&self.producer);
        let _ = tokio::task::spawn_blocking(move || purge_producer(&producer)).await;
    }

    /// Hands `event` of transaction `txn` to the producer, waiting while its
    /// queue is full.
    pub async fn send(&self, txn: TxnId, event: &Event) -> Result<(), SinkError> {
        if let Some(invalid) = &event.invalid_trace_context {
            self.invalid_trace_context(event, invalid);
        }
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for (name, value) in &event.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(&value[..]),
            });
        }
        let opaque = usize::try_from(txn).unwrap_or(usize::MAX);
        let record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&event.topic, opaque)
                .key(&event.key[..])
                .payload(&event.value[..])
                .headers(headers);
        let Err(error) = self.enqueue(record).await else {
            return Ok(());
        };
        if let Some(failure) = self.failure() {
            // Halted meanwhile: the event was not taken.
            return Err(SinkError::Publish(Box::new(failure)));
        }
        let failure = PublishFailure {
            aggregate: String::from_utf8_lossy(&event.key).into_owned(),
            seq_nr: event.seq.as_ref().map_or_else(
                || "?".to_owned(),
                |v| String::from_utf8_lossy(v).into_owned(),
            ),
            lsn: event.commit_lsn.to_string(),
            topic: event.topic.clone(),
            kind: "refused",
            reason: error.to_string(),
            record_at_fault: record_at_fault(error.rdkafka_error_code()),
        };
        match self.shared.refused(txn, Record::Event, &failure) {
            Action::DeadLetter(failure) => self.dead_letter(txn, &failure).await,
            Action::Nothing => Ok(()),
            Action::Halt => Err(SinkError::Publish(Box::new(failure))),
        }
    }

    /// Counts and logs a trace context header left out of `event`: a warning
    /// the first time, then at debug level (one writer's bad habit would
    /// otherwise flood the log). Never the value, which may be large.
    fn invalid_trace_context(&self, event: &Event, invalid: &crate::trace_context::Invalid) {
        self.shared
            .metrics
            .trace_context_invalid
            .with_label_values(&[invalid.header])
            .inc();
        let aggregate = String::from_utf8_lossy(&event.key);
        let seq_nr = event
            .seq
            .as_deref()
            .map_or_else(|| "?".into(), String::from_utf8_lossy);
        let message = "the metadata column holds a malformed trace context value, not copied into \
                       its header";
        if self.shared.trace_warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(header = invalid.header, reason = invalid.reason, aggregate = %aggregate,
                seq_nr = %seq_nr, lsn = %event.commit_lsn, "{message}");
        } else {
            tracing::warn!(header = invalid.header, reason = invalid.reason, aggregate = %aggregate,
                seq_nr = %seq_nr, lsn = %event.commit_lsn,
                "{message} (walrelay_trace_context_invalid_total counts them; further ones are \
                 logged at debug level)");
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

/// Purges the producer as soon as the run halts. Holds the producer weakly,
/// so that it never keeps it alive (nor drops it on librdkafka's thread).
async fn purge_on_halt(producer: Weak<ThreadedProducer<SinkContext>>, shared: Arc<Shared>) {
    shared.purge.notified().await;
    if let Some(producer) = producer.upgrade() {
        let _ = tokio::task::spawn_blocking(move || purge_producer(&producer)).await;
    }
}
