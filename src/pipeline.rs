//! `walrelay run`: the loop that wires source → event → sink → checkpoint,
//! with backpressure, reconnects and shutdown.
//!
//! ```text
//! replication stream ──► Source::step ──► Sink::send ──► producer queue ──► broker
//!        ▲                                                     │ delivery reports
//!        └── status updates ◄── Feedback ◄── Checkpoint ◄──────┘
//! ```
//!
//! One task reads the stream and feeds the producer. When the producer's
//! queue is full, `Sink::send` waits, so the socket is not read and the
//! server's WAL sender waits in turn: memory stays bounded whatever the size of
//! a transaction. The status updates go out from their own task meanwhile.
//!
//! A lost replication connection is re-established with capped exponential
//! backoff and jitter; the new session resumes at the slot's confirmed
//! position (`START_REPLICATION ... 0/0`), so transactions that were in flight
//! are sent again (duplicates, never gaps). The producer, and with it the
//! watermark, lives across sessions.
use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{OnUnexpectedChange, RunConfig, SnapshotMode};
use crate::confirm::SessionState;
use crate::metrics::Metrics;
use crate::pg::conn::{self, ConnError, ReplicationConnection, SnapshotAction};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, MetadataError, SetupError};
use crate::sink::{PublishFailure, Sink, SinkConfigError, SinkError, producer_config};
use crate::slot::{self, HistoryError, HolderWatch, SlotProblem};
use crate::snapshot::{self, InitialSnapshot, SnapshotError};
use crate::source::{self, Source, SourceError, Step, UnexpectedChange};

/// SQLSTATE undefined_object: START_REPLICATION on a slot that does not exist.
const SLOT_MISSING: &str = "42704";
/// SQLSTATE object_in_use: START_REPLICATION on a slot another PID holds.
const SLOT_IN_USE: &str = "55006";
/// How often a standby tries to take the slot over.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// How long a session that failed waits for outstanding acknowledgements
/// before it closes the replication connection.
const ERROR_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long closing the replication connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a topic check waits for the cluster before it retries.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `run` stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The producer could not be configured.
    #[error(transparent)]
    SinkConfig(#[from] SinkConfigError),
    /// The producer failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// An event was refused for good.
    #[error("{0}")]
    Publish(Box<PublishFailure>),
    /// The replication connection failed for good.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The metadata connection failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The server or the publication is not set up for streaming.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The slot does not exist and may not be created.
    #[error(
        "replication slot {0:?} does not exist and --create-slot=false; create it \
         (SELECT pg_create_logical_replication_slot('{0}', 'pgoutput')) or allow walrelay to"
    )]
    NoSlot(String),
    /// The slot cannot be used.
    #[error(transparent)]
    Slot(#[from] SlotProblem),
    /// The server does not continue the history walrelay confirmed in.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The slot disappeared while walrelay used it.
    #[error(
        "replication slot {slot:?} disappeared while walrelay streamed from it (last confirmed position \
         {confirmed}); someone dropped it. walrelay does not recreate it silently: transactions committed \
         after {confirmed} that PostgreSQL no longer keeps WAL for would be skipped. Recover by starting \
         walrelay again with --snapshot initial (the default): it creates a new slot and publishes every \
         row of the table first, so nothing is lost (consumers drop the duplicates by seq_nr)"
    )]
    SlotVanished {
        /// The slot.
        slot: String,
        /// The last position confirmed to it.
        confirmed: Lsn,
    },
    /// The stream could not be followed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The initial snapshot could not be published.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The slot's position could not be read in time after streaming began.
    #[error(
        "reading the replication slot's confirmed position on the metadata connection took longer \
         than {0:?} after the stream started; reconnecting"
    )]
    SlotPosition(Duration),
    /// An UPDATE, DELETE or TRUNCATE of the events table.
    #[error(
        "the append-only events table saw a {} in the transaction committed at {}; walrelay does not \
         publish changes other than inserts and stops here so that nothing is skipped silently. \
         Find who bypassed the guard (sql/002_append_only.sql), then restart walrelay",
        .0.kind.to_uppercase(), .0.commit_lsn
    )]
    Unexpected(UnexpectedChange),
}

impl RunError {
    /// Whether a new session may succeed without anyone changing anything.
    fn is_transient(&self) -> bool {
        match self {
            RunError::Conn(e) => e.is_transient(),
            RunError::Metadata(e) | RunError::Setup(SetupError::Metadata(e)) => e.is_transient(),
            RunError::Sink(SinkError::Unreachable(_)) | RunError::SlotPosition(_) => true,
            _ => false,
        }
    }
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(250);
    const CAP: Duration = Duration::from_secs(30);
    /// A session that lasted this long was healthy: the next failure starts
    /// the backoff again from `BASE`. A session that fails sooner keeps it
    /// growing. At the cap, resetting cannot make attempts more frequent than
    /// the cap already allows: each of them took that long by itself.
    const HEALTHY_SESSION: Duration = Self::CAP;

    fn next(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.attempt.min(10))
            .min(Self::CAP);
        self.attempt += 1;
        // At least a tenth of the ceiling, so retries never spin.
        ceiling.mul_f64(0.1 + 0.9 * fastrand::f64())
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Accounts for a session that lasted `lasted` before it ended.
    fn session_ended(&mut self, lasted: Duration) {
        if lasted >= Self::HEALTHY_SESSION {
            self.reset();
        }
    }
}

/// Waits `delay` unless shutdown comes first; returns whether it did.
async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// Runs until `shutdown` is cancelled (then drains and returns `Ok`) or a
/// definite error occurs.
pub async fn run(
    config: &RunConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let producer_config = producer_config(&config.kafka_brokers, &config.kafka_properties)?;
    let mut backoff = Backoff { attempt: 0 };

    // The slot's position is where the watermark starts; it takes a working
    // database connection, which may take a few tries.
    let (confirmed, initial) = loop {
        let prepared = tokio::select! {
            biased;
            // SIGTERM or SIGINT, also while waiting for another instance's
            // first start: nothing to drain yet, and what was begun is redone
            // by the next start.
            () = shutdown.cancelled() => return Ok(()),
            prepared = prepare_source(config) => prepared,
        };
        match prepared {
            Ok(prepared) => break prepared,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "PostgreSQL is not reachable yet; retrying");
                metrics.reconnects.with_label_values(&["postgres"]).inc();
                if sleep_or_shutdown(backoff.next(), &shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    };
    backoff.reset();
    Metrics::set_lsn(&metrics.confirmed_lsn, confirmed);
    let sink = Sink::new(
        &producer_config,
        confirmed,
        metrics.clone(),
        config.dead_letter_topic.clone(),
    )?;

    let monitor = tokio::spawn(crate::monitor::run(
        config.postgres.clone(),
        config.slot.clone(),
        config.heartbeat_interval,
        metrics.clone(),
        shutdown.child_token(),
    ));
    let result = stream(config, &sink, &metrics, &shutdown, &mut backoff, initial).await;
    monitor.abort();
    metrics.health().set_streaming(false);
    tracing::info!(confirmed = %sink.confirmed(), "stopped");
    result
}

/// Sessions, one after another, until shutdown or a definite error.
async fn stream(
    config: &RunConfig,
    sink: &Sink,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    initial: Option<InitialSnapshot>,
) -> Result<(), RunError> {
    let mut known_topics = HashSet::new();
    if let Some(topic) = config.topic.fixed() {
        if !ensure_topic(sink, topic, metrics, shutdown).await? {
            return Ok(());
        }
        known_topics.insert(topic.to_owned());
    }
    if let Some(topic) = &config.dead_letter_topic {
        if !ensure_topic(sink, topic, metrics, shutdown).await? {
            return Ok(());
        }
    }
    if let Some(initial) = initial {
        let known = &mut known_topics;
        let ensure = async |topic: &str| -> Result<bool, SinkError> {
            if known.contains(topic) {
                return Ok(true);
            }
            let exists = ensure_topic(sink, topic, metrics, shutdown).await?;
            if exists {
                known.insert(topic.to_owned());
            }
            Ok(exists)
        };
        let publish = snapshot::publish(config, sink, metrics, initial, ensure);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                tracing::warn!("stopped during the initial snapshot; the next start begins it again");
                return Ok(());
            }
            published = publish => match published {
                Ok(_) => {}
                Err(e @ SnapshotError::ShutDown) => {
                    tracing::warn!("{e}");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
    let mut standby_since: Option<tokio::time::Instant> = None;
    let mut holder = HolderWatch::default();
    let mut system_id = None;
    loop {
        let session = Session {
            config,
            sink,
            metrics,
            shutdown,
            known_topics: &mut known_topics,
            system_id: &mut system_id,
        };
        let started = tokio::time::Instant::now();
        let result = session.run().await;
        backoff.session_ended(started.elapsed());
        metrics.health().set_streaming(false);
        let delay = match result {
            Ok(()) => return Ok(()),
            Err(RunError::Conn(e)) if e.sqlstate() == Some(SLOT_MISSING) => {
                return Err(RunError::SlotVanished {
                    slot: config.slot.clone(),
                    confirmed: sink.confirmed(),
                });
            }
            Err(RunError::Conn(e)) if e.sqlstate() == Some(SLOT_IN_USE) => {
                // Another process streams from the slot: stand by and take
                // over as soon as it lets go.
                if standby_since.is_none() {
                    tracing::info!(slot = %config.slot, error = %e, "the slot is in use by another process; standing by");
                    standby_since = Some(tokio::time::Instant::now());
                }
                metrics.standby.set(1);
                if let Err(e) = check_stale_holder(config, &mut holder).await {
                    tracing::debug!(error = %e, "cannot check the slot's holder");
                }
                STANDBY_RETRY
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next();
                tracing::warn!(error = %e, retry_in = ?delay, confirmed = %sink.confirmed(), "replication connection lost; reconnecting");
                metrics.reconnects.with_label_values(&["postgres"]).inc();
                delay
            }
            Err(e) => return Err(e),
        };
        if sleep_or_shutdown(delay, shutdown).await {
            return Ok(());
        }
    }
}

/// One look at the slot's holder from a standby (see [`HolderWatch`]), over
/// a metadata connection of its own.
async fn check_stale_holder(
    config: &RunConfig,
    watch: &mut HolderWatch,
) -> Result<(), MetadataError> {
    let client = metadata::connect(&config.postgres).await?;
    watch
        .check(
            &client,
            &config.slot,
            config.stale_slot_grace,
            config.take_over_stale_slot,
        )
        .await
}

/// Checks the server and the publication, makes sure the slot exists, and
/// returns its confirmed position, with the snapshot to publish first when
/// this start created the slot.
///
/// The slots are looked at and changed under the first-start lock (see
/// [`snapshot`]), so that an instance starting while another publishes its
/// initial snapshot waits for it instead of taking its marker for the trace
/// of an interrupted start. The lock goes with the returned snapshot, and is
/// released with the metadata connection otherwise.
async fn prepare_source(config: &RunConfig) -> Result<(Lsn, Option<InitialSnapshot>), RunError> {
    let client = metadata::connect(&config.postgres).await?;
    // This connection holds the first-start lock, and the snapshot, for as
    // long as they take: the server must not end it for idling meanwhile.
    client.batch_execute(snapshot::SESSION_TIMEOUTS_OFF).await?;
    metadata::verify_source(&client, &config.publication, &config.table).await?;
    snapshot::lock_first_start(&client, &config.slot).await?;
    let marker = snapshot::marker_name(&config.slot);
    let interrupted = slot::inspect(&client, &marker).await?.is_some();
    let existing = slot::inspect(&client, &config.slot).await?;
    if interrupted {
        // A previous start died before its initial snapshot was acknowledged
        // (it held the lock until then): begin again, from a new slot.
        tracing::warn!(slot = %config.slot, "the initial snapshot of a previous start was interrupted; starting it again (rows may be published twice)");
        let stale = existing.is_some().then_some(config.slot.as_str());
        for name in stale.into_iter().chain([marker.as_str()]) {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await?;
        }
    } else if let Some(state) = existing {
        if let Some(problem) = state.problem(&config.slot, &config.postgres.dbname) {
            return Err(problem.into());
        }
        let confirmed = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        tracing::info!(slot = %config.slot, confirmed = %confirmed, "resuming from the slot");
        return Ok((confirmed, None));
    }
    if !config.create_slot {
        return Err(RunError::NoSlot(config.slot.clone()));
    }
    let mut repl = ReplicationConnection::connect(&config.postgres).await?;
    if config.snapshot == SnapshotMode::Never {
        let created = repl
            .create_logical_slot(&config.slot, false, SnapshotAction::Discard)
            .await?;
        tracing::info!(slot = %created.name, consistent_point = %created.consistent_point,
            "created the replication slot; events committed from here on are published (--snapshot never)");
        return Ok((created.consistent_point, None));
    }
    // The marker first: from here until the snapshot is acknowledged, a
    // crash leaves it behind and the next start begins again.
    repl.simple_query(&format!(
        "CREATE_REPLICATION_SLOT {} PHYSICAL",
        conn::quote_ident(&marker)
    ))
    .await?;
    let created = repl
        .create_logical_slot(&config.slot, false, SnapshotAction::Export)
        .await?;
    tracing::info!(slot = %created.name, consistent_point = %created.consistent_point,
        "created the replication slot; the rows already in the table are published first");
    let snapshot = InitialSnapshot::import(client, repl, &created).await?;
    Ok((created.consistent_point, Some(snapshot)))
}

/// Waits until `topic` is known to exist; `Ok(false)` when shutdown came first.
async fn ensure_topic(
    sink: &Sink,
    topic: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<bool, SinkError> {
    let mut backoff = Backoff { attempt: 0 };
    loop {
        match sink.check_topic(topic, METADATA_TIMEOUT).await {
            Ok(()) => return Ok(true),
            Err(SinkError::Unreachable(e)) => {
                metrics.health().set_broker_up(false);
                metrics.reconnects.with_label_values(&["kafka"]).inc();
                tracing::warn!(error = %e, "the Kafka cluster is not reachable yet; retrying");
                if sleep_or_shutdown(backoff.next(), shutdown).await {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One replication session.
struct Session<'a> {
    config: &'a RunConfig,
    sink: &'a Sink,
    metrics: &'a Metrics,
    shutdown: &'a CancellationToken,
    known_topics: &'a mut HashSet<String>,
    /// The system identifier of the cluster this process streams from, once
    /// a session saw it.
    system_id: &'a mut Option<String>,
}

/// What the session loop does after a step.
enum Flow {
    Continue,
    Stop,
}

impl Session<'_> {
    async fn run(mut self) -> Result<(), RunError> {
        let mut repl = ReplicationConnection::connect(&self.config.postgres).await?;
        let timing =
            conn::StreamTiming::from_wal_sender_timeout(&repl.show("wal_sender_timeout").await?);
        let interval = timing.status_interval;
        let system = repl.identify_system().await?;
        let anchor = source::anchor(&mut repl, &self.config.table)
            .await?
            .ok_or_else(|| SourceError::TableMissing(self.config.table.clone()))?;
        let publications = conn::quote_ident(&self.config.publication);
        let started = repl
            .start_logical(
                &self.config.slot,
                Lsn::ZERO,
                &[("proto_version", "1"), ("publication_names", &publications)],
            )
            .await?;
        // The slot is held now, so nobody else moves it: where it stands is
        // where the server resumes, and the least any status update may say
        // (a standby that takes over would otherwise report the position it
        // read when it started, moving the slot back). Bounded, so that the
        // first status update still goes out before wal_sender_timeout.
        let (slot_confirmed, wal_end) = tokio::time::timeout(interval, self.slot_confirmed())
            .await
            .map_err(|_| RunError::SlotPosition(interval))??;
        // Before any status update: nothing past this server's WAL end. Its
        // end as read after the slot, since the slot's last holder may have
        // confirmed WAL written after IDENTIFY_SYSTEM.
        slot::check_history(
            self.system_id,
            &system.system_id,
            &self.config.slot,
            slot_confirmed,
            self.sink.confirmed(),
            wal_end.max(system.xlog_pos),
        )?;
        let (mut state, advance) = SessionState::start(&mut self.sink.ledger(), slot_confirmed);
        self.sink.observe(advance);
        let mut stream = started.report(self.sink.feedback().clone(), timing);
        self.metrics.health().set_streaming(true);
        self.metrics.standby.set(0);
        tracing::info!(slot = %self.config.slot, confirmed = %self.sink.confirmed(), "streaming");

        let mut source = Source::new(self.config.table.clone(), self.config.topic.clone(), anchor);
        let result = loop {
            let message = tokio::select! {
                biased;
                // SIGTERM or SIGINT: stop reading; the drain below confirms what it can.
                () = self.shutdown.cancelled() => break Ok(()),
                // An event refused for good: stop before anything passes it.
                failure = self.sink.failed() => break Err(RunError::Publish(Box::new(failure))),
                // The next message; cancel-safe.
                message = stream.next() => message,
            };
            let step = match message.map(|m| source.step(m)) {
                Ok(Ok(step)) => step,
                Ok(Err(SourceError::Row {
                    aggregate,
                    seq_nr,
                    commit_lsn,
                    reason,
                })) => match self
                    .poison_row(&mut state, aggregate, seq_nr, commit_lsn, reason)
                    .await
                {
                    Ok(Flow::Continue) => continue,
                    Ok(Flow::Stop) => break Ok(()),
                    Err(e) => break Err(e),
                },
                Ok(Err(e)) => break Err(e.into()),
                Err(e) => break Err(e.into()),
            };
            match self.handle(&mut state, step).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.metrics.health().set_streaming(false);
        let advance = state.end(&mut self.sink.ledger());
        self.sink.observe(advance);
        // Nothing behind an event the broker refused may reach it before
        // that event: the drain below must not deliver what is still held.
        self.sink.purge().await;
        // Wait for the acknowledgements of what was sent, so that the final
        // status update confirms as much as possible: all of it on shutdown;
        // up to a refused event (which the watermark never passes) on error.
        let timeout = if result.is_ok() {
            self.config.shutdown_timeout
        } else {
            self.config.shutdown_timeout.min(ERROR_DRAIN_TIMEOUT)
        };
        let left = self.sink.flush(timeout).await;
        if left > 0 {
            tracing::warn!(
                unacknowledged = left,
                "stopped waiting for acknowledgements; those events will be published again after a restart"
            );
        }
        let confirmed = self.sink.confirmed();
        // Bounded: on a stalled network even the goodbye may not get through.
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, stream.close())
            .await
            .unwrap_or(Ok(()));
        tracing::info!(confirmed = %confirmed, "replication connection closed");
        match (result, self.sink.failure()) {
            // The refusal that names an event, if one came by now.
            (Err(RunError::Publish(_) | RunError::Sink(SinkError::Publish(_))), Some(failure)) => {
                return Err(RunError::Publish(Box::new(failure)));
            }
            (result, _) => result?,
        }
        closed.map_err(RunError::from)
    }

    /// The slot's confirmed position, then the server's WAL end, read on
    /// the metadata connection.
    async fn slot_confirmed(&self) -> Result<(Lsn, Lsn), RunError> {
        let client = metadata::connect(&self.config.postgres).await?;
        let state = slot::inspect(&client, &self.config.slot).await?;
        let wal_end = metadata::wal_end(&client).await?;
        Ok((
            state
                .and_then(|s| s.confirmed_flush_lsn)
                .unwrap_or(Lsn::ZERO),
            wal_end,
        ))
    }

    /// Acts on one step of the source.
    async fn handle(&mut self, state: &mut SessionState, step: Step) -> Result<Flow, RunError> {
        match step {
            Step::Begin { commit_ts, .. } => {
                let advance = state.begin(&mut self.sink.ledger(), commit_ts);
                self.sink.observe(advance);
            }
            Step::Event(event) => {
                if !state.in_transaction() {
                    return Err(SourceError::Order("event outside a transaction").into());
                }
                if !self.known_topics.contains(&event.topic) {
                    if !ensure_topic(self.sink, &event.topic, self.metrics, self.shutdown).await? {
                        return Ok(Flow::Stop);
                    }
                    self.known_topics.insert(event.topic.clone());
                }
                // The ledger is locked only for a transaction's first event.
                let txn = match state.open_txn() {
                    Some(txn) => txn,
                    None => state
                        .event(&mut self.sink.ledger())
                        .ok_or(SourceError::Order("event outside a transaction"))?,
                };
                tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return Ok(Flow::Stop),
                    // Waits while the producer queue is full: backpressure.
                    sent = self.sink.send(txn, &event) => sent?,
                }
                state.sent();
            }
            Step::Commit { end_lsn, .. } => {
                let advance = state.commit(&mut self.sink.ledger(), end_lsn);
                self.sink.observe(advance);
                self.received(end_lsn);
            }
            Step::Idle { wal_end } => {
                let advance = state.keepalive(&mut self.sink.ledger(), wal_end);
                self.sink.observe(advance);
                self.received(wal_end);
                let lag = wal_end.bytes_since(self.sink.confirmed());
                self.metrics
                    .source_lag_bytes
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
            Step::Received { wal_end } => self.received(wal_end),
            Step::Unexpected(change) => {
                self.metrics
                    .unexpected_changes
                    .with_label_values(&[change.kind])
                    .inc();
                if self.config.on_unexpected_change == OnUnexpectedChange::Halt {
                    return Err(RunError::Unexpected(change));
                }
                tracing::warn!(kind = change.kind, lsn = %change.commit_lsn,
                    "the append-only events table saw other than an insert; skipped (--on-unexpected-change skip)");
            }
            Step::Nothing => {}
        }
        Ok(Flow::Continue)
    }

    /// A row that cannot become an event: counted, then either the end of
    /// the run or a record on the dead-letter topic in its place. Handing
    /// that record over waits while the producer queue is full, so shutdown
    /// may stop the wait (the session then ends inside the transaction, which
    /// the next start replays).
    async fn poison_row(
        &mut self,
        state: &mut SessionState,
        aggregate: Option<String>,
        seq_nr: String,
        commit_lsn: Lsn,
        reason: crate::event::RowError,
    ) -> Result<Flow, RunError> {
        self.metrics
            .publish_errors
            .with_label_values(&["invalid_row"])
            .inc();
        let txn = match &self.config.dead_letter_topic {
            Some(_) => state.event(&mut self.sink.ledger()),
            None => None,
        };
        let Some(txn) = txn else {
            let row = SourceError::Row {
                aggregate,
                seq_nr,
                commit_lsn,
                reason,
            };
            tracing::error!(error = %row, "the slot is not confirmed past this row (--on-poison halt)");
            return Err(row.into());
        };
        let failure = PublishFailure::invalid_row(
            aggregate,
            seq_nr,
            commit_lsn,
            self.config.topic.to_string(),
            &reason,
        );
        tracing::warn!(aggregate = %failure.aggregate, seq_nr = %failure.seq_nr, lsn = %failure.lsn,
            reason = %failure.reason, "row cannot be published; sending it to the dead-letter topic");
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Ok(Flow::Stop),
            // Waits while the producer queue is full, as an event does.
            sent = self.sink.dead_letter(txn, &failure) => sent?,
        }
        state.sent();
        Ok(Flow::Continue)
    }

    fn received(&self, lsn: Lsn) {
        self.sink.feedback().received(lsn);
        let current = u64::try_from(self.metrics.received_lsn.get()).unwrap_or(0);
        if lsn.0 > current {
            Metrics::set_lsn(&self.metrics.received_lsn, lsn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff { attempt: 0 };
        let delays: Vec<Duration> = (0..20).map(|_| b.next()).collect();
        assert!(delays[0] <= Backoff::BASE);
        assert!(
            delays
                .iter()
                .all(|d| *d <= Backoff::CAP && *d >= Backoff::BASE / 10)
        );
        assert!(
            delays[15..].iter().any(|d| *d > Duration::from_secs(3)),
            "{delays:?}"
        );
        b.reset();
        assert!(b.next() <= Backoff::BASE);
    }

    #[test]
    fn backoff_starts_over_after_a_healthy_session_only() {
        let mut b = Backoff { attempt: 0 };
        for _ in 0..12 {
            b.next();
        }
        // Sessions that fail early keep the delay at its cap.
        b.session_ended(Duration::from_secs(2));
        b.session_ended(Backoff::HEALTHY_SESSION.saturating_sub(Duration::from_millis(1)));
        assert!(
            (0..20).any(|_| b.next() > Duration::from_secs(3)),
            "the backoff shrank after short sessions"
        );
        // A session that streamed for the cap was healthy: retry soon.
        b.session_ended(Backoff::HEALTHY_SESSION);
        assert!(b.next() <= Backoff::BASE);
        assert!(b.next() <= Backoff::BASE * 2);
    }
}
