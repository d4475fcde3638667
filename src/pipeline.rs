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
use tokio_util::task::AbortOnDropHandle;

use tokio::sync::watch;

use crate::config::{FailoverSlot, OnUnexpectedChange, RunConfig, SnapshotMode};
use crate::confirm::SessionState;
use crate::failover::{self, FAILOVER_SLOTS_SINCE, FollowError, Switch};
use crate::metrics::{Health, Metrics, Role, beating};
use crate::pg::conn::{
    self, ConnError, ReplicationConnection, ReplicationStream, SnapshotAction, StartedReplication,
    SystemId,
};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, MetadataError, SetupError};
use crate::pg::params::ConnectParams;
use crate::pg::primary::{self, NoPrimary};
use crate::service::{STALL_MARGIN, stall_limit};
use crate::sink::{PublishFailure, Sink, SinkConfigError, SinkError, producer_config};
use crate::slot::{self, HistoryError, HolderWatch, SlotProblem};
use crate::snapshot::{self, InitialSnapshot, SnapshotError};
use crate::source::{self, Source, SourceError, Step, UnexpectedChange};

/// SQLSTATE undefined_object: START_REPLICATION on a slot that does not exist.
const SLOT_MISSING: &str = "42704";
/// SQLSTATE object_in_use: START_REPLICATION on a slot another PID holds.
const SLOT_IN_USE: &str = "55006";
/// SQLSTATE object_not_in_prerequisite_state: START_REPLICATION on a slot
/// PostgreSQL invalidated (among other things).
const SLOT_UNUSABLE: &str = "55000";
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
    /// A promoted server is there to follow while transactions streamed from
    /// the old primary still wait for Kafka's acknowledgement: those could
    /// confirm the new primary's slot past its branch point (where its own
    /// transactions begin) once acknowledged. Transient: the next try
    /// follows once they are acknowledged, or stops at the divergence if
    /// they end past the branch point.
    #[error(
        "a promoted server is ready to follow, but {0} transaction(s) streamed from the old \
         primary are not acknowledged by Kafka yet; following once they are"
    )]
    FollowPending(usize),
    /// No host of the URL is a primary walrelay may stream from.
    #[error(transparent)]
    NoPrimary(#[from] NoPrimary),
    /// A promotion walrelay cannot follow.
    #[error(transparent)]
    Follow(#[from] FollowError),
    /// The slot is missing on a server that was promoted.
    #[error(
        "replication slot {slot:?} does not exist on this server, which was promoted (it is on \
         timeline {timeline}) {when}. walrelay does not create a new slot here silently: it would \
         start from now, and the events committed since the slot's last confirmed position would \
         never be published. What this server shows missing from the failover setup: {}. If the \
         slot was lost in a failover: publish the events since the last one in Kafka from the \
         table, fix the setup (README, \"Failover\"; `walrelay check --standby-url ...` checks \
         it), and start walrelay once with --new-slot-on-timeline {timeline} (with --snapshot \
         initial, the default, it publishes every row of the table first: nothing is lost, \
         consumers drop the duplicates by seq_nr). If walrelay never ran on this cluster before \
         (it was promoted or restored before walrelay was set up), start it with \
         --new-slot-on-timeline {timeline}",
        .missing.join("; ")
    )]
    SlotMissingOnPromoted {
        /// The slot.
        slot: String,
        /// The server's timeline.
        timeline: u32,
        /// When walrelay found it missing.
        when: String,
        /// The setup steps the server shows missing.
        missing: Vec<String>,
    },
    /// `--failover-slot require` on a server without failover slots.
    #[error(
        "--failover-slot require, but PostgreSQL {0} has no failover slots (they came with \
         PostgreSQL {FAILOVER_SLOTS_SINCE}): upgrade, or use --failover-slot auto and accept that a \
         failover loses the slot (see the README)"
    )]
    FailoverUnsupported(u32),
    /// `--failover-slot require` and the failover chain is incomplete.
    #[error(
        "--failover-slot require, but the failover chain is incomplete: {}; \
         `walrelay check` lists every problem with its fix",
        .0.join("; ")
    )]
    FailoverChain(Vec<String>),
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
    /// The reason this error halts walrelay (one of
    /// [`HALT_REASONS`](crate::metrics::HALT_REASONS)), or
    /// `None` when it is an ordinary failure (exit code 1). A halt needs a
    /// person: a restart, or another instance, would meet the same row or
    /// slot.
    pub fn halt_reason(&self) -> Option<&'static str> {
        match self {
            RunError::Publish(_)
            | RunError::Sink(SinkError::Publish(_))
            | RunError::Snapshot(SnapshotError::Sink(SinkError::Publish(_))) => {
                Some("refused_event")
            }
            RunError::Source(SourceError::Row { .. })
            | RunError::Snapshot(SnapshotError::Source(SourceError::Row { .. })) => {
                Some("poison_row")
            }
            RunError::Unexpected(_) => Some("unexpected_change"),
            RunError::Source(SourceError::Renamed { .. } | SourceError::Replaced { .. }) => {
                Some("table_renamed")
            }
            RunError::Slot(SlotProblem::Lost { .. }) => Some("slot_invalidated"),
            RunError::SlotVanished { .. } => Some("slot_vanished"),
            _ => None,
        }
    }

    /// Whether a new session may succeed without anyone changing anything.
    fn is_transient(&self) -> bool {
        match self {
            RunError::Conn(e) => e.is_transient(),
            RunError::NoPrimary(e) => e.is_transient(),
            RunError::Metadata(e) | RunError::Setup(SetupError::Metadata(e)) => e.is_transient(),
            RunError::Sink(SinkError::Unreachable(_))
            | RunError::SlotPosition(_)
            | RunError::FollowPending(_) => true,
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

/// Waits `delay` unless shutdown comes first; returns whether it did. A
/// wait on purpose: it beats `health`'s pulse.
async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken, health: &Health) -> bool {
    beating(health, async {
        tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(delay) => false,
        }
    })
    .await
}

/// Runs until `shutdown` is cancelled (then drains and returns `Ok`) or a
/// definite error occurs. An error that halts ([`RunError::halt_reason`])
/// keeps the process up, halted and not ready, until `shutdown` (unless
/// `--exit-on-halt`), and is returned then.
pub async fn run(
    config: &RunConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // The slot's metrics matter most while no instance streams: the monitor
    // runs from the start to the end, through a halt too (every WAL sender
    // taken, another instance's first start, a halt). It follows the URL's
    // first primary until the replication connection has chosen its host,
    // which every metadata connection follows from then on.
    let (primary, followed) = watch::channel(config.postgres.clone());
    let monitor = AbortOnDropHandle::new(tokio::spawn(crate::monitor::run(
        followed,
        config.slot.clone(),
        config.heartbeat_interval,
        metrics.clone(),
        shutdown.child_token(),
    )));
    let mut held = None;
    let result = relay(config, &metrics, &shutdown, &mut held, primary).await;
    let result = match result {
        Err(error) if error.halt_reason().is_some() => {
            Err(halted(config, &metrics, &shutdown, error, held).await)
        }
        other => other,
    };
    drop(monitor);
    result
}

/// What a halted instance keeps open: whatever lets another instance take
/// over only to halt on the same row.
enum Held {
    /// The replication connection, with its status updates: the slot stays
    /// with this instance, confirmed up to the last transaction before the
    /// halt.
    Stream(ReplicationStream),
    /// The first-start lock of an initial snapshot that halted: another
    /// instance would begin the snapshot again and halt at the same row.
    FirstStart(InitialSnapshot),
}

/// Halts on `error`: says why once, sets `walrelay_halted{reason}`, and
/// waits for `shutdown` (unless `--exit-on-halt`), live and not ready,
/// keeping what `held` holds; then lets it go and returns `error`.
async fn halted(
    config: &RunConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    error: RunError,
    held: Option<Held>,
) -> RunError {
    let reason = error.halt_reason().unwrap_or("unknown");
    let keeps = match &held {
        Some(Held::Stream(_)) => "keeps the slot (its replication connection stays open)",
        Some(Held::FirstStart(_)) => "keeps the first-start lock of the initial snapshot",
        None => "holds nothing",
    };
    if config.exit_on_halt {
        tracing::error!(reason, error = %error, "halted; exiting with code 3 (--exit-on-halt)");
        metrics.halt(reason, &error.to_string());
    } else {
        tracing::error!(reason, error = %error, keeps,
            "halted: fix the cause, then restart walrelay; until then it stays up, not ready, and exits with code 3 on SIGTERM");
        metrics.halt(reason, &error.to_string());
        beating(metrics.health(), shutdown.cancelled()).await;
    }
    match held {
        Some(Held::Stream(stream)) => {
            // Bounded: on a stalled network even the goodbye may not get through.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.close()).await;
        }
        Some(Held::FirstStart(snapshot)) => drop(snapshot),
        None => {}
    }
    error
}

/// Prepares the slot and streams until shutdown or a definite error; what a
/// halt should keep open is left in `held`. `primary` tells the monitor
/// which host the replication connection chose.
async fn relay(
    config: &RunConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    held: &mut Option<Held>,
    primary: watch::Sender<ConnectParams>,
) -> Result<(), RunError> {
    let producer_config = producer_config(&config.kafka_brokers, &config.kafka_properties)?;
    let mut backoff = Backoff { attempt: 0 };
    let health = metrics.health();

    // The slot's position is where the watermark starts; it takes a working
    // database connection, which may take a few tries.
    let prepared = loop {
        let prepared = tokio::select! {
            biased;
            // SIGTERM or SIGINT, also while waiting for another instance's
            // first start: nothing to drain yet, and what was begun is redone
            // by the next start.
            () = shutdown.cancelled() => return Ok(()),
            // Each step is bounded by --request-timeout, or waits on purpose
            // (another instance's first start, slot creation).
            prepared = beating(health, prepare_source(config, metrics)) => prepared,
        };
        match prepared {
            Ok(prepared) => break prepared,
            Err(e) if e.is_transient() => {
                metrics.set_role(Role::Starting);
                tracing::warn!(error = %e, "PostgreSQL is not reachable yet; retrying");
                metrics.reconnects.with_label_values(&["postgres"]).inc();
                if sleep_or_shutdown(backoff.next(), shutdown, health).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    };
    backoff.reset();
    let Prepared {
        confirmed,
        initial,
        primary: host,
        system,
    } = prepared;
    primary.send_replace(host);
    Metrics::set_lsn(&metrics.confirmed_lsn, confirmed);
    if initial.is_none() {
        // Every transaction before the slot's position was acknowledged by
        // whoever confirmed it. A new slot's position is its consistent
        // point, with the older rows still to publish: /progress waits for
        // them (below).
        metrics.progress().vouch(confirmed);
    }
    let sink = Sink::new(
        &producer_config,
        confirmed,
        metrics.clone(),
        config.dead_letter_topic.clone(),
        config.mapping.seq_header(),
    )?;

    let sessions = Sessions {
        config,
        sink: &sink,
        metrics,
        shutdown,
        primary,
        streamed: system,
    };
    let result = sessions.stream(&mut backoff, initial, held).await;
    if metrics.health().role() != Role::Halted {
        metrics.set_role(Role::Starting);
    }
    tracing::info!(confirmed = %sink.confirmed(), "stopped");
    result
}

/// What the sessions share: the run's parts, the host streamed from, and
/// the cluster and timeline last streamed from.
struct Sessions<'a> {
    config: &'a RunConfig,
    sink: &'a Sink,
    metrics: &'a Metrics,
    shutdown: &'a CancellationToken,
    /// The primary's host, for the metadata connections.
    primary: watch::Sender<ConnectParams>,
    /// The cluster and timeline of the last session that streamed.
    streamed: SystemId,
}

impl Sessions<'_> {
    /// Sessions, one after another, until shutdown or a definite error.
    async fn stream(
        mut self,
        backoff: &mut Backoff,
        initial: Option<InitialSnapshot>,
        held: &mut Option<Held>,
    ) -> Result<(), RunError> {
        let (config, sink, metrics, shutdown) =
            (self.config, self.sink, self.metrics, self.shutdown);
        let health = metrics.health();
        let mut known_topics = HashSet::new();
        if let Some(topic) = config.mapping.topic.fixed() {
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
            if !self
                .publish_initial(initial, &mut known_topics, held)
                .await?
            {
                return Ok(());
            }
        }
        let mut standby_since: Option<tokio::time::Instant> = None;
        let mut holder = HolderWatch::default();
        loop {
            let session = Session {
                config,
                sink,
                metrics,
                shutdown,
                known_topics: &mut known_topics,
                primary: &self.primary,
                streamed: &mut self.streamed,
                held: &mut *held,
            };
            let started = tokio::time::Instant::now();
            let result = session.run().await;
            backoff.session_ended(started.elapsed());
            let delay = match result {
                Ok(()) => return Ok(()),
                Err(RunError::Conn(e)) if e.sqlstate() == Some(SLOT_MISSING) => {
                    return Err(RunError::SlotVanished {
                        slot: config.slot.clone(),
                        confirmed: sink.confirmed(),
                    });
                }
                Err(RunError::Conn(e)) if e.sqlstate() == Some(SLOT_UNUSABLE) => {
                    let host = self.primary.borrow().clone();
                    return Err(explain_unusable(config, &host, RunError::Conn(e)).await);
                }
                Err(RunError::Conn(e)) if e.sqlstate() == Some(SLOT_IN_USE) => {
                    // Another process streams from the slot: stand by and take
                    // over as soon as it lets go.
                    if standby_since.is_none() {
                        tracing::info!(slot = %config.slot, error = %e, "the slot is in use by another process; standing by");
                        standby_since = Some(tokio::time::Instant::now());
                    }
                    // PostgreSQL answered, and the slot is there to take over.
                    metrics.set_role(Role::Standby);
                    let host = self.primary.borrow().clone();
                    if let Err(e) =
                        beating(health, check_stale_holder(config, &host, &mut holder)).await
                    {
                        tracing::debug!(error = %e, "cannot check the slot's holder");
                    }
                    STANDBY_RETRY
                }
                Err(e) if e.is_transient() => {
                    metrics.set_role(Role::Starting);
                    let delay = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?delay, confirmed = %sink.confirmed(), "replication connection lost; reconnecting");
                    metrics.reconnects.with_label_values(&["postgres"]).inc();
                    delay
                }
                Err(e) => return Err(e),
            };
            if sleep_or_shutdown(delay, shutdown, health).await {
                return Ok(());
            }
        }
    }

    /// Publishes the initial snapshot of a new slot; `false` when shutdown
    /// stopped it (the next start begins it again). A halt in it leaves the
    /// snapshot, and with it the first-start lock, in `held`.
    async fn publish_initial(
        &self,
        initial: InitialSnapshot,
        known_topics: &mut HashSet<String>,
        held: &mut Option<Held>,
    ) -> Result<bool, RunError> {
        let (config, sink, metrics, shutdown) =
            (self.config, self.sink, self.metrics, self.shutdown);
        let ensure = async |topic: &str| -> Result<bool, SinkError> {
            if known_topics.contains(topic) {
                return Ok(true);
            }
            let exists = ensure_topic(sink, topic, metrics, shutdown).await?;
            if exists {
                known_topics.insert(topic.to_owned());
            }
            Ok(exists)
        };
        // Active: this instance publishes, and holds the first-start lock.
        metrics.set_role(Role::Active);
        let publish = snapshot::publish(config, sink, metrics, &initial, ensure);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                tracing::warn!("stopped during the initial snapshot; the next start begins it again");
                return Ok(false);
            }
            // Each fetch is bounded by --request-timeout; sending waits for
            // the broker on purpose.
            published = beating(metrics.health(), publish) => match published {
                Ok(_) => {}
                Err(e @ SnapshotError::ShutDown) => {
                    tracing::warn!("{e}");
                    return Ok(false);
                }
                Err(e) => {
                    let e = RunError::from(e);
                    if e.halt_reason().is_some() && !config.exit_on_halt {
                        initial.end_transaction().await;
                        *held = Some(Held::FirstStart(initial));
                    }
                    return Err(e);
                }
            },
        }
        // Acknowledged whole, unless a shutdown cut it short.
        if !shutdown.is_cancelled() {
            metrics.progress().vouch(sink.confirmed());
        }
        metrics.set_role(Role::Starting);
        Ok(true)
    }
}

/// Why the server refused to stream from the slot: its invalidation with
/// the cause and the way out (read on a metadata connection), or `error`
/// as the server gave it when the slot shows no problem or cannot be read.
async fn explain_unusable(config: &RunConfig, host: &ConnectParams, error: RunError) -> RunError {
    let Ok(client) = metadata::connect(host).await else {
        return error;
    };
    match slot::inspect(&client, &config.slot).await {
        Ok(Some(state)) => state
            .problem(&config.slot, &config.postgres.dbname)
            .map_or(error, RunError::from),
        _ => error,
    }
}

/// One look at the slot's holder from a standby (see [`HolderWatch`]), over
/// a metadata connection of its own to `host`.
async fn check_stale_holder(
    config: &RunConfig,
    host: &ConnectParams,
    watch: &mut HolderWatch,
) -> Result<(), MetadataError> {
    let client = metadata::connect(host).await?;
    watch
        .check(
            &client,
            &config.slot,
            config.stale_slot_grace,
            config.take_over_stale_slot,
        )
        .await
}

/// What a start found: where the slot stands, the snapshot to publish
/// first when this start created the slot, and which server it is on.
struct Prepared {
    confirmed: Lsn,
    initial: Option<InitialSnapshot>,
    /// The primary's host.
    primary: ConnectParams,
    /// Its cluster and timeline.
    system: SystemId,
}

/// Finds the primary among the URL's hosts, checks the server, the
/// publication and the failover chain, makes sure the slot exists (a
/// failover slot where that is asked for and possible), and returns its
/// confirmed position, with the snapshot to publish first when this start
/// created the slot.
///
/// The slots are looked at and changed under the first-start lock (see
/// [`snapshot`]), so that an instance starting while another publishes its
/// initial snapshot waits for it instead of taking its marker for the trace
/// of an interrupted start. The lock goes with the returned snapshot, and is
/// released with the metadata connection otherwise.
async fn prepare_source(config: &RunConfig, metrics: &Metrics) -> Result<Prepared, RunError> {
    // Both connections go to the same primary: the replication connection
    // chooses it, the metadata connection follows.
    let ((mut repl, system), primary) = primary::replication(&config.postgres, None).await?;
    let major = repl.server_major();
    if config.failover_slot == FailoverSlot::Require && major < FAILOVER_SLOTS_SINCE {
        return Err(RunError::FailoverUnsupported(major));
    }
    let failover_slot = config.failover_slot != FailoverSlot::Off && major >= FAILOVER_SLOTS_SINCE;
    let client = metadata::connect(&primary).await?;
    // This connection holds the first-start lock, and the snapshot, for as
    // long as they take: the server must not end it for idling meanwhile.
    client.batch_execute(snapshot::SESSION_TIMEOUTS_OFF).await?;
    let needed = config.mapping.needed_columns();
    metadata::verify_source(&client, &config.publication, &config.table, &needed).await?;
    snapshot::lock_first_start(&client, &config.slot, |waiting| {
        // Waiting for another instance's first start is standing by.
        metrics.set_role(if waiting {
            Role::Standby
        } else {
            Role::Starting
        });
    })
    .await?;
    let marker = snapshot::marker_name(&config.slot);
    let interrupted = slot::inspect(&client, &marker).await?.is_some();
    let existing = slot::inspect(&client, &config.slot).await?;
    let prepared = |confirmed, initial| Prepared {
        confirmed,
        initial,
        primary: primary.clone(),
        system: system.clone(),
    };
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
        let is_failover = ensure_failover_slot(config, &client, &mut repl, failover_slot).await?;
        verify_failover_chain(config, &client, Some(is_failover)).await?;
        let confirmed = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        tracing::info!(slot = %config.slot, confirmed = %confirmed, timeline = system.timeline,
            host = %primary.target(), failover_slot = is_failover, "resuming from the slot");
        // The slot's state is read; nothing else goes over this connection.
        let _ = repl.close().await;
        return Ok(prepared(confirmed, None));
    }
    if !config.create_slot {
        return Err(RunError::NoSlot(config.slot.clone()));
    }
    if system.timeline > 1 && config.new_slot_on_timeline != Some(system.timeline) {
        return Err(RunError::SlotMissingOnPromoted {
            slot: config.slot.clone(),
            timeline: system.timeline,
            when: "when walrelay started".to_owned(),
            missing: failover::missing_steps(&client, &config.slot).await?,
        });
    }
    verify_failover_chain(config, &client, None).await?;
    let create = async |repl: &mut ReplicationConnection, snapshot| {
        if failover_slot {
            repl.create_failover_slot(&config.slot, snapshot).await
        } else {
            repl.create_logical_slot(&config.slot, false, snapshot)
                .await
        }
    };
    if config.snapshot == SnapshotMode::Never {
        let created = create(&mut repl, SnapshotAction::Discard).await?;
        tracing::info!(slot = %created.name, consistent_point = %created.consistent_point, failover_slot,
            "created the replication slot; events committed from here on are published (--snapshot never)");
        let _ = repl.close().await;
        return Ok(prepared(created.consistent_point, None));
    }
    // The marker first: from here until the snapshot is acknowledged, a
    // crash leaves it behind and the next start begins again. With a
    // failover slot the marker is one too, so that standbys synchronize it
    // with the slot: a server promoted during the snapshot then shows the
    // snapshot unfinished, instead of a slot to resume from as though its
    // rows were published (a physical slot is never synchronized).
    if failover_slot {
        repl.create_failover_slot(&marker, SnapshotAction::Discard)
            .await?;
    } else {
        repl.simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL",
            conn::quote_ident(&marker)
        ))
        .await?;
    }
    let created = create(&mut repl, SnapshotAction::Export).await?;
    tracing::info!(slot = %created.name, consistent_point = %created.consistent_point, failover_slot,
        "created the replication slot; the rows already in the table are published first");
    let snapshot = InitialSnapshot::import(client, repl, &created).await?;
    Ok(prepared(created.consistent_point, Some(snapshot)))
}

/// Makes an existing slot a failover slot when `wanted` and it is not one
/// yet (`ALTER_REPLICATION_SLOT`); returns whether it is one. A slot that
/// was synchronized from a former primary says so: this server was promoted.
async fn ensure_failover_slot(
    config: &RunConfig,
    client: &metadata::Client,
    repl: &mut ReplicationConnection,
    wanted: bool,
) -> Result<bool, RunError> {
    let Some(flags) = slot::failover_flags(client, &config.slot).await? else {
        return Ok(false);
    };
    if flags.synced {
        tracing::info!(slot = %config.slot,
            "the slot was synchronized from a former primary (synced): this server was promoted, and the slot came with it");
    }
    if flags.failover || !wanted {
        return Ok(flags.failover);
    }
    match repl.enable_failover(&config.slot).await {
        Ok(()) => {
            tracing::info!(slot = %config.slot, "made the slot a failover slot (ALTER_REPLICATION_SLOT ... FAILOVER true): standbys with sync_replication_slots keep it from now on");
            Ok(true)
        }
        Err(e) if config.failover_slot == FailoverSlot::Require || e.is_transient() => {
            Err(e.into())
        }
        Err(e) => {
            tracing::warn!(slot = %config.slot, error = %e,
                "cannot make the slot a failover slot; a failover would lose it. Fix: ALTER_REPLICATION_SLOT on a replication connection as a role that may");
            Ok(false)
        }
    }
}

/// Checks the failover chain at start (`walrelay check` lists the same):
/// each problem is a warning, or with `--failover-slot require` an error.
async fn verify_failover_chain(
    config: &RunConfig,
    client: &metadata::Client,
    slot_failover: Option<bool>,
) -> Result<(), RunError> {
    let findings = failover::chain_findings(client, config, slot_failover).await?;
    let problems: Vec<String> = findings
        .iter()
        .filter(|f| f.is_problem())
        .map(|f| f.found.clone())
        .collect();
    if config.failover_slot == FailoverSlot::Require && !problems.is_empty() {
        return Err(RunError::FailoverChain(problems));
    }
    for finding in findings.iter().filter(|f| f.is_problem()) {
        tracing::warn!(
            fix = finding.fix.as_deref().unwrap_or_default(),
            "failover chain: {}",
            finding.found
        );
    }
    Ok(())
}

/// After a followed failover, on the new primary: says whether the slot
/// there is the synchronized copy (`synced`) or one made on it since, and
/// warns about each missing piece of the failover chain, since the next
/// failover depends on it (the new primary usually has no standby yet). Only
/// logs: the stream goes on meanwhile, and `--failover-slot require` is for
/// the start.
async fn review_after_failover(
    config: RunConfig,
    host: ConnectParams,
    shutdown: CancellationToken,
) {
    let review = async {
        let client = metadata::connect(&host).await?;
        let flags = slot::failover_flags(&client, &config.slot).await?;
        match flags {
            Some(flags) if flags.synced => {
                tracing::info!(slot = %config.slot, failover = flags.failover,
                "the slot on the promoted server is the copy synchronized from the former primary (synced)");
            }
            Some(flags) => {
                tracing::warn!(slot = %config.slot, failover = flags.failover,
                "the slot on the promoted server was not synchronized from the former primary: it was made on this server since its promotion");
            }
            None => {}
        }
        for finding in failover::chain_findings(&client, &config, flags.map(|f| f.failover))
            .await?
            .iter()
            .filter(|f| f.is_problem())
        {
            tracing::warn!(
                fix = finding.fix.as_deref().unwrap_or_default(),
                "failover chain on the promoted server: {}",
                finding.found
            );
        }
        Ok::<(), MetadataError>(())
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        result = review => if let Err(e) = result {
            tracing::warn!(error = %e, "cannot check the failover chain on the promoted server");
        }
    }
}

/// Waits until `topic` is known to exist; `Ok(false)` when shutdown came first.
async fn ensure_topic(
    sink: &Sink,
    topic: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<bool, SinkError> {
    let mut backoff = Backoff { attempt: 0 };
    let health = metrics.health();
    loop {
        // Bounded by METADATA_TIMEOUT; the broker is waited for on purpose.
        match beating(health, sink.check_topic(topic, METADATA_TIMEOUT)).await {
            Ok(()) => return Ok(true),
            Err(SinkError::Unreachable(e)) => {
                metrics.health().set_broker_up(false);
                metrics.reconnects.with_label_values(&["kafka"]).inc();
                tracing::warn!(error = %e, "the Kafka cluster is not reachable yet; retrying");
                if sleep_or_shutdown(backoff.next(), shutdown, health).await {
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
    /// Where the primary's host is published for the metadata connections.
    primary: &'a watch::Sender<ConnectParams>,
    /// The cluster and timeline last streamed from.
    streamed: &'a mut SystemId,
    /// Where the replication connection goes when the session halts.
    held: &'a mut Option<Held>,
}

/// What the session loop does after a step.
enum Flow {
    Continue,
    Stop,
}

impl Session<'_> {
    async fn run(mut self) -> Result<(), RunError> {
        // Each step is bounded (connect_timeout, --request-timeout); a beat
        // after each keeps the pulse within the stall limit.
        let health = self.metrics.health();
        let (mut repl, system, host, switch) = self.connect().await?;
        health.beat();
        let timing =
            conn::StreamTiming::from_wal_sender_timeout(&repl.show("wal_sender_timeout").await?);
        let interval = timing.status_interval;
        // The stream may be silent up to its silence limit (a walsender busy
        // decoding a large transaction): liveness waits as long.
        health.set_stall_limit(stall_limit(self.config).max(timing.silence_limit + STALL_MARGIN));
        health.beat();
        let anchor = source::anchor(&mut repl, &self.config.table)
            .await?
            .ok_or_else(|| SourceError::TableMissing(self.config.table.clone()))?;
        health.beat();
        let started = self.start_replication(repl, &host, switch).await?;
        // The slot is held now, so nobody else moves it: where it stands is
        // where the server resumes, and the least any status update may say
        // (a standby that takes over would otherwise report the position it
        // read when it started, moving the slot back). Bounded, so that the
        // first status update still goes out before wal_sender_timeout.
        health.beat();
        let (slot_confirmed, wal_end) = tokio::time::timeout(interval, self.slot_confirmed(&host))
            .await
            .map_err(|_| RunError::SlotPosition(interval))??;
        // Before any status update: nothing past this server's WAL end.
        self.check_history(&system, slot_confirmed, wal_end)?;
        if let Some(switch) = switch {
            self.announce_failover(switch, slot_confirmed, &host);
        }
        *self.streamed = system;
        let (mut state, advance) = SessionState::start(&mut self.sink.ledger(), slot_confirmed);
        self.sink.observe(advance);
        let mut stream = started.report(self.sink.feedback().clone(), timing);
        self.metrics.set_role(Role::Active);
        tracing::info!(slot = %self.config.slot, confirmed = %self.sink.confirmed(), "streaming");

        let mut source = Source::new(
            self.config.table.clone(),
            self.config.mapping.clone(),
            anchor,
        );
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
            // A message at least every status interval from a live server
            // (walrelay asks for keepalives), else a stall error.
            health.beat();
            let step = match message.map(|m| source.step(m)) {
                Ok(Ok(step)) => step,
                Ok(Err(SourceError::Row {
                    aggregate,
                    seq_nr,
                    commit_lsn,
                    reason,
                })) => {
                    self.metrics.events_received.inc(); // received, though not an event
                    match self
                        .poison_row(&mut state, aggregate, seq_nr, commit_lsn, reason)
                        .await
                    {
                        Ok(Flow::Continue) => continue,
                        Ok(Flow::Stop) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                Ok(Err(e)) => break Err(e.into()),
                Err(e) => break Err(e.into()),
            };
            match self.handle(&mut state, step).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.metrics.set_role(Role::Starting);
        let advance = state.end(&mut self.sink.ledger());
        self.sink.observe(advance);
        // Nothing behind an event the broker refused may reach it before
        // that event: the drain below must not deliver what is still held.
        self.sink.purge().await;
        self.drain(result.is_ok()).await;
        let confirmed = self.sink.confirmed();
        let result = match (result, self.sink.failure()) {
            // The refusal that names an event, if one came by now.
            (Err(RunError::Publish(_) | RunError::Sink(SinkError::Publish(_))), Some(failure)) => {
                Err(RunError::Publish(Box::new(failure)))
            }
            (result, _) => result,
        };
        if result.as_ref().is_err_and(|e| e.halt_reason().is_some()) && !self.config.exit_on_halt {
            // Halting: the slot stays with this instance, confirmed up to
            // here; the status updates go on.
            tracing::info!(confirmed = %confirmed, "replication connection kept open while halted");
            *self.held = Some(Held::Stream(stream));
            return result;
        }
        // Bounded: on a stalled network even the goodbye may not get through.
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, stream.close())
            .await
            .unwrap_or(Ok(()));
        tracing::info!(confirmed = %confirmed, "replication connection closed");
        result?;
        closed.map_err(RunError::from)
    }

    /// Waits for the acknowledgements of what was sent, so that the final
    /// status update confirms as much as possible: all of it on shutdown
    /// (`clean`); up to a refused event (which the watermark never passes)
    /// on error.
    async fn drain(&self, clean: bool) {
        let timeout = if clean {
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
    }

    /// START_REPLICATION on the slot; a slot missing on a server walrelay
    /// followed a promotion to is lost, and the error says what the setup
    /// lacks.
    async fn start_replication(
        &self,
        repl: ReplicationConnection,
        host: &ConnectParams,
        switch: Option<Switch>,
    ) -> Result<StartedReplication, RunError> {
        let options = source::pgoutput_options(repl.server_version(), &self.config.publication);
        let started = repl
            .start_logical(&self.config.slot, Lsn::ZERO, &options)
            .await;
        match (started, switch) {
            (Err(e), Some(switch)) if e.sqlstate() == Some(SLOT_MISSING) => {
                Err(self.slot_lost(host, switch).await)
            }
            (started, _) => Ok(started?),
        }
    }

    /// That the server continues the history this process confirmed in: the
    /// cluster streamed from before, a slot confirmed no further than the
    /// server's WAL end, and nothing confirmed by this process past it. The
    /// end is the later of IDENTIFY_SYSTEM's and `wal_end`, read after the
    /// slot, since the slot's last holder may have confirmed WAL written
    /// after IDENTIFY_SYSTEM.
    fn check_history(
        &self,
        system: &SystemId,
        slot_confirmed: Lsn,
        wal_end: Lsn,
    ) -> Result<(), RunError> {
        slot::check_history(
            &mut Some(self.streamed.system_id.clone()),
            &system.system_id,
            &self.config.slot,
            slot_confirmed,
            self.sink.confirmed(),
            wal_end.max(system.xlog_pos),
        )?;
        Ok(())
    }

    /// Logs and counts a followed failover, and has the new primary's side
    /// of the chain reviewed in the background.
    fn announce_failover(&self, switch: Switch, slot_confirmed: Lsn, host: &ConnectParams) {
        tracing::warn!(from_timeline = switch.from, to_timeline = switch.to,
            switchpoint = %switch.switchpoint, resume = %slot_confirmed,
            confirmed = %self.sink.confirmed(), host = %host.target(),
            "followed a failover: resuming from the slot on the promoted server (transactions between resume and confirmed are published again)");
        self.metrics.failovers.inc();
        tokio::spawn(review_after_failover(
            self.config.clone(),
            host.clone(),
            self.shutdown.child_token(),
        ));
    }

    /// Connects to the primary among every host, again: one of the cluster
    /// streamed from, on its timeline or a newer one, which the metadata
    /// connections then follow. A newer timeline means the server was
    /// promoted; it is checked before anything is confirmed to it, so that
    /// a position past its branch point never reaches it.
    async fn connect(
        &self,
    ) -> Result<
        (
            ReplicationConnection,
            SystemId,
            ConnectParams,
            Option<Switch>,
        ),
        RunError,
    > {
        let ((mut repl, system), host) =
            primary::replication(&self.config.postgres, Some(self.streamed)).await?;
        self.primary.send_if_modified(|followed| {
            let changed = *followed != host;
            if changed {
                tracing::info!(host = %host.target(), "the primary is now this host");
                followed.clone_from(&host);
            }
            changed
        });
        let switch = if system.timeline > self.streamed.timeline {
            // Late acknowledgements of the old primary's transactions must
            // not count on the new one: wait for them first, so that the
            // check below sees where they end.
            let pending = self.sink.ledger().in_flight();
            if pending > 0 {
                return Err(RunError::FollowPending(pending));
            }
            let history = repl.timeline_history(system.timeline).await?;
            failover::follow(self.streamed, &system, &history, self.sink.confirmed())?
        } else {
            None
        };
        Ok((repl, system, host, switch))
    }

    /// The error for a slot missing on the server walrelay followed a
    /// promotion to: with what that server shows missing from the setup.
    async fn slot_lost(&self, host: &ConnectParams, switch: Switch) -> RunError {
        let missing = match metadata::connect(host).await {
            Ok(client) => failover::missing_steps(&client, &self.config.slot).await,
            Err(e) => Err(e),
        };
        RunError::SlotMissingOnPromoted {
            slot: self.config.slot.clone(),
            timeline: switch.to,
            when: format!(
                "while walrelay followed its promotion from timeline {} (walrelay had \
                 confirmed {} there)",
                switch.from,
                self.sink.confirmed()
            ),
            missing: missing.unwrap_or_else(|e| vec![format!("(cannot tell: {e})")]),
        }
    }

    /// The slot's confirmed position, then the server's WAL end, read on a
    /// metadata connection to `host`.
    async fn slot_confirmed(&self, host: &ConnectParams) -> Result<(Lsn, Lsn), RunError> {
        let client = metadata::connect(host).await?;
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
                self.metrics.events_received.inc();
                if !state.in_transaction() {
                    return Err(SourceError::Order("event outside a transaction").into());
                }
                if !self.known_topics.contains(&event.topic) {
                    match ensure_topic(self.sink, &event.topic, self.metrics, self.shutdown).await {
                        Ok(true) => {}
                        Ok(false) => return Ok(Flow::Stop),
                        // Rows name it: a poison row, not a broken setup.
                        Err(SinkError::TopicMissing(topic)) => {
                            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                            return self
                                .poison_row(
                                    state,
                                    Some(text(&event.key)),
                                    event.seq.as_deref().map_or_else(|| "?".to_owned(), text),
                                    event.commit_lsn,
                                    crate::event::RowError::TopicMissing(topic),
                                )
                                .await;
                        }
                        Err(e) => return Err(e.into()),
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
            // Logged once, as the halt.
            return Err(row.into());
        };
        let failure = PublishFailure::invalid_row(
            aggregate,
            seq_nr,
            commit_lsn,
            self.config.mapping.topic.to_string(),
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
