//! Every metric walrelay exports, defined once, and the HTTP endpoint that
//! serves them with the health probes.
//!
//! `/metrics` is the Prometheus text format. The probes follow the instance's
//! [`Role`]:
//! - `/healthz` (liveness): the process works in its role, streaming,
//!   standing by or halted: its pipeline has made progress, or been in a wait
//!   it chose (backpressure, a standby's retry, a backoff, a bounded start-up
//!   step, a halt), within the stall limit ([`Health::set_stall_limit`]).
//!   Only a wedged pipeline fails it, which a restart may cure.
//! - `/readyz` (readiness): healthy in its role: active with the broker
//!   reachable, or standing by with PostgreSQL answering; and no request to
//!   PostgreSQL waiting longer than half of `--request-timeout`. Starting,
//!   reconnecting and halted instances are not ready. A standby is ready, so
//!   that a rollout or a node drain can go on while another instance holds
//!   the slot.
//! - `/active`: 200 only on the instance that holds the slot and publishes.
//!
//! `/progress` says, as JSON, how far walrelay has published (see
//! [`Progress`]).
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::pg::lsn::Lsn;
use crate::pg::request::{DEFAULT_REQUEST_TIMEOUT, Waiting};

/// Buckets of the commit-to-acknowledgement histogram, in seconds: 0.5 ms to 5 min.
/// Dense below 20 ms, where a healthy relay's commit-to-ack latency lives, so
/// that `histogram_quantile` reads its p99 to within a millisecond.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.01, 0.0125, 0.015,
    0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// walrelay's version, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision walrelay was built from (`build.rs`), or `unknown`.
pub const REVISION: &str = env!("WALRELAY_GIT_REVISION");

/// Why an instance halted (`walrelay_halted{reason}`): each needs a person,
/// since a restart (or another instance) would meet the same row or slot.
pub const HALT_REASONS: [&str; 6] = [
    // A row that cannot become an event (--on-poison halt).
    "poison_row",
    // An event the broker refused for good, or a failed producer (--on-poison halt).
    "refused_event",
    // An UPDATE, DELETE or TRUNCATE of the events table (--on-unexpected-change halt).
    "unexpected_change",
    // The events table renamed, or another table given its name, while streaming.
    "table_renamed",
    // The slot invalidated (wal_status = lost).
    "slot_invalidated",
    // The slot dropped while walrelay used it.
    "slot_vanished",
];

/// What an instance is doing, as the probes and `walrelay_active` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connecting, checking the slot, or reconnecting after a failure.
    Starting,
    /// Holding the slot and publishing (the stream, or the initial snapshot).
    Active,
    /// Connected, waiting for the slot another instance holds (or for
    /// another instance's first start), ready to take over.
    Standby,
    /// Stopped for a reason that needs a person ([`HALT_REASONS`]).
    Halted,
}

impl Role {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Role::Active,
            2 => Role::Standby,
            3 => Role::Halted,
            _ => Role::Starting,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Role::Starting => 0,
            Role::Active => 1,
            Role::Standby => 2,
            Role::Halted => 3,
        }
    }
}

/// The values of `pg_replication_slots.wal_status`.
pub const SLOT_WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// The metric families, registered on a registry of their own.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Events acknowledged by the broker.
    pub events_published: IntCounter,
    /// Key, value and header bytes of the acknowledged events.
    pub published_bytes: IntCounter,
    /// Rows of the events table decoded from the replication stream.
    pub events_received: IntCounter,
    /// Transactions of the events table fully acknowledged and confirmable.
    pub transactions: IntCounter,
    /// Events the broker refused or that could not be sent, by reason.
    pub publish_errors: IntCounterVec,
    /// Events handed to the producer and not yet acknowledged.
    pub inflight_events: IntGauge,
    /// Transactions with events not yet confirmable: the watermark's entries.
    pub inflight_transactions: IntGauge,
    /// The producer queue's bound on them (`queue.buffering.max.messages`).
    pub inflight_events_max: IntGauge,
    /// The highest WAL position received from the server.
    pub received_lsn: IntGauge,
    /// The position confirmed to the server (the slot's flush position).
    pub confirmed_lsn: IntGauge,
    /// The server's WAL position minus the slot's `confirmed_flush_lsn`, by slot.
    pub source_lag_bytes: IntGaugeVec,
    /// From the commit timestamp to the broker's acknowledgement, per event.
    pub commit_to_ack: Histogram,
    /// Commit time of the newest fully acknowledged transaction, Unix seconds.
    pub last_commit_timestamp: prometheus::Gauge,
    /// Connections re-established after a failure, by target (postgres, kafka).
    pub reconnects: IntCounterVec,
    /// UPDATE, DELETE or TRUNCATE seen on the events table, by kind.
    pub unexpected_changes: IntCounterVec,
    /// Records written to the dead-letter topic (and acknowledged).
    pub dead_lettered: IntCounter,
    /// 1 while this instance waits for a slot another process holds.
    pub standby: IntGauge,
    /// 1 while this instance holds the slot and publishes.
    pub active: IntGauge,
    /// 1 for the reason this instance halted, 0 for the others.
    pub halted: IntGaugeVec,
    /// `pg_replication_slots.safe_wal_size` of the slot, by slot; absent when unlimited.
    pub slot_safe_wal_size: IntGaugeVec,
    /// 1 for the slot's current `wal_status`, 0 for the others, by slot.
    pub slot_wal_status: IntGaugeVec,
    /// WAL the slot keeps on disk: current WAL position minus its `restart_lsn`, by slot.
    pub slot_retained_wal: IntGaugeVec,
    /// When the slot became inactive, whole Unix seconds (PostgreSQL 17+),
    /// by slot; 0 while a process streams from it.
    pub slot_inactive_since: IntGaugeVec,
    /// `idle_replication_slot_timeout` in seconds (PostgreSQL 18+), by the
    /// slot it applies to; 0: off.
    pub slot_idle_timeout: IntGaugeVec,
    /// Rows of the initial snapshot handed to the producer.
    pub snapshot_rows: IntCounter,
    /// 1 while the initial snapshot is being published.
    pub snapshot_running: IntGauge,
    /// Connections to the HTTP endpoint closed unserved: too many were open.
    pub http_connections_rejected: IntCounter,
    /// Events whose metadata held a malformed trace context header, left
    /// out, by header (traceparent, tracestate).
    pub trace_context_invalid: IntCounterVec,
    /// Promotions walrelay followed: it resumed on a new primary's timeline.
    pub failovers: IntCounter,
    /// Per physical slot of `synchronized_standby_slots`: the primary's WAL
    /// position minus the slot's `restart_lsn`, WAL the failover slot may not
    /// be decoded past until that standby has it.
    pub standby_sync_lag: IntGaugeVec,
    health: Arc<Health>,
    progress: Arc<Progress>,
}

/// What the probes report: the role, the broker, the requests waiting, and
/// the pipeline's pulse.
#[derive(Debug)]
pub struct Health {
    role: AtomicU8,
    broker_up: AtomicBool,
    /// Requests to PostgreSQL waiting for their answers.
    requests: Arc<Waiting>,
    /// `--request-timeout`, in milliseconds.
    request_timeout_ms: AtomicU64,
    /// When the pipeline last made progress or waited on purpose, in
    /// milliseconds since `born`.
    pulse_ms: AtomicU64,
    /// How long the pulse may stay silent before the pipeline counts as wedged.
    stall_limit_ms: AtomicU64,
    /// Set once shutdown began: draining is a wait of its own, bounded by
    /// `--shutdown-timeout`.
    stopping: AtomicBool,
    /// Why the instance halted, for `/readyz`.
    halt: Mutex<Option<String>>,
    /// Tokio's clock, which tests can pause.
    born: tokio::time::Instant,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            role: AtomicU8::new(Role::Starting.as_u8()),
            broker_up: AtomicBool::new(false),
            requests: Arc::default(),
            request_timeout_ms: AtomicU64::new(millis(DEFAULT_REQUEST_TIMEOUT)),
            pulse_ms: AtomicU64::new(0),
            stall_limit_ms: AtomicU64::new(millis(DEFAULT_STALL_LIMIT)),
            stopping: AtomicBool::new(false),
            halt: Mutex::new(None),
            born: tokio::time::Instant::now(),
        }
    }
}

/// How long the pipeline may go without a sign of life unless
/// [`Health::set_stall_limit`] says otherwise.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(60);

/// How often a wait on purpose ([`beating`]) beats the pulse.
pub const PULSE_TICK: Duration = Duration::from_secs(1);

/// Runs `wait`, a wait the pipeline chose (a backoff, a standby's retry, a
/// step bounded by its own timeout), beating `health`'s pulse meanwhile, so
/// that liveness does not take it for a wedge.
pub async fn beating<F: Future>(health: &Health, wait: F) -> F::Output {
    let mut wait = std::pin::pin!(wait);
    let mut tick = tokio::time::interval(PULSE_TICK);
    loop {
        health.beat();
        tokio::select! {
            biased;
            output = &mut wait => {
                health.beat();
                return output;
            }
            _ = tick.tick() => {}
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Health {
    /// Where the connections to PostgreSQL list the requests waiting for an
    /// answer (see [`crate::pg::request`]).
    pub fn requests(&self) -> Arc<Waiting> {
        Arc::clone(&self.requests)
    }

    /// `--request-timeout`: a request that has waited half as long makes
    /// the instance not ready.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.request_timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }

    /// The role now.
    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Relaxed))
    }

    /// A sign of life of the pipeline: it made progress, or waits on purpose.
    pub fn beat(&self) {
        self.pulse_ms
            .store(millis(self.born.elapsed()), Ordering::Relaxed);
    }

    /// How long the pipeline may go without a sign of life before `/healthz`
    /// calls it wedged.
    pub fn set_stall_limit(&self, limit: Duration) {
        self.stall_limit_ms.store(millis(limit), Ordering::Relaxed);
    }

    /// Shutdown began: the drain that follows is bounded by itself.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `None` while live, else why not: the pipeline has shown no sign of
    /// life for longer than the stall limit.
    pub fn not_live_reason(&self) -> Option<String> {
        if self.stopping.load(Ordering::Relaxed) {
            return None;
        }
        let silent =
            millis(self.born.elapsed()).saturating_sub(self.pulse_ms.load(Ordering::Relaxed));
        let limit = self.stall_limit_ms.load(Ordering::Relaxed);
        (silent > limit).then(|| {
            format!(
                "wedged: the pipeline has neither made progress nor waited on purpose for {:.1}s \
                 (limit {:.0}s)",
                Duration::from_millis(silent).as_secs_f64(),
                Duration::from_millis(limit).as_secs_f64()
            )
        })
    }

    /// Whether the broker answers.
    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        let role = self.role();
        if role == Role::Halted {
            let why = self
                .halt
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            return Some(format!("halted: {}", why.unwrap_or_default()));
        }
        // A stuck request is named in every other role: starting included,
        // where the start-up checks are what gets stuck.
        let timeout = Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed));
        if let Some((request, waited)) = self.requests.longest() {
            if waited >= timeout / 2 {
                return Some(format!(
                    "PostgreSQL has not answered `{request}` for {:.1}s (abandoned at \
                     --request-timeout {timeout:?})",
                    waited.as_secs_f64()
                ));
            }
        }
        if role == Role::Starting {
            return Some(
                "neither streaming nor standing by: connecting to PostgreSQL or checking the slot"
                    .to_owned(),
            );
        }
        // A standby's producer sends nothing, so nothing would tell it that
        // an outage ended: the broker counts for the active instance only
        // (a standby found the topic before it stood by).
        if role == Role::Active && !self.broker_up.load(Ordering::Relaxed) {
            return Some("the Kafka broker is not reachable".to_owned());
        }
        None
    }

    /// `None` on the active instance, else what it does instead.
    pub fn not_active_reason(&self) -> Option<&'static str> {
        match self.role() {
            Role::Active => None,
            Role::Standby => Some("standing by: another instance holds the slot"),
            Role::Starting => Some("starting or reconnecting"),
            Role::Halted => Some("halted"),
        }
    }
}

/// How far walrelay has published, for `/progress`: writers wait on it.
///
/// `confirmed` is the watermark of [`crate::checkpoint`]: every transaction
/// of the events table whose commit record ends at or before it was
/// acknowledged by the broker, with every transaction before it. It is the
/// end of such a commit record, or a WAL position the server reported in a
/// keepalive while nothing was in flight (the walsender reports the end of
/// the last record it decoded, so every transaction committed before it was
/// sent, and acknowledged, before the keepalive). Either way, a writer whose
/// transaction committed, and that then read `pg_current_wal_lsn()` (at or
/// past the commit record's end once COMMIT returned, with
/// `synchronous_commit` on), finds its events on the topic once
/// `confirmed` is at or past that value.
///
/// Before walrelay can vouch for a position it reports none: until it has
/// read the slot's, and, on the start that creates the slot, until the
/// initial snapshot is acknowledged (the slot's position is then its
/// consistent point, but the rows committed before it are still on their
/// way). The commit time is that of the newest transaction with events this
/// process saw acknowledged: none after a start, even when the slot was
/// confirmed far already.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<Published>,
}

/// A reading of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// The confirmed position; `None` before walrelay vouches for one.
    pub confirmed: Option<Lsn>,
    /// The commit time (PostgreSQL microseconds since 2000-01-01) of the
    /// newest transaction with events acknowledged since this process
    /// started; `None` before the first.
    pub last_commit_ts: Option<i64>,
}

impl Progress {
    fn state(&self) -> std::sync::MutexGuard<'_, Published> {
        // Every update is one field at a time: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From here on walrelay vouches for `lsn`: the slot's position read at
    /// start, or the end of the initial snapshot once it is acknowledged.
    pub fn vouch(&self, lsn: Lsn) {
        let mut state = self.state();
        state.confirmed = Some(state.confirmed.map_or(lsn, |c| c.max(lsn)));
    }

    /// The confirmed position moved to `lsn`; ignored before [`vouch`](Self::vouch).
    pub fn confirmed(&self, lsn: Lsn) {
        let mut state = self.state();
        if let Some(confirmed) = &mut state.confirmed {
            *confirmed = (*confirmed).max(lsn);
        }
    }

    /// A transaction that committed at `commit_ts` (PostgreSQL microseconds)
    /// was acknowledged, and is confirmed; ignored before [`vouch`](Self::vouch)
    /// (the initial snapshot's "commit time" is only when it was read).
    pub fn committed(&self, commit_ts: i64) {
        let mut state = self.state();
        if state.confirmed.is_some() {
            state.last_commit_ts = Some(commit_ts);
        }
    }

    /// The current reading.
    pub fn get(&self) -> Published {
        *self.state()
    }

    /// The body of `/progress`: `confirmed_lsn` as `X/Y`, `confirmed_lsn_int`
    /// as a number and `last_commit_ts` in RFC 3339, each `null` while unknown.
    pub fn to_json(&self) -> String {
        let Published {
            confirmed,
            last_commit_ts,
        } = self.get();
        serde_json::json!({
            "confirmed_lsn": confirmed.map(|lsn| lsn.to_string()),
            "confirmed_lsn_int": confirmed.map(|lsn| lsn.0),
            "last_commit_ts": last_commit_ts.map(crate::event::format_commit_ts),
        })
        .to_string()
    }
}

impl Metrics {
    /// Creates and registers every family.
    #[allow(clippy::too_many_lines)] // One flat list of families reads best.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let commit_to_ack = Histogram::with_opts(
            HistogramOpts::new(
                "walrelay_commit_to_ack_seconds",
                "Time from a transaction's commit to the broker's acknowledgement of each of its events.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(commit_to_ack.clone()))
            .expect("unique metric");
        let last_commit_timestamp = prometheus::Gauge::new(
            "walrelay_last_commit_timestamp_seconds",
            "Commit time (Unix seconds) of the newest transaction whose events were all acknowledged.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_commit_timestamp.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "walrelay_build_info",
                "Always 1; the labels say which walrelay runs: version, git revision, librdkafka version.",
            ),
            &["version", "revision", "librdkafka"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        build_info
            .with_label_values(&[VERSION, REVISION, &librdkafka])
            .set(1);
        // The process's memory, CPU time, open files and start time, as
        // every Prometheus client exports them (`process_*`).
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");

        let metrics = Metrics {
            events_published: counter(
                "walrelay_events_published_total",
                "Events the broker acknowledged.",
            ),
            published_bytes: counter(
                "walrelay_published_bytes_total",
                "Key, value and header bytes of the events the broker acknowledged.",
            ),
            events_received: counter(
                "walrelay_events_received_total",
                "Rows of the events table decoded from the replication stream (replays included).",
            ),
            transactions: counter(
                "walrelay_transactions_total",
                "Transactions of the events table fully acknowledged.",
            ),
            publish_errors: counter_vec(
                "walrelay_publish_errors_total",
                "Events the broker refused or that could not be produced, by reason.",
                "reason",
            ),
            inflight_events: gauge(
                "walrelay_inflight_events",
                "Events handed to the producer and not yet acknowledged.",
            ),
            inflight_transactions: gauge(
                "walrelay_inflight_transactions",
                "Transactions with events received and not yet fully acknowledged.",
            ),
            inflight_events_max: gauge(
                "walrelay_inflight_events_max",
                "The producer queue's bound on walrelay_inflight_events (queue.buffering.max.messages).",
            ),
            received_lsn: gauge(
                "walrelay_received_lsn",
                "Highest WAL position received from PostgreSQL, as a number.",
            ),
            confirmed_lsn: gauge(
                "walrelay_confirmed_lsn",
                "WAL position confirmed to PostgreSQL (the slot's flush position), as a number.",
            ),
            source_lag_bytes: gauge_vec(
                "walrelay_source_lag_bytes",
                "The server's WAL position minus the slot's confirmed_flush_lsn, read every 5 s.",
                &["slot"],
            ),
            commit_to_ack,
            last_commit_timestamp,
            reconnects: counter_vec(
                "walrelay_reconnects_total",
                "Connections re-established after a failure, by target (postgres, kafka).",
                "target",
            ),
            unexpected_changes: counter_vec(
                "walrelay_unexpected_changes_total",
                "UPDATE, DELETE or TRUNCATE seen on the append-only events table, by kind.",
                "kind",
            ),
            dead_lettered: counter(
                "walrelay_dead_lettered_total",
                "Records describing a refused event, acknowledged on the dead-letter topic.",
            ),
            standby: gauge(
                "walrelay_standby",
                "1 while this instance waits as a standby for a slot another process holds.",
            ),
            active: gauge(
                "walrelay_active",
                "1 while this instance holds the slot and publishes (the stream or the initial snapshot).",
            ),
            halted: gauge_vec(
                "walrelay_halted",
                "1 for the reason this instance halted and waits for a person; 0 for the others.",
                &["reason"],
            ),
            slot_safe_wal_size: gauge_vec(
                "walrelay_slot_safe_wal_size_bytes",
                "WAL that can still be written before the slot is invalidated (absent: unlimited).",
                &["slot"],
            ),
            slot_wal_status: gauge_vec(
                "walrelay_slot_wal_status",
                "1 for the slot's current wal_status (reserved, extended, unreserved, lost).",
                &["slot", "status"],
            ),
            slot_retained_wal: gauge_vec(
                "walrelay_slot_retained_wal_bytes",
                "WAL the slot keeps: the server's WAL position minus the slot's restart_lsn.",
                &["slot"],
            ),
            snapshot_rows: counter(
                "walrelay_snapshot_rows_total",
                "Rows of the initial snapshot read from the table and handed to the producer.",
            ),
            snapshot_running: gauge(
                "walrelay_snapshot_running",
                "1 while the initial snapshot of a new slot is being published.",
            ),
            slot_inactive_since: gauge_vec(
                "walrelay_slot_inactive_since_seconds",
                "When the slot became inactive, Unix seconds (0 while a process streams from it, or before PostgreSQL 17).",
                &["slot"],
            ),
            slot_idle_timeout: gauge_vec(
                "walrelay_slot_idle_timeout_seconds",
                "idle_replication_slot_timeout: a slot unused this long is invalidated (0: never; PostgreSQL 18+).",
                &["slot"],
            ),
            http_connections_rejected: counter(
                "walrelay_http_connections_rejected_total",
                "Connections to the metrics endpoint closed unserved because too many were open.",
            ),
            trace_context_invalid: counter_vec(
                "walrelay_trace_context_invalid_total",
                "Events whose metadata held a malformed W3C trace context value, not copied into \
                 its header, by header (traceparent, tracestate).",
                "header",
            ),
            failovers: counter(
                "walrelay_failovers_total",
                "Promotions followed: walrelay resumed from its slot on a new primary's timeline.",
            ),
            standby_sync_lag: gauge_vec(
                "walrelay_standby_sync_lag_bytes",
                "WAL the primary holds that the standby of this synchronized_standby_slots slot has not confirmed; the failover slot is not decoded past it.",
                &["slot"],
            ),
            registry,
            health: Arc::new(Health::default()),
            progress: Arc::new(Progress::default()),
        };
        // Export the labelled series at 0 so alerts and rates see them from the start.
        for reason in ["refused", "timed_out", "fatal", "invalid_row"] {
            metrics.publish_errors.with_label_values(&[reason]);
        }
        for header in [
            crate::trace_context::TRACEPARENT,
            crate::trace_context::TRACESTATE,
        ] {
            metrics.trace_context_invalid.with_label_values(&[header]);
        }
        for target in ["postgres", "kafka"] {
            metrics.reconnects.with_label_values(&[target]);
        }
        for kind in ["update", "delete", "truncate"] {
            metrics.unexpected_changes.with_label_values(&[kind]);
        }
        for reason in HALT_REASONS {
            metrics.halted.with_label_values(&[reason]);
        }
        metrics
    }

    /// Exports the series of `slot` that alerts need from the start: each
    /// `wal_status`, `inactive_since` and the idle timeout at 0 until the
    /// slot is read.
    pub fn watch_slot(&self, slot: &str) {
        for status in SLOT_WAL_STATUSES {
            self.slot_wal_status.with_label_values(&[slot, status]);
        }
        // 0 (nothing to say) until read: PostgreSQL 14-16 never record
        // inactive_since, and 0 is also "no idle timeout".
        self.slot_inactive_since.with_label_values(&[slot]);
        self.slot_idle_timeout.with_label_values(&[slot]);
    }

    /// The readiness flags.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// What `/progress` reports.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Takes up `role` (not [`Role::Halted`]: see [`Metrics::halt`]):
    /// `walrelay_active` and `walrelay_standby` follow. A halted instance
    /// stays halted.
    pub fn set_role(&self, role: Role) {
        debug_assert_ne!(role, Role::Halted, "halt() says why");
        let current = &self.health.role;
        if current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (Role::from_u8(r) != Role::Halted).then_some(role.as_u8())
            })
            .is_err()
        {
            return;
        }
        self.active.set(i64::from(role == Role::Active));
        self.standby.set(i64::from(role == Role::Standby));
        self.health.beat();
    }

    /// Halts for `reason` (one of [`HALT_REASONS`]), explained by `why`.
    pub fn halt(&self, reason: &'static str, why: &str) {
        *self
            .health
            .halt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(format!("{reason}: {why}"));
        self.health
            .role
            .store(Role::Halted.as_u8(), Ordering::Relaxed);
        self.active.set(0);
        self.standby.set(0);
        self.halted.with_label_values(&[reason]).set(1);
        self.health.beat();
    }

    /// Sets an LSN gauge (LSNs fit in i64 for the next few million years of WAL).
    pub fn set_lsn(gauge: &IntGauge, lsn: Lsn) {
        gauge.set(i64::try_from(lsn.0).unwrap_or(i64::MAX));
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for valid families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a client may take to send a request's head (its request line and
/// headers), and how long a kept-alive connection may sit idle between
/// requests: a request to these endpoints is a few hundred bytes, sent in
/// milliseconds by any scraper or probe.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; one more is closed as soon as it is accepted.
/// A Prometheus server or two and an orchestrator's probes need a handful.
pub const MAX_CONNECTIONS: usize = 32;
/// How long one connection is served. Then it is closed between two requests,
/// or, busy with a response its client does not read, dropped
/// [`CLOSE_GRACE`] later.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a connection asked to close (at shutdown, or at the end of its
/// lifetime) may take to finish the response it is writing.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The read buffer of a connection, hence the largest request head accepted
/// (hyper's minimum is 8 KiB; a larger head is answered 431).
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// The limits of the HTTP endpoint. Anyone who reaches the port can open
/// connections: these bound what each one, and all of them, may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`CONNECTION_LIFETIME`].
    pub connection_lifetime: Duration,
    /// See [`CLOSE_GRACE`]; at shutdown, never longer than the shutdown timeout.
    pub close_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            connection_lifetime: CONNECTION_LIFETIME,
            close_grace: CLOSE_GRACE,
        }
    }
}

/// A probe's answer: 200 with `ok`, or 503 with `prefix: why`.
fn probe(why_not: Option<String>, ok: &str, prefix: &str) -> (axum::http::StatusCode, String) {
    match why_not {
        None => (axum::http::StatusCode::OK, format!("{ok}\n")),
        Some(why) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{prefix}: {why}\n"),
        ),
    }
}

/// The routes: `/metrics`, `/healthz`, `/readyz` and `/active`.
fn router(metrics: &Metrics) -> axum::Router {
    use axum::http::header;
    use axum::routing::get;

    let for_metrics = metrics.clone();
    let health = Arc::clone(metrics.health());
    let for_live = Arc::clone(metrics.health());
    let for_active = Arc::clone(metrics.health());
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = for_metrics.render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let answer = probe(for_live.not_live_reason(), "ok", "not live");
                async move { answer }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let answer = probe(health.not_ready_reason(), "ready", "not ready");
                async move { answer }
            }),
        )
        .route(
            "/active",
            get(move || {
                let why = for_active.not_active_reason().map(str::to_owned);
                let answer = probe(why, "active", "not active");
                async move { answer }
            }),
        )
}

/// The route `/progress`: [`Progress::to_json`], always 200 (an unknown
/// position reads `null`, which a writer waiting on it treats as "not yet").
fn progress_router(metrics: &Metrics) -> axum::Router {
    use axum::http::header;
    use axum::routing::get;

    let progress = Arc::clone(metrics.progress());
    axum::Router::new().route(
        "/progress",
        get(move || {
            let body = progress.to_json();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    )
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/progress` on `listener` until `shutdown`
/// completes; then stops accepting, closes idle connections at once and gives
/// busy ones `limits.close_grace` to finish their response before dropping
/// them, so that shutdown never waits on a client.
///
/// Each connection runs under [`HttpLimits`]: hyper's header-read timeout
/// (which also closes idle kept-alive connections), a lifetime, and a cap on
/// how many are served at once. Over the cap, a new connection is closed as
/// soon as it is accepted: the client learns at once, instead of waiting in
/// the listen backlog.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(&metrics).merge(progress_router(&metrics));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    // `closing`: finish the response in hand, then close; `dropping`: close now.
    let closing = CancellationToken::new();
    let dropping = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            // Shutdown first: no new connection once it is asked for.
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was
                // accepted: pause briefly rather than spin on the error.
                tracing::debug!(error = %error, "metrics endpoint: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.http_connections_rejected.inc();
            drop(stream);
            continue;
        };
        connections.spawn(serve_connection(
            stream,
            app.clone(),
            limits,
            closing.clone(),
            dropping.clone(),
            slot,
        ));
    }
    drop(listener);
    closing.cancel();
    connections.close();
    if tokio::time::timeout(limits.close_grace, connections.wait())
        .await
        .is_err()
    {
        dropping.cancel();
        connections.wait().await;
    }
}

/// How long the accept loop pauses after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves one connection under `limits`, holding its `slot` until it ends.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: axum::Router,
    limits: HttpLimits,
    closing: CancellationToken,
    dropping: CancellationToken,
    slot: OwnedSemaphorePermit,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        biased;
        () = dropping.cancelled() => return,
        // Timeouts and client errors end here; they are the client's business.
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(error = %error, "metrics endpoint: connection ended");
            }
            return;
        }
        () = closing.cancelled() => {}
        () = tokio::time::sleep(limits.connection_lifetime) => {}
    }
    // Idle: closed at once. Mid-request: closed after its response, if that
    // goes out within the grace.
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        biased;
        () = dropping.cancelled() => {}
        _ = connection.as_mut() => {}
        () = tokio::time::sleep(limits.close_grace) => {}
    }
    drop(slot);
}

/// Binds the metrics address, before anything else starts, so a port clash is
/// a configuration error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_family_is_exported() {
        let metrics = Metrics::new();
        metrics.watch_slot("walrelay");
        // The series that appear with the first reading of the slot.
        metrics
            .source_lag_bytes
            .with_label_values(&["walrelay"])
            .set(1);
        metrics
            .slot_retained_wal
            .with_label_values(&["walrelay"])
            .set(1);
        metrics
            .slot_safe_wal_size
            .with_label_values(&["walrelay"])
            .set(1);
        metrics
            .slot_inactive_since
            .with_label_values(&["walrelay"])
            .set(0);
        metrics
            .slot_idle_timeout
            .with_label_values(&["walrelay"])
            .set(0);
        metrics
            .standby_sync_lag
            .with_label_values(&["standby1"])
            .set(0);
        let text = metrics.render();
        for name in [
            "walrelay_events_published_total",
            "walrelay_published_bytes_total",
            "walrelay_events_received_total",
            "walrelay_inflight_events_max",
            "walrelay_snapshot_rows_total",
            "walrelay_snapshot_running",
            "walrelay_slot_safe_wal_size_bytes",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
            "walrelay_transactions_total",
            "walrelay_publish_errors_total",
            "walrelay_inflight_events",
            "walrelay_inflight_transactions",
            "walrelay_received_lsn",
            "walrelay_confirmed_lsn",
            "walrelay_source_lag_bytes",
            "walrelay_commit_to_ack_seconds",
            "walrelay_last_commit_timestamp_seconds",
            "walrelay_reconnects_total",
            "walrelay_unexpected_changes_total",
            "walrelay_build_info",
            "walrelay_standby",
            "walrelay_slot_wal_status",
            "walrelay_slot_retained_wal_bytes",
            "walrelay_slot_inactive_since_seconds",
            "walrelay_slot_idle_timeout_seconds",
            "walrelay_http_connections_rejected_total",
            "walrelay_trace_context_invalid_total",
            "walrelay_failovers_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        // The slot label on every slot metric.
        for name in [
            "walrelay_source_lag_bytes",
            "walrelay_slot_wal_status",
            "walrelay_slot_retained_wal_bytes",
            "walrelay_slot_safe_wal_size_bytes",
        ] {
            let series: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect();
            assert!(
                !series.is_empty() && series.iter().all(|l| l.contains("slot=\"walrelay\"")),
                "{name}: {series:?}"
            );
        }
        // Every family also appears in the README's reference (the process
        // collector's under their common prefix).
        let readme = include_str!("../README.md");
        for line in text
            .lines()
            .filter(|l| l.starts_with("# TYPE ") && !l.starts_with("# TYPE process_"))
        {
            let name = line.split_whitespace().nth(2).unwrap();
            let documented =
                readme.contains(&format!("`{name}`")) || readme.contains(&format!("`{name}{{"));
            assert!(documented, "{name} is not documented in README.md");
        }
    }

    /// Serves on a free local port with `limits`; returns the address, the
    /// metrics, the trigger of shutdown and the server's task.
    async fn start(
        limits: HttpLimits,
    ) -> (
        SocketAddr,
        Metrics,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let on_stop = stop.clone();
        let server = tokio::spawn(serve(listener, metrics.clone(), limits, async move {
            on_stop.cancelled().await;
        }));
        (addr, metrics, stop, server)
    }

    /// Reads until the server closes the connection; panics after `within`.
    async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        let read = tokio::time::timeout(within, async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "the server kept the connection open past {within:?}"
        );
        received
    }

    /// `GET /healthz` on a fresh connection: the status line, or `None` when
    /// the server closed the connection without an answer.
    async fn get(addr: SocketAddr) -> Option<String> {
        get_path(addr, "/healthz").await
    }

    /// `GET path` on a fresh connection, as [`get`].
    async fn get_path(addr: SocketAddr, path: &str) -> Option<String> {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = closed_by_server(&mut stream, Duration::from_secs(10)).await;
        let text = String::from_utf8_lossy(&answer);
        text.lines()
            .next()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
    }

    const LONG: Duration = Duration::from_secs(600);

    #[tokio::test]
    async fn silent_half_sent_and_idle_connections_are_closed_after_the_header_timeout() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, _stop, _server) = start(HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            connection_lifetime: LONG,
            ..HttpLimits::default()
        })
        .await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metr").await.unwrap();
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Bounded by the test, not by the server: without the timeout, never.
        closed_by_server(&mut silent, Duration::from_secs(30)).await;
        closed_by_server(&mut half, Duration::from_secs(30)).await;
        let answered = closed_by_server(&mut idle, Duration::from_secs(30)).await;
        assert!(
            String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"),
            "the kept-alive connection was answered first"
        );
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once_and_counted() {
        let (addr, metrics, _stop, _server) = start(HttpLimits {
            header_read_timeout: LONG,
            max_connections: 2,
            connection_lifetime: LONG,
            ..HttpLimits::default()
        })
        .await;
        let first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Accepted in order: the third is over the cap, and told so by a
        // close, long before the (ten-minute) header timeout.
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_by_server(&mut third, Duration::from_secs(30)).await;
        assert_eq!(metrics.http_connections_rejected.get(), 1);
        // A closed connection frees its slot for the next client.
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if get(addr).await.is_some_and(|l| l.contains(" 200 ")) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no slot came free");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_slow_clients() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, stop, server) = start(HttpLimits {
            header_read_timeout: LONG,
            connection_lifetime: LONG,
            close_grace: Duration::from_millis(300),
            ..HttpLimits::default()
        })
        .await;
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metr").await.unwrap();
        // A client that asks and asks and never reads: its responses fill the
        // socket buffers, and the server blocks writing to it.
        let mut greedy = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000);
        let _ = tokio::time::timeout(Duration::from_secs(5), greedy.write_all(&request)).await;
        assert_eq!(get(addr).await.as_deref(), Some("HTTP/1.1 200 OK"));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("the server stopped without waiting for its clients")
            .unwrap();
        closed_by_server(&mut half, Duration::from_secs(30)).await;
    }

    #[tokio::test]
    async fn a_client_that_never_reads_loses_its_connection_after_its_lifetime() {
        use tokio::io::AsyncWriteExt;
        let (addr, _, _stop, _server) = start(HttpLimits {
            header_read_timeout: LONG,
            max_connections: 1,
            connection_lifetime: Duration::from_millis(300),
            close_grace: Duration::from_millis(300),
        })
        .await;
        // It takes the only slot and asks for more than the socket buffers
        // hold, reading nothing: the server blocks writing to it.
        let mut greedy = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000);
        let _ = tokio::time::timeout(Duration::from_secs(5), greedy.write_all(&request)).await;
        // The slot comes free all the same.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if get(addr).await.is_some_and(|l| l.contains(" 200 ")) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client that never reads kept its connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn progress_is_null_until_vouched_for_then_only_moves_forward() {
        let progress = Progress::default();
        let json = |p: &Progress| serde_json::from_str::<serde_json::Value>(&p.to_json()).unwrap();
        let unknown = serde_json::json!({
            "confirmed_lsn": null, "confirmed_lsn_int": null, "last_commit_ts": null,
        });
        assert_eq!(json(&progress), unknown);
        // The initial snapshot completes before walrelay vouches: its
        // position and its time say nothing about older commits yet.
        progress.confirmed(Lsn(0x1_0000));
        progress.committed(1);
        assert_eq!(json(&progress), unknown);

        progress.vouch(Lsn(0x16_B374_D848));
        assert_eq!(
            json(&progress),
            serde_json::json!({
                "confirmed_lsn": "16/B374D848",
                "confirmed_lsn_int": 0x16_B374_D848_u64,
                "last_commit_ts": null,
            })
        );
        // 2026-11-25T10:18:50.969472Z in PostgreSQL microseconds.
        let ts = 848_917_130_969_472;
        progress.confirmed(Lsn(0x17_0000_0000));
        progress.committed(ts);
        // Never back, also when asked to (a keepalive below a commit's end).
        progress.confirmed(Lsn(0x16_0000_0000));
        progress.vouch(Lsn(0x16_0000_0000));
        assert_eq!(
            json(&progress),
            serde_json::json!({
                "confirmed_lsn": "17/0",
                "confirmed_lsn_int": 0x17_0000_0000_u64,
                "last_commit_ts": "2026-11-25T10:18:50.969472Z",
            })
        );
    }

    #[tokio::test]
    async fn progress_is_served_as_json() {
        let (addr, metrics, _stop, _server) = start(HttpLimits::default()).await;
        metrics.progress().vouch(Lsn(0x2A));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"GET /progress HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let answer = closed_by_server(&mut stream, Duration::from_secs(10)).await;
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["confirmed_lsn"], "0/2A");
        assert_eq!(body["confirmed_lsn_int"], 42);
    }

    #[test]
    fn readiness_follows_the_role_and_a_halt_is_final() {
        let m = Metrics::new();
        let h = m.health();
        let value = |name: &str| crate::metrics::tests::value(&m.render(), name);
        // Starting: neither ready nor active.
        assert!(h.not_ready_reason().is_some());
        assert!(h.not_active_reason().is_some());
        // A standby is ready (the broker counts for the active one only),
        // and not active.
        m.set_role(Role::Standby);
        assert_eq!(h.not_ready_reason(), None);
        assert_eq!(
            h.not_active_reason(),
            Some("standing by: another instance holds the slot")
        );
        assert_eq!(
            (value("walrelay_active"), value("walrelay_standby")),
            (0, 1)
        );
        // Active: ready once the broker is reachable.
        m.set_role(Role::Active);
        assert_eq!(
            h.not_ready_reason().as_deref(),
            Some("the Kafka broker is not reachable")
        );
        h.set_broker_up(true);
        assert_eq!(h.not_ready_reason(), None);
        assert_eq!(h.not_active_reason(), None);
        assert_eq!(
            (value("walrelay_active"), value("walrelay_standby")),
            (1, 0)
        );
        // Every halt reason is exported at 0 until it happens.
        for reason in HALT_REASONS {
            assert_eq!(value(&format!("walrelay_halted{{reason=\"{reason}\"}}")), 0);
        }
        m.halt("poison_row", "row of aggregate \"a\" cannot be published");
        let why = h
            .not_ready_reason()
            .expect("a halted instance is not ready");
        assert!(
            why.starts_with("halted: poison_row: row of aggregate"),
            "{why}"
        );
        assert_eq!(h.not_active_reason(), Some("halted"));
        assert_eq!(value(r#"walrelay_halted{reason="poison_row"}"#), 1);
        assert_eq!(value("walrelay_halted"), 1, "one reason at 1");
        // Nothing un-halts it but a restart.
        m.set_role(Role::Active);
        assert_eq!(h.role(), Role::Halted);
        assert_eq!(
            (value("walrelay_active"), value("walrelay_standby")),
            (0, 0)
        );
        // Halted is a role: live.
        assert_eq!(h.not_live_reason(), None);
    }

    /// The value of the series `name` in `text` (summed over its labels when
    /// `name` has none).
    pub(super) fn value(text: &str, name: &str) -> i64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(series, _)| {
                *series == name
                    || (!name.contains('{')
                        && series
                            .strip_prefix(name)
                            .is_some_and(|r| r.starts_with('{')))
            })
            .map(|(_, v)| v.parse::<i64>().unwrap())
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipeline_silent_past_the_stall_limit_is_not_live_unless_it_waits_on_purpose() {
        let h = Arc::new(Health::default());
        h.set_stall_limit(Duration::from_secs(60));
        h.beat();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(h.not_live_reason(), None);
        // Silent past the limit: wedged.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let why = h.not_live_reason().expect("wedged");
        assert!(
            why.contains("neither made progress nor waited on purpose for 61.0s"),
            "{why}"
        );
        // A wait on purpose, however long, beats the pulse.
        let waiter = Arc::clone(&h);
        let wait = tokio::spawn(async move {
            beating(&waiter, tokio::time::sleep(Duration::from_secs(600))).await;
        });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(h.not_live_reason(), None);
        wait.await.unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(h.not_live_reason().is_some());
        // Draining after SIGTERM is bounded by --shutdown-timeout by itself.
        h.set_stopping();
        assert_eq!(h.not_live_reason(), None);
    }

    #[tokio::test]
    async fn the_probes_answer_by_role() {
        let (addr, metrics, _stop, _server) = start(HttpLimits::default()).await;
        let status = |path: &'static str| async move { get_path(addr, path).await.unwrap() };
        assert!(status("/healthz").await.contains(" 200 "));
        assert!(status("/readyz").await.contains(" 503 "));
        assert!(status("/active").await.contains(" 503 "));
        metrics.set_role(Role::Standby);
        assert!(status("/readyz").await.contains(" 200 "));
        assert!(status("/active").await.contains(" 503 "));
        metrics.health().set_broker_up(true);
        metrics.set_role(Role::Active);
        assert!(status("/readyz").await.contains(" 200 "));
        assert!(status("/active").await.contains(" 200 "));
        metrics.halt("slot_vanished", "dropped");
        assert!(status("/healthz").await.contains(" 200 "));
        assert!(status("/readyz").await.contains(" 503 "));
        assert!(status("/active").await.contains(" 503 "));
    }

    #[tokio::test]
    async fn a_request_waiting_half_the_timeout_makes_the_instance_not_ready() {
        let m = Metrics::new();
        let h = m.health();
        m.set_role(Role::Active);
        h.set_broker_up(true);
        h.set_request_timeout(Duration::from_secs(2));
        let limit = crate::pg::request::RequestLimit {
            timeout: Duration::from_secs(2),
            waiting: Some(h.requests()),
        };
        let stuck = limit.run("SELECT pg_sleep(3600)", std::future::pending::<()>());
        tokio::pin!(stuck);
        // Waiting, but not yet for half the timeout: still ready.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut stuck)
                .await
                .is_err()
        );
        assert_eq!(h.not_ready_reason(), None);
        // Past half the timeout: not ready, naming the request (it stays
        // listed until polled again, however late this check runs).
        assert!(
            tokio::time::timeout(Duration::from_millis(1100), &mut stuck)
                .await
                .is_err()
        );
        let reason = h
            .not_ready_reason()
            .expect("not ready while a request is stuck");
        assert!(
            reason.contains("has not answered `SELECT pg_sleep(3600)`"),
            "{reason}"
        );
        // Named while starting too, where the start-up checks get stuck.
        m.set_role(Role::Starting);
        let reason = h.not_ready_reason().unwrap();
        assert!(reason.contains("has not answered"), "{reason}");
        m.set_role(Role::Active);
        // Abandoned at the timeout: ready again.
        assert!(stuck.await.is_err());
        assert_eq!(h.not_ready_reason(), None);
    }
}
