//! A model-based simulation of the confirm path.
//!
//! walrelay's own code ([`Ledger`], [`SessionState`]: the watermark, the
//! delivery rules and a session's lifecycle, exactly as the sink and the
//! pipeline use them) runs against a model of everything around it:
//!
//! - PostgreSQL: a WAL of transactions of 0 to 4 events (some of the empty
//!   ones not sent at all, as PostgreSQL 15 does with other tables'
//!   transactions), committed over time; a slot whose `confirmed_flush_lsn`
//!   takes whatever flush a status update carries (as servers before 15.12
//!   do); sessions that resume at the slot, first send a keepalive at that
//!   position, replay every transaction whose commit starts at or after it,
//!   and send keepalives between and inside transactions;
//! - librdkafka and the broker: a queue per partition, written in order
//!   (idempotence), delivery reports handed back in any order (often the
//!   newest first, so some come very late), refusals for good by the broker,
//!   by the producer, or of a row that is no event (with `--on-poison halt`
//!   the producer stops writing at once, as `enable.gapless.guarantee` makes
//!   it), refusals of an event's delivery rather than of the record (a
//!   partition out of reach past a message timeout, a topic not authorised:
//!   the partition refuses every event until the cause is gone, and no
//!   dead-letter record may stand in for the valid event), dead-letter
//!   records, purges;
//! - processes: reconnects at any point (inside a transaction too), error
//!   drains that time out after a random part of the work, shutdowns,
//!   crashes, halts, restarts, a second instance that started long ago (an
//!   older start position) and takes over, an instance frozen while another
//!   takes over and coming back with its events still in flight.
//!
//! Each schedule draws its own mix of these steps. After every step the
//! model checks: the slot never moves back; neither the slot nor any
//! process's flush position passes a committed event of which no copy (nor
//! its dead-letter record) reached the broker; the first deliveries of each
//! aggregate are in `seq_nr` order. At the end the causes of refusals are
//! fixed, faults stop and the surviving processes (with whatever reports
//! they still wait for) run until nothing is left: every committed event
//! must have reached the broker, and the slot the end of the WAL.
//!
//! `WALRELAY_SIM_SCHEDULES=n` runs n schedules instead of the default batch
//! (`WALRELAY_SIM_SCHEDULES=10000000 cargo test --test main simulation` for a
//! long run: nextest ends tests after 5 minutes), `WALRELAY_SIM_SEED=s` runs
//! schedule s alone. A failure prints the seed, the model's WAL and the
//! steps taken; seeds that ever failed are kept in `regressions.txt` and run
//! first.
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Instant;

use walrelay::confirm::{Action, Ledger, OnRefusal, PublishFailure, Record, Report, SessionState};
use walrelay::pg::conn::Feedback;
use walrelay::pg::lsn::Lsn;

/// The batch an ordinary test run checks.
const DEFAULT_SCHEDULES: u64 = 100_000;
/// The first seed of the batch.
const BASE_SEED: u64 = 0x5EED_0000;
/// Seeds that once failed, run before the batch.
const REGRESSIONS: &str = include_str!("regressions.txt");

const AGGREGATES: usize = 3;
const PARTITIONS: usize = 2;
/// The dead-letter topic's queue.
const DEAD_LETTER_QUEUE: usize = PARTITIONS;

/// Where the slot starts, before the first transaction.
const ORIGIN: Lsn = Lsn(500);

fn commit_lsn(txn: usize) -> Lsn {
    Lsn(1000 * (txn as u64 + 1))
}

fn end_lsn(txn: usize) -> Lsn {
    Lsn(1000 * (txn as u64 + 1) + 10)
}

/// The WAL position a keepalive reports once transaction `txn` was decoded:
/// past its end, before the next one's commit.
fn after(txn: usize) -> Lsn {
    Lsn(1000 * (txn as u64 + 1) + 50)
}

/// Why the broker or walrelay refuses an event, for good, until cured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poison {
    /// The broker refuses it (too large, not authorised).
    Broker,
    /// The producer refuses it when handed over (larger than message.max.bytes).
    Producer,
    /// The row cannot become an event (not JSON, NULL key).
    Row,
    /// The broker refuses its delivery, not the record: the topic is not
    /// authorised, or its partition was out of reach for longer than a
    /// message timeout. Every event of its partition is refused from then on
    /// until the cause is gone. The event is valid: no dead-letter record may stand in
    /// for it, and it must reach the topic once the cause is gone.
    Delivery,
}

impl Poison {
    /// Whether a dead-letter record may stand in for the event.
    fn about_the_record(self) -> bool {
        self != Poison::Delivery
    }
}

#[derive(Debug)]
struct Event {
    aggregate: usize,
    seq: u32,
    poison: Option<Poison>,
}

#[derive(Debug)]
struct Txn {
    /// Indexes into the events.
    events: Vec<usize>,
    /// No event of the table, and not sent at all (PostgreSQL 15+).
    silent: bool,
}

/// One record in the producer.
#[derive(Debug, Clone, Copy)]
struct Msg {
    txn: u64,
    record: Record,
    event: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    /// Refused for good; `true` when the refusal is about the record.
    Refused(bool),
    Purged,
}

/// librdkafka and the broker, for one process.
#[derive(Debug, Default)]
struct Producer {
    /// One per partition, then the dead-letter topic's.
    queues: [VecDeque<Msg>; PARTITIONS + 1],
    /// Delivery reports waiting for the polling thread, handed over in any order.
    reports: Vec<(Msg, Outcome)>,
    /// A refusal with gap-less guarantee: nothing more is sent.
    stopped: bool,
}

impl Producer {
    fn queued(&self) -> bool {
        self.queues.iter().any(|q| !q.is_empty())
    }

    fn purge(&mut self) {
        for queue in &mut self.queues {
            self.reports
                .extend(queue.drain(..).map(|m| (m, Outcome::Purged)));
        }
    }
}

/// Where a session's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// The keepalive the server sends first, at the start position.
    Hello,
    Begin(usize),
    Event(usize, usize),
    Commit(usize),
}

#[derive(Debug)]
struct Session {
    state: SessionState,
    at: At,
    /// The slot's position when it started.
    start: Lsn,
    /// The last transaction the server decoded in this session.
    passed: Option<usize>,
    /// The server still serves it (a frozen process loses it).
    live: bool,
}

#[derive(Debug)]
struct Process {
    id: u32,
    ledger: Ledger,
    producer: Producer,
    session: Option<Session>,
    frozen: bool,
    halted: bool,
    /// Halted by a refusal the broker reported: what is held gets purged.
    purge: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The connection broke: reconnect, no final status update.
    Broken,
    /// SIGTERM: drain, final status update, exit.
    Shutdown,
    /// A refusal or bad row halted it: purge, drain, final update, exit 1.
    Halt,
}

/// One step of a schedule, for the trace (read through `Debug` only).
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
enum Step {
    Commit,
    Stream(u32),
    Keepalive(u32),
    Write(u32, usize),
    Report(u32, usize),
    Status(u32),
    Start(u32),
    End(u32, End),
    Crash(u32),
    Spawn(u32, Lsn),
    Freeze(u32),
    Thaw(u32),
    Replay,
}

/// The kinds of steps, and the range each one's weight is drawn from per
/// schedule (some schedules reconnect a lot, others hardly ever).
const KINDS: usize = 12;
const COMMIT: usize = 0;
const STREAM: usize = 1;
const KEEPALIVE: usize = 2;
const WORK: usize = 3;
const STATUS: usize = 4;
const START: usize = 5;
const RECONNECT: usize = 6;
const SHUTDOWN: usize = 7;
const CRASH: usize = 8;
const SPAWN: usize = 9;
const FREEZE: usize = 10;
const THAW: usize = 11;
const WEIGHTS: [(u32, u32); KINDS] = [
    (2, 10),  // commit
    (10, 40), // stream
    (0, 8),   // keepalive
    (10, 50), // work
    (1, 12),  // status
    (2, 12),  // start
    (1, 12),  // reconnect
    (0, 2),   // shutdown
    (0, 1),   // crash
    (0, 4),   // spawn
    (0, 2),   // freeze
    (0, 3),   // thaw
];

/// What the model found wrong.
type Violation = String;

/// How often a batch met the situations the simulation exists for.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    /// A session ended inside a transaction after handing events over.
    abandoned: u64,
    /// A report about an abandoned copy came after its session ended.
    late_reports: u64,
    /// An instance that started at an older position took the slot.
    older_takeovers: u64,
    /// A process halted on a refusal.
    halts: u64,
    /// A dead-letter record reached the broker.
    dead_letters: u64,
    /// A purged record's report.
    purged: u64,
    /// A refusal of an event's delivery halted a process in dead-letter mode.
    delivery_halts: u64,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.abandoned += other.abandoned;
        self.late_reports += other.late_reports;
        self.older_takeovers += other.older_takeovers;
        self.halts += other.halts;
        self.dead_letters += other.dead_letters;
        self.purged += other.purged;
        self.delivery_halts += other.delivery_halts;
    }
}

struct World {
    rng: fastrand::Rng,
    mode: OnRefusal,
    /// Partitions of the events topic in use (1 or 2).
    partitions: usize,
    /// Refusals stopped (the operator fixed the cause).
    cured: bool,
    /// Refusals of deliveries stopped (the broker is back, the ACL fixed).
    outage_over: bool,
    /// Partitions that refuse every event until the outage is over, since
    /// one of them was refused for its delivery.
    blocked: [bool; PARTITIONS],
    events: Vec<Event>,
    txns: Vec<Txn>,
    /// Transactions committed so far.
    committed: usize,
    /// The slot's confirmed_flush_lsn.
    slot: Lsn,
    /// Every position the slot had, for instances started long ago.
    slot_history: Vec<Lsn>,
    /// Whether a copy of the event (or its dead-letter record) reached the broker.
    delivered: Vec<bool>,
    /// Per transaction, events not delivered yet.
    undelivered: Vec<usize>,
    /// The first transaction with an undelivered event.
    frontier: usize,
    /// Per aggregate, the seq_nr of the last first delivery.
    last_first: [u32; AGGREGATES],
    procs: Vec<Process>,
    next_id: u32,
    trace: Vec<Step>,
    /// Copies abandoned with events handed over: (process, transaction).
    abandoned: Vec<(u32, u64)>,
    coverage: Coverage,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mode = if rng.bool() {
            OnRefusal::Halt
        } else {
            OnRefusal::DeadLetter
        };
        let poisonous = rng.u8(0..4) == 0;
        let mut events = Vec::new();
        let mut txns = Vec::new();
        let mut seqs = [0u32; AGGREGATES];
        for _ in 0..rng.usize(1..=7) {
            let count = [0, 0, 1, 2, 2, 3, 4][rng.usize(0..7)];
            let mut ids = Vec::new();
            for _ in 0..count {
                let aggregate = rng.usize(0..AGGREGATES);
                seqs[aggregate] += 1;
                let poison = (poisonous && rng.u8(0..6) == 0)
                    .then(|| [Poison::Broker, Poison::Producer, Poison::Row][rng.usize(0..3)]);
                ids.push(events.len());
                events.push(Event {
                    aggregate,
                    seq: seqs[aggregate],
                    poison,
                });
            }
            let silent = ids.is_empty() && rng.bool();
            txns.push(Txn {
                events: ids,
                silent,
            });
        }
        let undelivered = txns.iter().map(|t| t.events.len()).collect();
        // Some of the events the broker refuses are refused for their
        // delivery rather than for themselves; drawn apart, so that the
        // schedules of seeds without such refusals stay what they were.
        let mut outages = fastrand::Rng::with_seed(!seed);
        for event in &mut events {
            if event.poison == Some(Poison::Broker) && outages.bool() {
                event.poison = Some(Poison::Delivery);
            }
        }
        let partitions = rng.usize(1..=PARTITIONS);
        let mut world = World {
            rng,
            mode,
            partitions,
            cured: false,
            outage_over: false,
            blocked: [false; PARTITIONS],
            delivered: vec![false; events.len()],
            events,
            txns,
            committed: 0,
            slot: ORIGIN,
            slot_history: vec![ORIGIN],
            undelivered,
            frontier: 0,
            last_first: [0; AGGREGATES],
            procs: Vec::new(),
            next_id: 0,
            trace: Vec::new(),
            abandoned: Vec::new(),
            coverage: Coverage::default(),
        };
        world.advance_frontier();
        // Some of the WAL may be written before walrelay starts.
        world.committed = world.rng.usize(0..=world.txns.len());
        world.spawn(ORIGIN);
        world
    }

    fn spawn(&mut self, start: Lsn) {
        let id = self.next_id;
        self.next_id += 1;
        self.trace.push(Step::Spawn(id, start));
        self.procs.push(Process {
            id,
            ledger: Ledger::new(start, Feedback::new(start), self.mode),
            producer: Producer::default(),
            session: None,
            frozen: false,
            halted: false,
            purge: false,
        });
    }

    fn refusing(&self, event: usize, how: Poison) -> bool {
        let cured = if how == Poison::Delivery {
            self.outage_over
        } else {
            self.cured
        };
        !cured && self.events[event].poison == Some(how)
    }

    /// The failure a refusal of `event` reports; `about_the_record`: the
    /// record is refused, not its delivery.
    fn failure(&self, event: usize, about_the_record: bool) -> PublishFailure {
        let e = &self.events[event];
        PublishFailure {
            aggregate: format!("a{}", e.aggregate),
            seq_nr: e.seq.to_string(),
            lsn: "?".into(),
            topic: "events".into(),
            kind: if about_the_record {
                "refused"
            } else {
                "timed_out"
            },
            reason: "refused for good".into(),
            record_at_fault: about_the_record,
        }
    }

    fn holder(&self) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| p.session.as_ref().is_some_and(|s| s.live))
    }

    fn advance_frontier(&mut self) {
        while self.frontier < self.txns.len() && self.undelivered[self.frontier] == 0 {
            self.frontier += 1;
        }
    }

    /// The highest position that may be confirmed: the commit of the first
    /// transaction with an event that never reached the broker.
    fn bound(&self) -> Lsn {
        if self.frontier < self.txns.len() {
            commit_lsn(self.frontier)
        } else {
            Lsn(u64::MAX)
        }
    }

    /// The broker took a copy of `event` (or its dead-letter record).
    fn delivered(&mut self, event: usize, main_topic: bool) -> Result<(), Violation> {
        if main_topic {
            let e = &self.events[event];
            let first = !self.delivered[event];
            if first {
                if e.seq <= self.last_first[e.aggregate] {
                    return Err(format!(
                        "first deliveries out of seq_nr order: aggregate {} seq_nr {} after {}",
                        e.aggregate, e.seq, self.last_first[e.aggregate]
                    ));
                }
                self.last_first[e.aggregate] = e.seq;
            }
        }
        if !self.delivered[event] {
            self.delivered[event] = true;
            let txn = self
                .txns
                .iter()
                .position(|t| t.events.contains(&event))
                .expect("every event belongs to a transaction");
            self.undelivered[txn] -= 1;
            self.advance_frontier();
        }
        Ok(())
    }

    /// The checks after every step.
    fn check(&self) -> Result<(), Violation> {
        let bound = self.bound();
        if self.slot > bound {
            return Err(format!(
                "the slot is at {} past transaction {} (commit {bound}) whose events did not all reach the broker",
                self.slot, self.frontier
            ));
        }
        for p in &self.procs {
            let flush = p.ledger.feedback().confirmed();
            if flush > bound {
                return Err(format!(
                    "process {} would confirm {flush} past transaction {} (commit {bound}) whose events did not all reach the broker",
                    p.id, self.frontier
                ));
            }
        }
        Ok(())
    }

    /// A status update from the slot's holder: the slot takes its flush.
    fn status(&mut self, p: usize) -> Result<(), Violation> {
        let flush = self.procs[p].ledger.feedback().confirmed();
        if flush < self.slot {
            return Err(format!(
                "process {} sent flush {flush} below the slot's {}: the slot moved back",
                self.procs[p].id, self.slot
            ));
        }
        self.slot = flush;
        if self.slot_history.last() != Some(&flush) {
            self.slot_history.push(flush);
        }
        Ok(())
    }

    fn start(&mut self, p: usize) {
        let slot = self.slot;
        let proc = &mut self.procs[p];
        if proc.ledger.confirmed() < slot {
            self.coverage.older_takeovers += 1;
        }
        let (state, _) = SessionState::start(&mut proc.ledger, slot);
        proc.session = Some(Session {
            state,
            at: At::Hello,
            start: slot,
            passed: None,
            live: true,
        });
    }

    /// The server sends the next message of the holder's stream.
    fn stream(&mut self, p: usize) -> Result<(), Violation> {
        if self.procs[p].halted {
            return self.end(p, End::Halt);
        }
        let Some(at) = self.procs[p].session.as_ref().map(|s| s.at) else {
            return Ok(());
        };
        let committed = self.committed;
        let txns = self.txns.len();
        match at {
            At::Hello => {
                let proc = &mut self.procs[p];
                let session = proc.session.as_mut().expect("checked");
                let start = session.start;
                let first = (0..txns).find(|&t| commit_lsn(t) >= start).unwrap_or(txns);
                session.state.keepalive(&mut proc.ledger, start);
                // The server read past what comes before the start point.
                session.passed = first.checked_sub(1);
                session.at = At::Begin(first);
            }
            At::Begin(t) if t < committed => {
                let silent = self.txns[t].silent;
                let empty = self.txns[t].events.is_empty();
                let proc = &mut self.procs[p];
                let session = proc.session.as_mut().expect("checked");
                if silent {
                    session.passed = Some(t);
                    session.at = At::Begin(t + 1);
                } else {
                    session.state.begin(&mut proc.ledger, 0);
                    session.at = if empty {
                        At::Commit(t)
                    } else {
                        At::Event(t, 0)
                    };
                }
            }
            At::Begin(_) => {}
            At::Event(t, i) => {
                let event = self.txns[t].events[i];
                let next = if i + 1 < self.txns[t].events.len() {
                    At::Event(t, i + 1)
                } else {
                    At::Commit(t)
                };
                if self.produce(p, event)? {
                    if let Some(session) = self.procs[p].session.as_mut() {
                        session.at = next;
                    }
                }
            }
            At::Commit(t) => {
                let proc = &mut self.procs[p];
                let session = proc.session.as_mut().expect("checked");
                session.state.commit(&mut proc.ledger, end_lsn(t));
                session.passed = Some(t);
                session.at = At::Begin(t + 1);
            }
        }
        Ok(())
    }

    /// The session hands `event` to the producer as the pipeline does;
    /// returns whether the session goes on.
    fn produce(&mut self, p: usize, event: usize) -> Result<bool, Violation> {
        let partition = self.events[event].aggregate % self.partitions;
        let row = self.refusing(event, Poison::Row);
        if row && self.mode == OnRefusal::Halt {
            // --on-poison halt: the row stops the session before anything
            // after it is produced.
            self.end(p, End::Halt)?;
            return Ok(false);
        }
        let failure = self
            .refusing(event, Poison::Producer)
            .then(|| self.failure(event, true));
        let proc = &mut self.procs[p];
        let session = proc.session.as_mut().expect("streaming");
        let txn = session
            .state
            .event(&mut proc.ledger)
            .expect("inside a transaction");
        let target = if row {
            // --on-poison dead-letter: a record describing the row instead.
            Some((DEAD_LETTER_QUEUE, Record::DeadLetter))
        } else if let Some(failure) = failure {
            match proc.ledger.refused(txn, Record::Event, failure) {
                Action::DeadLetter(_) => Some((DEAD_LETTER_QUEUE, Record::DeadLetter)),
                Action::Nothing => None,
                Action::Halt => {
                    // Refused at hand-over: nothing is behind it, nothing purged.
                    self.halt(p, false);
                    self.end(p, End::Halt)?;
                    return Ok(false);
                }
            }
        } else {
            Some((partition, Record::Event))
        };
        let proc = &mut self.procs[p];
        if let Some((queue, record)) = target {
            proc.producer.queues[queue].push_back(Msg { txn, record, event });
        }
        if let Some(session) = proc.session.as_mut() {
            session.state.sent();
        }
        Ok(true)
    }

    /// A keepalive to the holder: between transactions at the position the
    /// server decoded to; inside one, past the open transaction's end.
    fn keepalive(&mut self, p: usize) {
        let proc = &mut self.procs[p];
        let Some(session) = proc.session.as_mut() else {
            return;
        };
        let wal_end = match session.at {
            At::Hello => return,
            At::Begin(_) => session
                .passed
                .map_or(session.start, after)
                .max(session.start),
            At::Event(t, _) | At::Commit(t) => after(t),
        };
        session.state.keepalive(&mut proc.ledger, wal_end);
    }

    /// The broker takes (or refuses) the head of a queue of process `p`.
    fn write(&mut self, p: usize, queue: usize) -> Result<(), Violation> {
        let proc = &mut self.procs[p];
        if proc.producer.stopped {
            return Ok(());
        }
        let Some(msg) = proc.producer.queues[queue].pop_front() else {
            return Ok(());
        };
        let refused = msg.record == Record::Event && self.refusing(msg.event, Poison::Broker);
        let outage = msg.record == Record::Event
            && (self.refusing(msg.event, Poison::Delivery)
                || (!self.outage_over && self.blocked[queue]));
        if msg.record == Record::DeadLetter
            && !self.events[msg.event]
                .poison
                .is_some_and(Poison::about_the_record)
        {
            return Err(format!(
                "event {} ({:?}), refused only for its delivery, was replaced by a dead-letter \
                 record: it never reaches the topic",
                msg.event, self.events[msg.event]
            ));
        }
        let proc = &mut self.procs[p];
        if refused {
            proc.producer.reports.push((msg, Outcome::Refused(true)));
            // With --on-poison halt, enable.gapless.guarantee makes the
            // refusal a fatal error: nothing more leaves the producer.
            proc.producer.stopped = self.mode == OnRefusal::Halt;
            return Ok(());
        }
        if outage {
            // Nothing of the partition gets through while the cause lasts.
            proc.producer.reports.push((msg, Outcome::Refused(false)));
            proc.producer.stopped = self.mode == OnRefusal::Halt;
            self.blocked[queue] = true;
            return Ok(());
        }
        proc.producer.reports.push((msg, Outcome::Acked));
        self.coverage.dead_letters += u64::from(msg.record == Record::DeadLetter);
        self.delivered(msg.event, msg.record == Record::Event)
    }

    /// The polling thread hands delivery report `index` of process `p` to
    /// the sink's logic.
    fn report(&mut self, p: usize, index: usize) {
        let (msg, outcome) = self.procs[p].producer.reports.remove(index);
        if self.abandoned.contains(&(self.procs[p].id, msg.txn)) {
            self.coverage.late_reports += 1;
        }
        self.coverage.purged += u64::from(outcome == Outcome::Purged);
        let report = match outcome {
            Outcome::Acked => Report::Acked,
            Outcome::Refused(about_the_record) => {
                Report::Refused(self.failure(msg.event, about_the_record))
            }
            Outcome::Purged => Report::Purged,
        };
        let proc = &mut self.procs[p];
        match proc.ledger.delivered(msg.txn, msg.record, report).action {
            Action::Nothing => {}
            Action::DeadLetter(_) => proc.producer.queues[DEAD_LETTER_QUEUE].push_back(Msg {
                record: Record::DeadLetter,
                ..msg
            }),
            Action::Halt => {
                let delivery = outcome == Outcome::Refused(false);
                self.coverage.delivery_halts +=
                    u64::from(delivery && self.mode == OnRefusal::DeadLetter && !proc.halted);
                self.halt(p, true);
            }
        }
    }

    /// The sink halts: nothing more is enqueued, and after a refusal the
    /// broker reported, what the producer holds is purged.
    fn halt(&mut self, p: usize, purge: bool) {
        self.coverage.halts += u64::from(!self.procs[p].halted);
        let proc = &mut self.procs[p];
        proc.halted = true;
        proc.purge |= purge;
        if proc.purge {
            proc.producer.purge();
        }
    }

    /// Lets librdkafka work for process `p`: a write or a report.
    fn work(&mut self, p: usize) -> Result<bool, Violation> {
        let producer = &self.procs[p].producer;
        let can_write = !producer.stopped && producer.queued();
        let can_report = !producer.reports.is_empty();
        if can_write && (!can_report || self.rng.bool()) {
            let queues: Vec<usize> = (0..=PARTITIONS)
                .filter(|&q| !self.procs[p].producer.queues[q].is_empty())
                .collect();
            let queue = queues[self.rng.usize(0..queues.len())];
            self.trace.push(Step::Write(self.procs[p].id, queue));
            self.write(p, queue)?;
            Ok(true)
        } else if can_report {
            // Any order; often the newest first, so that some reports come
            // very late (after a reconnect, a replay, a takeover).
            let pending = self.procs[p].producer.reports.len();
            let index = if self.rng.bool() {
                pending - 1
            } else {
                self.rng.usize(0..pending)
            };
            self.trace.push(Step::Report(self.procs[p].id, index));
            self.report(p, index);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// The session of process `p` ends as the pipeline ends it: the open
    /// transaction abandoned, a purge after a halt, a drain that may time
    /// out, a final status update when the connection still works; then the
    /// process goes on (a reconnect) or exits.
    fn end(&mut self, p: usize, how: End) -> Result<(), Violation> {
        self.trace.push(Step::End(self.procs[p].id, how));
        let proc = &mut self.procs[p];
        let Some(session) = proc.session.take() else {
            return Ok(());
        };
        let live = session.live;
        if let Some(txn) = session.state.open_txn() {
            self.abandoned.push((proc.id, txn));
            self.coverage.abandoned += 1;
        }
        session.state.end(&mut proc.ledger);
        if proc.purge {
            proc.producer.purge();
        }
        // The drain times out after some of the work, often little of it.
        let budget = if self.rng.bool() {
            self.rng.usize(0..3)
        } else {
            self.rng.usize(0..24)
        };
        for _ in 0..budget {
            if !self.work(p)? {
                break;
            }
            self.check()?;
        }
        let final_update = match how {
            End::Broken => live && self.rng.bool(),
            End::Shutdown | End::Halt => live,
        };
        if final_update {
            self.status(p)?;
        }
        if how != End::Broken {
            self.procs.remove(p);
        }
        Ok(())
    }

    /// One random step, of a kind drawn by the schedule's weights.
    fn step(&mut self, weights: &[u32; KINDS]) -> Result<(), Violation> {
        let total: u32 = weights.iter().sum();
        let mut pick = self.rng.u32(0..total);
        let kind = weights
            .iter()
            .position(|&w| {
                if pick < w {
                    return true;
                }
                pick -= w;
                false
            })
            .expect("pick < total");
        let holder = self.holder().filter(|&h| !self.procs[h].frozen);
        let n = self.procs.len();
        let p = self.rng.usize(0..n.max(1));
        let idle = n == 0 || self.procs[p].frozen;
        match kind {
            COMMIT if self.committed < self.txns.len() => {
                self.trace.push(Step::Commit);
                self.committed += 1;
            }
            STREAM => {
                if let Some(h) = holder {
                    self.trace.push(Step::Stream(self.procs[h].id));
                    self.stream(h)?;
                }
            }
            KEEPALIVE => {
                if let Some(h) = holder {
                    self.trace.push(Step::Keepalive(self.procs[h].id));
                    self.keepalive(h);
                }
            }
            WORK if !idle => {
                self.work(p)?;
            }
            STATUS => {
                if let Some(h) = holder {
                    self.trace.push(Step::Status(self.procs[h].id));
                    self.status(h)?;
                }
            }
            START if !idle => {
                let proc = &self.procs[p];
                let live = proc.session.as_ref().map(|s| s.live);
                match (live, proc.halted) {
                    (None, halted) if self.holder().is_none() => {
                        self.trace.push(Step::Start(proc.id));
                        self.start(p);
                        // A halted process halts as soon as it streams.
                        if halted {
                            self.end(p, End::Halt)?;
                        }
                    }
                    // The process noticed its connection is gone.
                    (Some(false), _) => self.end(p, End::Broken)?,
                    (Some(true), true) => self.end(p, End::Halt)?,
                    _ => {}
                }
            }
            RECONNECT => {
                if let Some(h) = holder {
                    self.end(h, End::Broken)?;
                }
            }
            SHUTDOWN => {
                if let Some(h) = holder {
                    self.end(h, End::Shutdown)?;
                }
            }
            CRASH if n > 0 => {
                self.trace.push(Step::Crash(self.procs[p].id));
                self.procs.remove(p);
            }
            SPAWN if n < 2 => {
                // An instance starting now, or one that started long ago
                // and stood by since.
                let start = if self.rng.bool() {
                    self.slot
                } else {
                    self.slot_history[self.rng.usize(0..self.slot_history.len())]
                };
                self.spawn(start);
            }
            FREEZE => {
                // The holder freezes; the server drops its connection.
                if let Some(h) = holder {
                    self.trace.push(Step::Freeze(self.procs[h].id));
                    self.procs[h].frozen = true;
                    if let Some(s) = self.procs[h].session.as_mut() {
                        s.live = false;
                    }
                }
            }
            THAW if n > 0 && self.procs[p].frozen => {
                self.trace.push(Step::Thaw(self.procs[p].id));
                self.procs[p].frozen = false;
            }
            _ => {}
        }
        self.check()
    }

    /// After the schedule: the causes of refusals are fixed (a refused
    /// event that was dead-lettered stays so), everything commits, faults
    /// stop, and the processes that survived (with whatever reports they
    /// still wait for) run until nothing is left to do, the slot's holder
    /// replaying whatever is not confirmed.
    fn replay_everything(&mut self) -> Result<(), Violation> {
        self.trace.push(Step::Replay);
        self.cured = self.mode == OnRefusal::Halt;
        self.committed = self.txns.len();
        for proc in &mut self.procs {
            proc.frozen = false;
        }
        let end = after(self.txns.len() - 1);
        for _ in 0..20_000 {
            // The delivery refusals end once every process that met one
            // knows: an authorisation or an unknown partition is fixed by an
            // operator long after walrelay halted on it (and timeouts are
            // refused by the configuration), not in the milliseconds between
            // the refusal and its report.
            self.outage_over |= self.procs.iter().all(|p| {
                !p.producer
                    .reports
                    .iter()
                    .any(|(_, o)| *o == Outcome::Refused(false))
            });
            if self.procs.is_empty() {
                self.spawn(self.slot);
            }
            // Sessions the server dropped end; a halted process exits.
            if let Some(p) = self.procs.iter().position(|p| {
                p.session.as_ref().is_some_and(|s| !s.live) || (p.halted && p.session.is_some())
            }) {
                let how = if self.procs[p].halted {
                    End::Halt
                } else {
                    End::Broken
                };
                self.end(p, how)?;
                self.check()?;
                continue;
            }
            let Some(h) = self.holder() else {
                let p = self.rng.usize(0..self.procs.len());
                self.trace.push(Step::Start(self.procs[p].id));
                self.start(p);
                continue;
            };
            let streaming = self.procs[h]
                .session
                .as_ref()
                .is_some_and(|s| s.at != At::Begin(self.txns.len()));
            let busy: Vec<usize> = (0..self.procs.len())
                .filter(|&p| {
                    let producer = &self.procs[p].producer;
                    (producer.queued() && !producer.stopped) || !producer.reports.is_empty()
                })
                .collect();
            if streaming && (busy.is_empty() || self.rng.bool()) {
                self.trace.push(Step::Stream(self.procs[h].id));
                self.stream(h)?;
            } else if !busy.is_empty() {
                let p = busy[self.rng.usize(0..busy.len())];
                self.work(p)?;
            } else {
                // Nothing left to stream or to deliver: the last keepalive
                // and status update.
                self.trace.push(Step::Keepalive(self.procs[h].id));
                self.keepalive(h);
                self.trace.push(Step::Status(self.procs[h].id));
                self.status(h)?;
                break;
            }
            self.check()?;
        }
        if let Some(missing) = self.delivered.iter().position(|d| !d) {
            return Err(format!(
                "event {missing} ({:?}) never reached the broker",
                self.events[missing]
            ));
        }
        if self.slot != end {
            return Err(format!(
                "after replaying everything the slot is at {}, not at the end of the WAL {end}",
                self.slot
            ));
        }
        Ok(())
    }
}

/// Runs schedule `seed`; on a violation, returns it with the steps taken.
fn run(seed: u64) -> Result<Coverage, String> {
    let mut world = World::new(seed);
    let steps = world.rng.usize(10..300);
    let weights = WEIGHTS.map(|(low, high)| world.rng.u32(low..=high));
    let weights = if weights.iter().sum::<u32>() == 0 {
        WEIGHTS.map(|(_, high)| high)
    } else {
        weights
    };
    let result = (0..steps)
        .try_for_each(|_| world.step(&weights))
        .and_then(|()| world.replay_everything());
    match result {
        Ok(()) => Ok(world.coverage),
        Err(violation) => {
            let mut text = format!(
                "schedule {seed} ({:?}, {} transactions, events {:?}, WAL {:?}): {violation}\nsteps:",
                world.mode,
                world.txns.len(),
                world.events,
                world.txns
            );
            for step in &world.trace {
                let _ = write!(text, "\n  {step:?}");
            }
            Err(text)
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[test]
fn the_confirm_path_holds_its_invariants_under_random_schedules() {
    if let Some(seed) = env_u64("WALRELAY_SIM_SEED") {
        match run(seed) {
            Ok(coverage) => println!("schedule {seed} holds: {coverage:?}"),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    let regressions = REGRESSIONS
        .lines()
        .filter_map(|line| line.split('#').next())
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|seed| seed.parse::<u64>().expect("a seed per line"));
    for seed in regressions {
        if let Err(failure) = run(seed) {
            panic!("regression {failure}");
        }
    }
    let schedules = env_u64("WALRELAY_SIM_SCHEDULES").unwrap_or(DEFAULT_SCHEDULES);
    let started = Instant::now();
    let mut coverage = Coverage::default();
    for seed in BASE_SEED..BASE_SEED + schedules {
        match run(seed) {
            Ok(covered) => coverage.add(covered),
            Err(failure) => panic!(
                "{failure}\n\nReproduce with WALRELAY_SIM_SEED={seed}; keep the seed in tests/simulation/regressions.txt"
            ),
        }
    }
    println!(
        "{schedules} schedules in {:?}: {coverage:?}",
        started.elapsed()
    );
    // Each situation came up often enough for the batch to mean something.
    if schedules >= DEFAULT_SCHEDULES {
        let least = schedules / 1000;
        for (what, count) in [
            ("abandoned transactions", coverage.abandoned),
            ("late reports of abandoned copies", coverage.late_reports),
            ("takeovers from an older position", coverage.older_takeovers),
            ("halts", coverage.halts),
            ("dead-letter records", coverage.dead_letters),
            ("purged records", coverage.purged),
            (
                "halts on a delivery refusal with --on-poison dead-letter",
                coverage.delivery_halts,
            ),
        ] {
            assert!(
                count >= least,
                "only {count} {what} in {schedules} schedules"
            );
        }
    }
}
