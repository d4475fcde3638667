//! The query side: a Kafka consumer group that builds the `balances` read
//! model, applying each event exactly once although walrelay delivers at
//! least once.
//!
//! For each record, one database transaction (its statements prepared once
//! per connection, the three writes pipelined: four round trips):
//!
//! ```text
//! INSERT INTO balances_position ... ON CONFLICT DO UPDATE ... RETURNING last_seq_nr
//!                         -- the aggregate's position, locked (a new one starts at 0): a
//!                         -- consumer that lost the partition in a rebalance but still runs
//!                         -- waits here, then sees the event as a replay
//! seq_nr <= last      -> ROLLBACK (a replay: skip)
//! seq_nr >  last + 1  -> ROLLBACK (a gap: stop the partition, report)
//! seq_nr == last + 1  -> change balances, set last_seq_nr, log the application; COMMIT
//! ```
//!
//! and only after the COMMIT, the record's offset is committed to Kafka
//! (`enable.auto.commit=false`, `enable.auto.offset.store=false`). A crash
//! between the two replays the record at the next start, and the replay is
//! skipped; walrelay's own replays (after its crash) are skipped the same
//! way. Kafka offsets only bound how much is read again; the position in the
//! database decides what is applied.
//!
//! A record that cannot be applied (a gap, or one that is unreadable or that
//! the read model refuses) stops its partition: the consumer pauses it,
//! seeks back to the record, logs an error and records it in
//! `balances_stuck`, commits no offset past it, and tries it again every
//! `--stuck-retry`. The other partitions go on. A gap heals when the missing
//! event arrives by another partition (a topic whose partitions were added
//! while events were in flight); otherwise it needs a person: republish the
//! missing events (see the README, "When a partition stops").
use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use super::account::Event;
use super::db;
use super::projection::{Envelope, Step, step};

/// How the consumer runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bootstrap servers.
    pub brokers: String,
    /// The events topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// More librdkafka consumer properties, `key=value`.
    pub properties: Vec<(String, String)>,
    /// How long a stopped partition waits before its record is tried again.
    pub stuck_retry: Duration,
}

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The consumer could not be created or subscribed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The read model's schema could not be applied.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What became of a record.
enum Outcome {
    /// Applied now.
    Applied,
    /// Applied before: skipped.
    Replay,
    /// Not applicable: the partition stops at it.
    Stuck {
        aggregate_id: Option<String>,
        seq_nr: Option<i64>,
        reason: String,
    },
    /// The database failed: try again shortly.
    Retry(String),
}

/// A partition stopped at a record.
struct Stopped {
    offset: i64,
    retry_at: Instant,
    resumed: bool,
}

/// How soon a record is tried again after the database failed.
const DB_RETRY: Duration = Duration::from_secs(1);

/// The consumer's connection to the read model, with its statements.
struct ReadModel {
    client: Client,
    /// The aggregate's position, locked; 0 for a new aggregate.
    position: Statement,
    /// A balance for a newly opened account.
    open: Statement,
    /// Money moved.
    change: Statement,
    /// The new position.
    advance: Statement,
    /// One row per application.
    log: Statement,
}

impl ReadModel {
    async fn connect(url: &str) -> Result<Self, tokio_postgres::Error> {
        let client = db::connect(url).await?;
        let (position, open, change, advance, log) = tokio::try_join!(
            client.prepare(
                "INSERT INTO balances_position AS p (aggregate_id, last_seq_nr) VALUES ($1, 0) \
                 ON CONFLICT (aggregate_id) DO UPDATE SET last_seq_nr = p.last_seq_nr \
                 RETURNING last_seq_nr"
            ),
            client.prepare("INSERT INTO balances (account_id, balance) VALUES ($1, 0)"),
            client.prepare(
                "UPDATE balances SET balance = balance + $2, updated_at = now() \
                 WHERE account_id = $1"
            ),
            client.prepare(
                "UPDATE balances_position SET last_seq_nr = $2, last_lsn = $3::text::pg_lsn, \
                 updated_at = now() WHERE aggregate_id = $1"
            ),
            client.prepare(
                "INSERT INTO balances_applied (aggregate_id, seq_nr, kafka_partition, kafka_offset) \
                 VALUES ($1, $2, $3, $4)"
            ),
        )?;
        Ok(ReadModel {
            client,
            position,
            open,
            change,
            advance,
            log,
        })
    }
}

/// Consumes until `shutdown` completes.
pub async fn run(
    url: &str,
    settings: &Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ConsumeError> {
    db::setup(&db::connect(url).await?).await?;
    let mut db = Some(ReadModel::connect(url).await?);

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group)
        .set("client.id", "bank-consumer")
        // Offsets are committed by hand, after the database transaction.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group reads the topic from its beginning.
        .set("auto.offset.reset", "earliest")
        // A consumer that died is replaced within seconds (6 s is the
        // broker's default minimum).
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1500");
    for (key, value) in &settings.properties {
        config.set(key, value);
    }
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[&settings.topic])?;
    tracing::info!(topic = %settings.topic, group = %settings.group, "consuming");

    let mut stopped: HashMap<i32, Stopped> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            // SIGTERM or SIGINT: stop between two records. Everything
            // applied is committed in the database; the offsets of the last
            // records may not be, and are read again (and skipped) next time.
            () = &mut shutdown => break,
            // Stopped partitions whose time has come get their record again.
            _ = tick.tick() => resume_due(&consumer, &settings.topic, &mut stopped),
            received = consumer.recv() => match received {
                Ok(message) => {
                    handle(&consumer, &mut db, url, settings, &message, &mut stopped).await;
                }
                // librdkafka retries by itself; these are worth a line.
                Err(error) => tracing::warn!(error = %error, "Kafka"),
            },
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Applies one record and commits its offset, or stops its partition.
async fn handle(
    consumer: &StreamConsumer,
    db: &mut Option<ReadModel>,
    url: &str,
    settings: &Settings,
    message: &BorrowedMessage<'_>,
    stopped: &mut HashMap<i32, Stopped>,
) {
    let (partition, offset) = (message.partition(), message.offset());
    if stopped.get(&partition).is_some_and(|s| offset > s.offset) {
        // Fetched before the partition stopped: it comes again after the
        // record the partition stopped at.
        return;
    }
    let outcome = match read(message) {
        Err(reason) => Outcome::Stuck {
            aggregate_id: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            seq_nr: None,
            reason: format!("unreadable record: {reason}"),
        },
        Ok(envelope) => match connected(db, url).await {
            Err(e) => Outcome::Retry(format!("cannot connect to PostgreSQL: {e}")),
            Ok(model) => match apply(model, &envelope, partition, offset).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    if model.client.is_closed() {
                        *db = None;
                    }
                    Outcome::Retry(format!("PostgreSQL: {e}"))
                }
            },
        },
    };
    match outcome {
        Outcome::Applied | Outcome::Replay => {
            if let Outcome::Replay = outcome {
                tracing::debug!(partition, offset, "skipped a replayed event");
            }
            if stopped.remove(&partition).is_some() {
                tracing::info!(partition, offset, "the partition goes on");
                if let Some(model) = db.as_ref() {
                    let _ = model
                        .client
                        .execute(
                            "DELETE FROM balances_stuck WHERE kafka_topic = $1 AND kafka_partition = $2",
                            &[&settings.topic, &partition],
                        )
                        .await;
                }
            }
            // After the database transaction, never before.
            if let Err(error) = consumer.commit_message(message, CommitMode::Async) {
                tracing::warn!(error = %error, partition, offset, "committing the offset");
            }
        }
        Outcome::Stuck {
            aggregate_id,
            seq_nr,
            reason,
        } => {
            tracing::error!(partition, offset, aggregate_id = ?aggregate_id, seq_nr = ?seq_nr,
                reason = %reason, retry_in = ?settings.stuck_retry,
                "the partition stops here: this record cannot be applied");
            if let Some(model) = db.as_ref() {
                let recorded = model
                    .client
                    .execute(
                        "INSERT INTO balances_stuck \
                           (kafka_topic, kafka_partition, kafka_offset, aggregate_id, seq_nr, reason) \
                         VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (kafka_topic, kafka_partition) DO UPDATE \
                         SET kafka_offset = EXCLUDED.kafka_offset, aggregate_id = EXCLUDED.aggregate_id, \
                             seq_nr = EXCLUDED.seq_nr, reason = EXCLUDED.reason",
                        &[&settings.topic, &partition, &offset, &aggregate_id, &seq_nr, &reason],
                    )
                    .await;
                if let Err(error) = recorded {
                    tracing::warn!(error = %error, "recording the stopped partition");
                }
            }
            stop(
                consumer,
                &settings.topic,
                partition,
                offset,
                settings.stuck_retry,
                stopped,
            );
        }
        Outcome::Retry(reason) => {
            tracing::warn!(partition, offset, reason = %reason, "the record is tried again shortly");
            stop(
                consumer,
                &settings.topic,
                partition,
                offset,
                DB_RETRY,
                stopped,
            );
        }
    }
}

/// The record's envelope and event, as the read model needs them.
fn read(message: &BorrowedMessage<'_>) -> Result<(Envelope, Option<Event>), String> {
    let headers = message.headers();
    let header = |name: &str| {
        headers.and_then(|h| {
            h.iter()
                .filter(|h| h.key == name)
                .last()
                .and_then(|h| h.value)
        })
    };
    let envelope = Envelope::parse(message.key(), header, message.payload())?;
    let event = Event::parse(&envelope.event_type, &envelope.payload).map_err(|e| e.to_string())?;
    Ok((envelope, event))
}

async fn connected<'a>(
    db: &'a mut Option<ReadModel>,
    url: &str,
) -> Result<&'a mut ReadModel, String> {
    if db.as_ref().is_none_or(|model| model.client.is_closed()) {
        *db = Some(ReadModel::connect(url).await.map_err(|e| e.to_string())?);
    }
    Ok(db.as_mut().expect("connected just above"))
}

/// One database transaction for one record (see the module's documentation).
async fn apply(
    model: &mut ReadModel,
    (envelope, event): &(Envelope, Option<Event>),
    partition: i32,
    offset: i64,
) -> Result<Outcome, tokio_postgres::Error> {
    let id = &envelope.aggregate_id;
    let stuck = |reason: String| Outcome::Stuck {
        aggregate_id: Some(id.clone()),
        seq_nr: Some(envelope.seq_nr),
        reason,
    };
    let txn = model.client.transaction().await?;
    let last: i64 = txn.query_one(&model.position, &[id]).await?.get(0);
    match step(last, envelope.seq_nr) {
        // Dropping the transaction rolls it back.
        Step::Replay => return Ok(Outcome::Replay),
        Step::Gap { expected } => {
            return Ok(stuck(format!(
                "seq_nr gap: {id} has events applied up to {last}, this record is {}, {expected} \
                 has not arrived",
                envelope.seq_nr
            )));
        }
        Step::Apply => {}
    }
    // Sent together; PostgreSQL runs them in order, and after an error
    // refuses the rest of the transaction.
    let change = async {
        match event {
            Some(Event::Opened) => txn.execute(&model.open, &[id]).await,
            Some(event) => txn.execute(&model.change, &[id, &event.delta()]).await,
            // Another kind of aggregate sharing the topic: only its position moves.
            None => Ok(1),
        }
    };
    let advance = async {
        txn.execute(&model.advance, &[id, &envelope.seq_nr, &envelope.lsn])
            .await
    };
    let log = async {
        txn.execute(&model.log, &[id, &envelope.seq_nr, &partition, &offset])
            .await
    };
    match tokio::try_join!(change, advance, log) {
        Ok((0, _, _)) => {
            return Ok(stuck(format!(
                "{} for an account the read model does not have",
                envelope.event_type
            )));
        }
        Ok(_) => {}
        Err(e) if db::is_refusal(&e) => {
            return Ok(stuck(format!("the read model refuses it: {e}")));
        }
        Err(e) => return Err(e),
    }
    txn.commit().await?;
    Ok(Outcome::Applied)
}

/// Stops `partition` at the record at `offset`, to be tried again after `retry`.
fn stop(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
    retry: Duration,
    stopped: &mut HashMap<i32, Stopped>,
) {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    // Pause first: it sets the next fetch to after the record just
    // delivered; the seek then moves it back to the record itself (and drops
    // what was fetched beyond it).
    if let Err(error) = consumer.pause(&list) {
        tracing::warn!(error = %error, partition, "pausing the partition");
    }
    if let Err(error) = consumer.seek(
        topic,
        partition,
        Offset::Offset(offset),
        Duration::from_secs(10),
    ) {
        // Revoked meanwhile: its next owner starts from the committed offset,
        // which is not past this record.
        tracing::warn!(error = %error, partition, offset, "seeking back to the record");
    }
    stopped.insert(
        partition,
        Stopped {
            offset,
            retry_at: Instant::now() + retry,
            resumed: false,
        },
    );
}

/// Resumes the stopped partitions whose retry time has come.
fn resume_due(consumer: &StreamConsumer, topic: &str, stopped: &mut HashMap<i32, Stopped>) {
    let now = Instant::now();
    for (partition, stop) in stopped.iter_mut() {
        if stop.resumed || stop.retry_at > now {
            continue;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, *partition);
        if let Err(error) = consumer.resume(&list) {
            tracing::warn!(error = %error, partition, "resuming the partition");
        }
        stop.resumed = true;
    }
}
