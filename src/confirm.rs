//! The confirm path: what a replication session and the broker's delivery
//! reports do to the position walrelay confirms to PostgreSQL.
//!
//! ```text
//!  replication session                        delivery reports (librdkafka's thread)
//!  SessionState::start ── raise to the slot     Ledger::delivered(txn, record, report)
//!  begin / event / sent / commit / keepalive        │ Acked      → counts toward txn
//!  end (abandons the open transaction)              │ Refused    → dead-letter or halt
//!            │                                      │ Purged     → never counts
//!            ▼                                      ▼
//!          Ledger: Checkpoint (watermark) ──► Feedback (the flush LSN the status updates send)
//! ```
//!
//! Everything that decides what may be confirmed lives here, free of I/O, so
//! that the same code runs under the Kafka producer ([`crate::sink`]), the
//! replication loop ([`crate::pipeline`]) and the model-based simulation in
//! the tests, which drives it through random schedules of acknowledgements,
//! refusals, reconnects, crashes and takeovers.
//!
//! The rules it keeps:
//! - the flush LSN is a commit end whose transaction, and every one before
//!   it, was fully acknowledged; or a keepalive's WAL end with nothing in
//!   flight and outside a transaction; it never moves back, also across
//!   sessions: each session starts by raising it to the slot's
//!   `confirmed_flush_lsn`, read after `START_REPLICATION` (when no other
//!   process can move the slot any more) and before the first status update;
//! - a transaction takes an identity only with its first event, and keeps it
//!   for good: a session that ends inside it abandons it, its replay gets a
//!   new one, and reports about the abandoned copy never count (DESIGN.md,
//!   invariant 9); a transaction without events only moves the confirmable
//!   position;
//! - an event refused for good either halts walrelay (the watermark stays
//!   before it) or is replaced by a dead-letter record of the same
//!   transaction, whose acknowledgement completes it. A refusal of an
//!   abandoned copy is not dead-lettered: the replay meets the same row and
//!   is refused (and dead-lettered) again. Purged records never count.
use crate::checkpoint::{Checkpoint, TxnId};
use crate::pg::conn::Feedback;
use crate::pg::lsn::Lsn;

pub use crate::checkpoint::Advance;

/// What walrelay does with an event refused for good (`--on-poison`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefusal {
    /// Stop without confirming past it.
    Halt,
    /// Publish a record describing it to the dead-letter topic in its place.
    DeadLetter,
}

/// Which kind of walrelay's records a delivery report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A row of the events table.
    Event,
    /// A record describing a refused row, on the dead-letter topic.
    DeadLetter,
}

/// What a delivery report says about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The broker acknowledged it.
    Acked,
    /// The broker or the producer refused it for good.
    Refused(PublishFailure),
    /// walrelay purged it from the producer after a refusal: whether the
    /// broker has it is unknown, so it never counts as acknowledged.
    Purged,
}

/// What the caller must do after a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Nothing,
    /// Publish a dead-letter record describing the failure, as one event of
    /// the same transaction.
    DeadLetter(PublishFailure),
    /// Stop: purge what the producer still holds and end the run; the
    /// watermark stays before the refused event.
    Halt,
}

/// What a delivery report changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The watermark's movement (already reported to the [`Feedback`]).
    pub advance: Advance,
    /// The acknowledged event's commit time (PostgreSQL microseconds), when
    /// it counted.
    pub commit_ts: Option<i64>,
    /// What to do next.
    pub action: Action,
}

/// Why an event was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// The aggregate (the key's text), or `?`.
    pub aggregate: String,
    /// The `seq_nr` header, or `?`.
    pub seq_nr: String,
    /// The commit LSN (the `lsn` header), or `?`.
    pub lsn: String,
    /// The topic.
    pub topic: String,
    /// The metric label: `refused`, `timed_out`, `fatal` or `invalid_row`.
    pub kind: &'static str,
    /// The broker's or producer's error.
    pub reason: String,
    /// Whether the refusal is about this record itself (too large, invalid,
    /// corrupt; a row that is no event), so that a dead-letter record may
    /// take its place. Any other refusal (a timeout, an authorisation
    /// failure, an unknown topic or partition, a fatal producer error) says
    /// nothing wrong about the event: a dead-letter record in its place
    /// would take a valid event off the topic for good, so it halts
    /// whatever `--on-poison` says, and the event is published again after
    /// the restart.
    pub record_at_fault: bool,
}

impl PublishFailure {
    /// Whether it names the event (a fatal producer error does not).
    pub fn names_an_event(&self) -> bool {
        self.aggregate != "?"
    }
}

impl PublishFailure {
    /// A row of `topic` (the template) that cannot become an event, in the
    /// transaction committed at `commit_lsn`.
    pub fn invalid_row(
        aggregate: Option<String>,
        seq_nr: String,
        commit_lsn: Lsn,
        topic: String,
        reason: &crate::event::RowError,
    ) -> Self {
        PublishFailure {
            aggregate: aggregate.unwrap_or_else(|| "?".to_owned()),
            seq_nr,
            lsn: commit_lsn.to_string(),
            topic,
            kind: "invalid_row",
            reason: reason.to_string(),
            record_at_fault: true,
        }
    }
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

/// The watermark, the position reported to PostgreSQL, and the first
/// failure: the state the replication session and the delivery reports share.
#[derive(Debug)]
pub struct Ledger {
    checkpoint: Checkpoint,
    feedback: Feedback,
    on_refusal: OnRefusal,
    failure: Option<PublishFailure>,
}

impl Ledger {
    /// Starts at `confirmed`, the slot's position when the process started;
    /// `feedback` reports what the ledger confirms.
    pub fn new(confirmed: Lsn, feedback: Feedback, on_refusal: OnRefusal) -> Self {
        feedback.confirm(confirmed);
        Ledger {
            checkpoint: Checkpoint::new(confirmed),
            feedback,
            on_refusal,
            failure: None,
        }
    }

    /// The confirmed position.
    pub fn confirmed(&self) -> Lsn {
        self.checkpoint.confirmed()
    }

    /// Transactions with events not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.checkpoint.in_flight()
    }

    /// The positions reported to PostgreSQL.
    pub fn feedback(&self) -> &Feedback {
        &self.feedback
    }

    /// What to do with refused events.
    pub fn on_refusal(&self) -> OnRefusal {
        self.on_refusal
    }

    /// The first failure that halts the run, if any (an event's refusal in
    /// preference to a fatal producer error that names none).
    pub fn failure(&self) -> Option<&PublishFailure> {
        self.failure.as_ref()
    }

    /// A transaction with events began outside a replication session (the
    /// initial snapshot); its records carry the returned ID.
    pub fn begin(&mut self, commit_ts: i64) -> TxnId {
        self.checkpoint.begin(commit_ts)
    }

    /// Transaction `txn` committed at `end_lsn` with `sent` records produced.
    pub fn commit(&mut self, txn: TxnId, sent: u64, end_lsn: Lsn) -> Advance {
        let advance = self.checkpoint.commit(txn, sent, end_lsn);
        self.report(advance)
    }

    /// Whether transaction `txn` and every one before it is fully
    /// acknowledged and confirmed.
    pub fn completed(&self, txn: TxnId) -> bool {
        self.checkpoint.completed(txn)
    }

    /// A delivery report for a record of transaction `txn`.
    pub fn delivered(&mut self, txn: TxnId, record: Record, report: Report) -> Delivered {
        match report {
            Report::Acked => {
                let ack = self.checkpoint.acked(txn);
                Delivered {
                    advance: self.report(ack.advance),
                    commit_ts: ack.commit_ts,
                    action: Action::Nothing,
                }
            }
            Report::Refused(failure) => Delivered {
                advance: Advance::default(),
                commit_ts: None,
                action: self.refused(txn, record, failure),
            },
            Report::Purged => {
                self.checkpoint.poison(txn);
                Delivered {
                    advance: Advance::default(),
                    commit_ts: None,
                    action: Action::Nothing,
                }
            }
        }
    }

    /// A record of transaction `txn` was refused for good, by the broker or
    /// when handed to the producer.
    pub fn refused(&mut self, txn: TxnId, record: Record, failure: PublishFailure) -> Action {
        match (record, self.on_refusal) {
            (Record::Event, OnRefusal::DeadLetter)
                if failure.record_at_fault && self.checkpoint.is_pending(txn) =>
            {
                Action::DeadLetter(failure)
            }
            // An abandoned copy: its replay meets the same row.
            (Record::Event, OnRefusal::DeadLetter) if failure.record_at_fault => Action::Nothing,
            // Halting; a refusal that is not about the record (a timeout, an
            // authorisation failure, ...), which no dead-letter record may
            // replace; or the dead-letter topic refused too.
            _ => {
                self.checkpoint.poison(txn);
                self.record(failure);
                Action::Halt
            }
        }
    }

    /// The producer failed as a whole.
    pub fn fatal(&mut self, failure: PublishFailure) -> Action {
        self.record(failure);
        Action::Halt
    }

    fn record(&mut self, failure: PublishFailure) {
        let replace = self
            .failure
            .as_ref()
            .is_none_or(|first| !first.names_an_event() && failure.names_an_event());
        if replace {
            self.failure = Some(failure);
        }
    }

    /// Reports `advance` to PostgreSQL through the feedback.
    fn report(&self, advance: Advance) -> Advance {
        if let Some(lsn) = advance.confirmed {
            self.feedback.confirm(lsn);
        }
        advance
    }
}

/// The transaction a replication session is receiving, as the confirm path
/// sees it: the session's half of the lifecycle. Create one per session with
/// [`SessionState::start`], feed it the stream's steps, and [`end`] it when
/// the session ends, however it ends.
///
/// [`end`]: SessionState::end
#[derive(Debug)]
pub struct SessionState {
    open: Option<Open>,
}

#[derive(Debug)]
struct Open {
    commit_ts: i64,
    /// Taken with the first event: a transaction without events takes none.
    txn: Option<TxnId>,
    /// Records handed to the producer for it.
    sent: u64,
}

impl SessionState {
    /// A session has started streaming, and the slot's confirmed position,
    /// read after `START_REPLICATION`, is `slot_confirmed`: raise the
    /// watermark and the feedback to it before any status update goes out,
    /// so that a standby that takes over never moves the slot back to where
    /// it was when the standby started.
    pub fn start(ledger: &mut Ledger, slot_confirmed: Lsn) -> (SessionState, Advance) {
        let advance = ledger.checkpoint.raise(slot_confirmed);
        let advance = ledger.report(advance);
        (SessionState { open: None }, advance)
    }

    /// Whether a transaction has begun and not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// The identity of the transaction being received, once it has one
    /// (from its first event on).
    pub fn open_txn(&self) -> Option<TxnId> {
        self.open.as_ref().and_then(|open| open.txn)
    }

    /// A transaction began (pgoutput's Begin).
    pub fn begin(&mut self, ledger: &mut Ledger, commit_ts: i64) -> Advance {
        // A Begin inside a transaction never comes from pgoutput; should it,
        // the unfinished one is given up rather than merged.
        let advance = self.abandon(ledger);
        self.open = Some(Open {
            commit_ts,
            txn: None,
            sent: 0,
        });
        advance
    }

    /// The transaction to produce the next event (or dead-letter record) of
    /// the open transaction with; `None` outside a transaction. Call
    /// [`sent`](Self::sent) once the producer took the record.
    pub fn event(&mut self, ledger: &mut Ledger) -> Option<TxnId> {
        let open = self.open.as_mut()?;
        Some(
            *open
                .txn
                .get_or_insert_with(|| ledger.checkpoint.begin(open.commit_ts)),
        )
    }

    /// The producer took one more record of the open transaction.
    pub fn sent(&mut self) {
        if let Some(open) = self.open.as_mut() {
            open.sent += 1;
        }
    }

    /// The open transaction committed at `end_lsn` (pgoutput's Commit).
    pub fn commit(&mut self, ledger: &mut Ledger, end_lsn: Lsn) -> Advance {
        let advance = match self.open.take() {
            Some(Open {
                txn: Some(txn),
                sent,
                ..
            }) => ledger.checkpoint.commit(txn, sent, end_lsn),
            Some(Open { txn: None, .. }) => ledger.checkpoint.commit_empty(end_lsn),
            None => Advance::default(),
        };
        ledger.report(advance)
    }

    /// A keepalive reported the server's WAL end. Outside a transaction and
    /// with nothing in flight, it may be confirmed; inside one it says
    /// nothing about what was handled.
    pub fn keepalive(&self, ledger: &mut Ledger, wal_end: Lsn) -> Advance {
        if self.open.is_some() {
            return Advance::default();
        }
        let advance = ledger.checkpoint.idle(wal_end);
        ledger.report(advance)
    }

    /// The session ended: a transaction it was receiving is abandoned (the
    /// next session replays it under a new identity).
    pub fn end(mut self, ledger: &mut Ledger) -> Advance {
        self.abandon(ledger)
    }

    fn abandon(&mut self, ledger: &mut Ledger) -> Advance {
        match self.open.take() {
            Some(Open { txn: Some(txn), .. }) => {
                let advance = ledger.checkpoint.abandon(txn);
                ledger.report(advance)
            }
            _ => Advance::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(confirmed: u64, on_refusal: OnRefusal) -> Ledger {
        Ledger::new(Lsn(confirmed), Feedback::new(Lsn(confirmed)), on_refusal)
    }

    fn failure(aggregate: &str) -> PublishFailure {
        PublishFailure {
            aggregate: aggregate.into(),
            seq_nr: "1".into(),
            lsn: "0/1".into(),
            topic: "events".into(),
            kind: "refused",
            reason: "too large".into(),
            record_at_fault: true,
        }
    }

    /// Streams a transaction of one event, committed at `end`.
    fn one_event(l: &mut Ledger, s: &mut SessionState, end: u64) -> TxnId {
        s.begin(l, 0);
        let txn = s.event(l).unwrap();
        s.sent();
        s.commit(l, Lsn(end));
        txn
    }

    #[test]
    fn a_million_empty_transactions_behind_an_unacknowledged_event_take_no_memory() {
        let mut l = ledger(0, OnRefusal::Halt);
        let (mut s, _) = SessionState::start(&mut l, Lsn(0));
        let txn = one_event(&mut l, &mut s, 100);
        let mut end = 100;
        for _ in 0..1_000_000 {
            // PostgreSQL 14 sends every transaction of the database.
            s.begin(&mut l, 0);
            end += 10;
            s.commit(&mut l, Lsn(end));
            assert_eq!(l.in_flight(), 1);
        }
        assert_eq!(
            l.confirmed(),
            Lsn(0),
            "nothing passes the unacknowledged event"
        );
        let after = l.delivered(txn, Record::Event, Report::Acked);
        assert_eq!(after.advance.confirmed, Some(Lsn(end)));
        assert_eq!(after.advance.completed, 1);
        assert_eq!(l.feedback().confirmed(), Lsn(end));
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn an_empty_transaction_with_nothing_pending_is_confirmed_at_once() {
        let mut l = ledger(5, OnRefusal::Halt);
        let (mut s, _) = SessionState::start(&mut l, Lsn(5));
        s.begin(&mut l, 0);
        assert_eq!(s.commit(&mut l, Lsn(40)).confirmed, Some(Lsn(40)));
        assert_eq!(l.feedback().confirmed(), Lsn(40));
    }

    #[test]
    fn a_keepalive_inside_a_transaction_confirms_nothing() {
        let mut l = ledger(0, OnRefusal::Halt);
        let (mut s, _) = SessionState::start(&mut l, Lsn(0));
        s.begin(&mut l, 0);
        // No event yet, so nothing is pending: only the open transaction
        // says the keepalive's position has not been handled.
        assert_eq!(s.keepalive(&mut l, Lsn(900)).confirmed, None);
        s.commit(&mut l, Lsn(100));
        assert_eq!(s.keepalive(&mut l, Lsn(900)).confirmed, Some(Lsn(900)));
    }

    #[test]
    fn a_session_starts_at_the_slots_position_when_the_slot_moved_on() {
        // A standby started when the slot was at 100; another instance moved
        // it to 500 before this one took over.
        let mut l = ledger(100, OnRefusal::Halt);
        let (_, advance) = SessionState::start(&mut l, Lsn(500));
        assert_eq!(advance.confirmed, Some(Lsn(500)));
        assert_eq!(l.feedback().confirmed(), Lsn(500));
        // An older reading never moves it back.
        let (_, advance) = SessionState::start(&mut l, Lsn(300));
        assert_eq!(advance.confirmed, None);
        assert_eq!(l.confirmed(), Lsn(500));
    }

    #[test]
    fn reports_about_an_abandoned_copy_never_count_toward_its_replay() {
        let mut l = ledger(0, OnRefusal::DeadLetter);
        let (mut first, _) = SessionState::start(&mut l, Lsn(0));
        first.begin(&mut l, 0);
        let copy = first.event(&mut l).unwrap();
        first.sent();
        let refused_copy = first.event(&mut l).unwrap();
        first.sent();
        first.end(&mut l);
        let (mut second, _) = SessionState::start(&mut l, Lsn(0));
        second.begin(&mut l, 0);
        let replay = second.event(&mut l).unwrap();
        second.sent();
        second.sent();
        assert_ne!(replay, copy);
        second.commit(&mut l, Lsn(100));
        // The first copy's acknowledgement and refusal arrive late: ignored,
        // and the refusal is not dead-lettered (the replay will be refused).
        assert_eq!(
            l.delivered(copy, Record::Event, Report::Acked).commit_ts,
            None
        );
        assert_eq!(
            l.delivered(refused_copy, Record::Event, Report::Refused(failure("a")))
                .action,
            Action::Nothing
        );
        assert_eq!(
            l.delivered(copy, Record::DeadLetter, Report::Acked)
                .advance
                .confirmed,
            None
        );
        assert_eq!(l.confirmed(), Lsn(0));
        // The replay's own refusal is dead-lettered; the record completes it.
        let action = l
            .delivered(replay, Record::Event, Report::Refused(failure("a")))
            .action;
        assert_eq!(action, Action::DeadLetter(failure("a")));
        l.delivered(replay, Record::Event, Report::Acked);
        let done = l.delivered(replay, Record::DeadLetter, Report::Acked);
        assert_eq!(done.advance.confirmed, Some(Lsn(100)));
    }

    #[test]
    fn a_refusal_halts_and_purged_records_never_count() {
        let mut l = ledger(0, OnRefusal::Halt);
        let (mut s, _) = SessionState::start(&mut l, Lsn(0));
        let a = one_event(&mut l, &mut s, 100);
        let b = one_event(&mut l, &mut s, 200);
        let refused = l.delivered(a, Record::Event, Report::Refused(failure("a")));
        assert_eq!(refused.action, Action::Halt);
        assert_eq!(l.failure(), Some(&failure("a")));
        assert_eq!(
            l.delivered(b, Record::Event, Report::Purged).action,
            Action::Nothing
        );
        assert_eq!(s.keepalive(&mut l, Lsn(300)).confirmed, None);
        assert_eq!(l.confirmed(), Lsn(0));
    }

    #[test]
    fn a_refusal_not_about_the_record_halts_even_in_dead_letter_mode() {
        // message.timeout.ms ran out during a broker outage, the topic is
        // not authorised, the partition is unknown: the event is valid, and
        // a dead-letter record acknowledged in its place would let the slot
        // pass an event the topic never got.
        let mut l = ledger(0, OnRefusal::DeadLetter);
        let (mut s, _) = SessionState::start(&mut l, Lsn(0));
        let timed_out = one_event(&mut l, &mut s, 100);
        let failure = PublishFailure {
            kind: "timed_out",
            reason: "Local: Message timed out".into(),
            record_at_fault: false,
            ..failure("a")
        };
        let refused = l.delivered(timed_out, Record::Event, Report::Refused(failure.clone()));
        assert_eq!(refused.action, Action::Halt);
        assert_eq!(l.failure(), Some(&failure));
        // Nothing moves past it, not even a keepalive.
        assert_eq!(s.keepalive(&mut l, Lsn(500)).confirmed, None);
        assert_eq!(l.confirmed(), Lsn(0));
        // An abandoned copy's refusal of that kind halts too: the replay
        // cannot be dead-lettered either.
        let mut l = ledger(0, OnRefusal::DeadLetter);
        let (mut first, _) = SessionState::start(&mut l, Lsn(0));
        first.begin(&mut l, 0);
        let copy = first.event(&mut l).unwrap();
        first.sent();
        first.end(&mut l);
        assert_eq!(
            l.delivered(copy, Record::Event, Report::Refused(failure))
                .action,
            Action::Halt
        );
    }

    #[test]
    fn an_events_refusal_is_kept_over_a_nameless_fatal_error() {
        let mut l = ledger(0, OnRefusal::Halt);
        let fatal = PublishFailure {
            aggregate: "?".into(),
            kind: "fatal",
            record_at_fault: false,
            ..failure("?")
        };
        assert_eq!(l.fatal(fatal), Action::Halt);
        l.refused(0, Record::Event, failure("a"));
        l.refused(0, Record::Event, failure("b"));
        assert_eq!(l.failure().map(|f| f.aggregate.as_str()), Some("a"));
    }
}
