//! The watermark that decides which LSN may be confirmed to PostgreSQL.
//!
//! Transactions enter in commit order (the order pgoutput sends them). Their
//! events go to the producer as they arrive, and acknowledgements come back in
//! any order. The confirmed position moves to a transaction's commit end LSN
//! only when that transaction and every one before it has been committed in
//! the stream and fully acknowledged; when nothing is in flight, it moves to
//! the WAL end a keepalive reported. It never moves backwards.
//!
//! Why `Commit.end_lsn`: PostgreSQL resends every transaction whose commit
//! record starts at or after the confirmed position, so confirming the end of
//! a commit record says "this one is done", and nothing after it is skipped.
//!
//! Each transaction is counted, not listed: its events add up in a signed
//! counter, so an acknowledgement may arrive before the commit has been seen
//! (the counter then dips below zero) without any per-event bookkeeping.
//!
//! Identities are never reused (DESIGN.md, invariant 9). A session that ends
//! inside a transaction abandons it, and the next session replays it under a
//! new [`TxnId`]; the first copy's events may still be acknowledged (or
//! refused) long after, and those reports must not count toward the replay,
//! or the watermark would pass replayed events nobody acknowledged. So IDs
//! come from a counter that only grows, each pending entry carries its own,
//! and a report for an ID that is not pending is ignored for good.
//!
//! Only transactions with events take an entry. A transaction without any
//! (on PostgreSQL 14 every transaction of the database arrives as an empty
//! Begin/Commit) only moves the position that may be confirmed: it raises the
//! end of the last pending entry, or is confirmed at once when nothing is
//! pending. Memory is therefore bounded by the events in flight, not by the
//! database's traffic.
use std::collections::{BTreeSet, VecDeque};

use crate::pg::lsn::Lsn;

/// Names a transaction in the watermark; carried with each produced event.
/// Never reused within a process.
pub type TxnId = u64;

#[derive(Debug, Clone)]
struct Pending {
    /// Its identity, unique for the life of the process.
    id: TxnId,
    /// Events sent minus events acknowledged (sent is added at commit).
    outstanding: i64,
    /// Set at commit; raised by empty transactions that commit after it.
    end_lsn: Option<Lsn>,
    /// Commit time, microseconds since 2000-01-01 UTC.
    commit_ts: i64,
    /// An event of it failed for good: it never completes.
    poisoned: bool,
}

/// What a step changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Advance {
    /// The new confirmed position, when it moved.
    pub confirmed: Option<Lsn>,
    /// Transactions with events completed by this step.
    pub completed: u64,
    /// The commit time of the newest of them (PostgreSQL microseconds).
    pub last_commit_ts: Option<i64>,
}

/// What an acknowledgement changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The watermark's movement.
    pub advance: Advance,
    /// The acknowledged event's commit time (PostgreSQL microseconds), when
    /// it belongs to a pending transaction.
    pub commit_ts: Option<i64>,
}

/// The in-flight transactions and the confirmed position.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Pending transactions in commit order; their IDs increase front to back.
    pending: VecDeque<Pending>,
    /// The ID the next transaction gets.
    next_id: TxnId,
    /// Transactions abandoned by a session that ended inside them, from the
    /// front of `pending` on (one per such reconnect while the front waits).
    /// Those before the front are forgotten, so that a process that
    /// reconnects for months keeps no trace of each reconnect.
    abandoned: BTreeSet<TxnId>,
    /// Every ID below this one that was abandoned has been forgotten: which
    /// of them completed is no longer known (see [`completed`](Self::completed)).
    forgotten_below: TxnId,
    confirmed: Lsn,
}

impl Checkpoint {
    /// Starts at the position the slot is already confirmed to.
    pub fn new(confirmed: Lsn) -> Self {
        Checkpoint {
            pending: VecDeque::new(),
            next_id: 0,
            abandoned: BTreeSet::new(),
            forgotten_below: 0,
            confirmed,
        }
    }

    /// The confirmed position.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Transactions with events begun and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// A transaction with events began; its events carry the returned ID.
    pub fn begin(&mut self, commit_ts: i64) -> TxnId {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push_back(Pending {
            id,
            outstanding: 0,
            end_lsn: None,
            commit_ts,
            poisoned: false,
        });
        self.forget_abandoned();
        id
    }

    /// Transaction `id` committed at `end_lsn` after `sent` events were handed
    /// to the producer.
    pub fn commit(&mut self, id: TxnId, sent: u64, end_lsn: Lsn) -> Advance {
        let Some(pending) = self.get(id) else {
            return Advance::default();
        };
        pending.outstanding += i64::try_from(sent).unwrap_or(i64::MAX);
        pending.end_lsn = Some(end_lsn);
        self.advance()
    }

    /// A transaction without events committed at `end_lsn`: once everything
    /// before it is confirmed, so is it. It takes no entry of its own.
    pub fn commit_empty(&mut self, end_lsn: Lsn) -> Advance {
        match self.pending.back_mut() {
            None => self.raise(end_lsn),
            Some(Pending {
                end_lsn: Some(end), ..
            }) => {
                *end = (*end).max(end_lsn);
                Advance::default()
            }
            // The last one is still open (never the case for a replication
            // stream, which sends transactions whole): queue a done entry.
            Some(Pending { end_lsn: None, .. }) => {
                let id = self.begin(0);
                self.commit(id, 0, end_lsn)
            }
        }
    }

    /// One event of transaction `id` was acknowledged by the broker. The
    /// acknowledgement of an abandoned (or unknown) transaction is ignored.
    pub fn acked(&mut self, id: TxnId) -> Ack {
        let Some(pending) = self.get(id) else {
            return Ack {
                advance: Advance::default(),
                commit_ts: None,
            };
        };
        pending.outstanding -= 1;
        let commit_ts = Some(pending.commit_ts);
        Ack {
            advance: self.advance(),
            commit_ts,
        }
    }

    /// An event of transaction `id` failed for good: the watermark stays
    /// before it until the process restarts and the slot replays it.
    pub fn poison(&mut self, id: TxnId) {
        if let Some(pending) = self.get(id) {
            pending.poisoned = true;
        }
    }

    /// Whether transaction `id` is pending: begun, neither completed nor abandoned.
    pub fn is_pending(&self, id: TxnId) -> bool {
        self.index(id).is_some()
    }

    /// Whether transaction `id`, and every transaction before it, is no
    /// longer pending, and `id` completed (was not abandoned): every one of
    /// its events was acknowledged and its end may be confirmed. Never true
    /// of an abandoned transaction; false too for any transaction older than
    /// an abandoned one that has been forgotten (which of those completed is
    /// no longer known), so ask while waiting for it, as the initial snapshot
    /// does before any session begins.
    pub fn completed(&self, id: TxnId) -> bool {
        id >= self.forgotten_below
            && id < self.next_id
            && !self.abandoned.contains(&id)
            && self.pending.front().is_none_or(|p| p.id > id)
    }

    /// The replication session ended inside transaction `id`: forget it (the
    /// next session replays it whole, under a new ID). Acknowledgements and
    /// refusals of its events that arrive later are ignored.
    pub fn abandon(&mut self, id: TxnId) -> Advance {
        let Some(index) = self.index(id) else {
            return Advance::default();
        };
        self.pending.remove(index);
        self.abandoned.insert(id);
        let advance = self.advance();
        self.forget_abandoned();
        advance
    }

    /// Forgets the abandoned transactions before the front of `pending`:
    /// reports about them are ignored all the same (they are not pending),
    /// and [`completed`](Self::completed) answers no for them through
    /// `forgotten_below`.
    fn forget_abandoned(&mut self) {
        let Some(front) = self.pending.front().map(|p| p.id) else {
            return;
        };
        let kept = self.abandoned.split_off(&front);
        if let Some(last) = self.abandoned.last() {
            self.forgotten_below = self.forgotten_below.max(last + 1);
        }
        self.abandoned = kept;
    }

    /// A keepalive outside any transaction reported the server's WAL end.
    /// With nothing in flight, everything before it is handled.
    pub fn idle(&mut self, wal_end: Lsn) -> Advance {
        if self.pending.is_empty() {
            return self.raise(wal_end);
        }
        Advance::default()
    }

    /// Everything before `lsn` is handled: with nothing pending (see
    /// [`idle`](Self::idle) and [`commit_empty`](Self::commit_empty)), or
    /// because the slot is confirmed there already (another instance moved
    /// it while this one stood by), so that nothing less is ever reported.
    /// Transactions still pending complete as before, without moving it back.
    pub fn raise(&mut self, lsn: Lsn) -> Advance {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            return Advance {
                confirmed: Some(lsn),
                ..Advance::default()
            };
        }
        Advance::default()
    }

    fn index(&self, id: TxnId) -> Option<usize> {
        self.pending.binary_search_by_key(&id, |p| p.id).ok()
    }

    fn get(&mut self, id: TxnId) -> Option<&mut Pending> {
        let index = self.index(id)?;
        self.pending.get_mut(index)
    }

    fn advance(&mut self) -> Advance {
        let before = self.confirmed;
        let mut advance = Advance::default();
        while let Some(front) = self.pending.front() {
            match front.end_lsn {
                Some(end) if front.outstanding <= 0 && !front.poisoned => {
                    self.confirmed = self.confirmed.max(end);
                    advance.completed += 1;
                    advance.last_commit_ts = Some(front.commit_ts);
                    self.pending.pop_front();
                }
                _ => break,
            }
        }
        advance.confirmed = (self.confirmed > before).then_some(self.confirmed);
        advance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn confirms_in_commit_order_whatever_the_ack_order() {
        let mut c = Checkpoint::new(Lsn(10));
        let a = c.begin(0);
        assert_eq!(c.commit(a, 2, Lsn(100)).confirmed, None);
        let b = c.begin(0);
        assert_eq!(c.commit(b, 1, Lsn(200)).confirmed, None);
        // b done first: nothing moves, a is still out.
        assert_eq!(c.acked(b).advance.confirmed, None);
        assert_eq!(c.acked(a).advance.confirmed, None);
        let last = c.acked(a).advance;
        assert_eq!(last.confirmed, Some(Lsn(200)));
        assert_eq!(last.completed, 2);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn completed_once_it_and_everything_before_it_is_acknowledged() {
        let mut c = Checkpoint::new(Lsn(0));
        let a = c.begin(0);
        let b = c.begin(0);
        assert!(!c.completed(a));
        c.commit(a, 2, Lsn(100));
        c.commit(b, 1, Lsn(200));
        c.acked(b);
        assert!(!c.completed(b), "a is still out");
        c.acked(a);
        assert!(!c.completed(a), "one of a's events is still out");
        c.acked(a);
        assert!(c.completed(a) && c.completed(b));
        // A poisoned transaction never completes, nor does anything after it.
        let p = c.begin(0);
        let after = c.begin(0);
        c.commit(p, 1, Lsn(300));
        c.commit(after, 0, Lsn(400));
        c.poison(p);
        c.acked(p);
        assert!(!c.completed(p) && !c.completed(after));
    }

    #[test]
    fn an_ack_before_the_commit_is_counted() {
        let mut c = Checkpoint::new(Lsn(0));
        let a = c.begin(0);
        assert_eq!(c.acked(a).advance.confirmed, None, "not committed yet");
        assert_eq!(c.commit(a, 1, Lsn(50)).confirmed, Some(Lsn(50)));
    }

    #[test]
    fn idle_moves_only_when_nothing_is_in_flight() {
        let mut c = Checkpoint::new(Lsn(0));
        let a = c.begin(0);
        c.commit(a, 1, Lsn(100));
        assert_eq!(c.idle(Lsn(500)).confirmed, None);
        assert_eq!(c.acked(a).advance.confirmed, Some(Lsn(100)));
        assert_eq!(c.idle(Lsn(500)).confirmed, Some(Lsn(500)));
        assert_eq!(c.idle(Lsn(400)).confirmed, None, "never backwards");
        assert_eq!(c.confirmed(), Lsn(500));
    }

    #[test]
    fn a_poisoned_transaction_holds_the_watermark() {
        let mut c = Checkpoint::new(Lsn(0));
        let a = c.begin(0);
        c.commit(a, 1, Lsn(100));
        c.poison(a);
        assert_eq!(c.acked(a).advance.confirmed, None);
        let b = c.begin(0);
        let _ = c.commit(b, 0, Lsn(200));
        assert_eq!(c.confirmed(), Lsn(0));
        assert_eq!(c.idle(Lsn(300)).confirmed, None);
    }

    #[test]
    fn an_abandoned_transaction_is_forgotten_and_its_acks_ignored() {
        let mut c = Checkpoint::new(Lsn(0));
        let a = c.begin(0);
        c.commit(a, 1, Lsn(100));
        // A session sends two events of a transaction, then ends before its
        // commit: the transaction is abandoned, the next session replays it.
        let open = c.begin(0);
        c.abandon(open);
        let replay = c.begin(0);
        assert_ne!(
            replay, open,
            "a replay must not reuse the abandoned copy's ID"
        );
        assert_eq!(c.acked(a).advance.confirmed, Some(Lsn(100)));
        assert_eq!(c.commit(replay, 2, Lsn(300)).confirmed, None);
        // The first copy's acknowledgements arrive late: they must not count
        // toward the replay, whose own events are still unacknowledged.
        for _ in 0..2 {
            assert_eq!(
                c.acked(open).advance.confirmed,
                None,
                "a late ack of the abandoned copy counted"
            );
        }
        assert_eq!(c.confirmed(), Lsn(100));
        assert_eq!(c.acked(replay).advance.confirmed, None);
        assert_eq!(c.acked(replay).advance.confirmed, Some(Lsn(300)));
    }

    #[test]
    fn completed_means_acknowledged_with_everything_before_it() {
        let mut c = Checkpoint::new(Lsn(0));
        let a = c.begin(0);
        let b = c.begin(0);
        assert!(!c.completed(a) && !c.completed(b));
        c.commit(b, 1, Lsn(200));
        c.acked(b);
        assert!(!c.completed(b), "a transaction before it is still pending");
        c.acked(a);
        assert!(!c.completed(a), "acknowledged but not committed");
        c.commit(a, 1, Lsn(100));
        assert!(c.completed(a) && c.completed(b));
        // An abandoned transaction never completes; one never begun neither.
        let open = c.begin(0);
        c.abandon(open);
        assert!(!c.completed(open));
        assert!(!c.completed(open + 1));
    }

    #[test]
    fn a_million_mid_transaction_reconnects_leave_no_trace_and_nothing_abandoned_counts() {
        let mut c = Checkpoint::new(Lsn(0));
        let mut end = 0;
        let mut last_abandoned = None;
        for _ in 0..1_000_000 {
            // A transaction completes, then a session ends inside the next.
            let done = c.begin(0);
            end += 100;
            c.commit(done, 1, Lsn(end));
            c.acked(done);
            let open = c.begin(0);
            c.abandon(open);
            assert!(!c.completed(open));
            last_abandoned = Some(open);
        }
        assert!(c.abandoned.len() <= 1, "{} kept", c.abandoned.len());
        // A late acknowledgement of an abandoned copy still never counts,
        // nor does that transaction ever complete.
        let open = last_abandoned.unwrap();
        let replay = c.begin(0);
        assert!(
            c.abandoned.is_empty(),
            "forgotten once a later one is pending"
        );
        c.commit(replay, 1, Lsn(end + 100));
        for id in [open, open - 1, 1] {
            assert_eq!(c.acked(id).advance.confirmed, None);
            assert!(!c.completed(id), "{id}");
        }
        assert_eq!(c.confirmed(), Lsn(end));
        assert_eq!(c.acked(replay).advance.confirmed, Some(Lsn(end + 100)));
        assert!(c.completed(replay) && !c.completed(open));
    }

    /// One step of a simulated session.
    #[derive(Debug, Clone)]
    enum Op {
        /// Deliver the acknowledgement at this index of the unacknowledged set.
        Ack(usize),
        /// Feed the next stream item (event, commit, keepalive).
        Stream,
    }

    proptest! {
        /// Random transactions, random interleaving of stream progress and
        /// out-of-order acknowledgements: the confirmed position is always
        /// exactly the end of the newest transaction that, with all before it,
        /// is committed and acknowledged (or a keepalive's WAL end with nothing
        /// in flight), and so never passes an unacknowledged event.
        #[test]
        fn never_passes_an_unacknowledged_event(
            sizes in proptest::collection::vec(0u64..5, 1..30),
            ops in proptest::collection::vec(prop_oneof![any::<usize>().prop_map(Op::Ack), Just(Op::Stream)], 0..400),
        ) {
            // The stream: for each transaction, its events, then its commit,
            // then a keepalive with a WAL end past it.
            #[derive(Debug, Clone, Copy)]
            enum Item { Event(usize), Commit(usize), Keepalive(usize) }
            let mut stream = Vec::new();
            for (t, n) in sizes.iter().enumerate() {
                for _ in 0..*n { stream.push(Item::Event(t)); }
                stream.push(Item::Commit(t));
                stream.push(Item::Keepalive(t));
            }
            let end = |t: usize| Lsn(1000 * (t as u64 + 1));
            let keepalive_end = |t: usize| Lsn(1000 * (t as u64 + 1) + 500);

            let mut c = Checkpoint::new(Lsn(1));
            let mut ids = vec![None; sizes.len()];
            let mut sent = vec![0u64; sizes.len()];
            let mut acked = vec![0u64; sizes.len()];
            let mut committed = vec![false; sizes.len()];
            let mut unacked: Vec<usize> = Vec::new();
            let mut next = 0;
            let mut ops = ops.into_iter();
            loop {
                let op = ops.next().unwrap_or(Op::Stream);
                match op {
                    Op::Ack(i) if !unacked.is_empty() => {
                        let t = unacked.swap_remove(i % unacked.len());
                        acked[t] += 1;
                        c.acked(ids[t].unwrap());
                    }
                    Op::Ack(_) | Op::Stream if next < stream.len() => {
                        match stream[next] {
                            Item::Event(t) => {
                                ids[t].get_or_insert_with(|| c.begin(0));
                                sent[t] += 1;
                                unacked.push(t);
                            }
                            Item::Commit(t) => {
                                let id = *ids[t].get_or_insert_with(|| c.begin(0));
                                committed[t] = true;
                                c.commit(id, sent[t], end(t));
                            }
                            Item::Keepalive(t) => { c.idle(keepalive_end(t)); }
                        }
                        next += 1;
                    }
                    _ if !unacked.is_empty() => {
                        let t = unacked.pop().unwrap();
                        acked[t] += 1;
                        c.acked(ids[t].unwrap());
                    }
                    _ => break,
                }
                // The model: the newest transaction done along with all before it.
                let done = (0..sizes.len()).take_while(|&t| committed[t] && acked[t] == sent[t]).last();
                let confirmed = c.confirmed();
                // Never past the first transaction that is not done.
                if let Some(first_open) = (0..sizes.len()).find(|&t| !(committed[t] && acked[t] == sent[t])) {
                    prop_assert!(confirmed < end(first_open), "confirmed {confirmed} past open transaction {first_open}");
                }
                if let Some(t) = done {
                    prop_assert!(confirmed >= end(t), "confirmed {confirmed} lags done transaction {t}");
                }
            }
            // Everything acknowledged, then one more keepalive: all confirmed.
            c.idle(keepalive_end(sizes.len() - 1));
            prop_assert_eq!(c.confirmed(), keepalive_end(sizes.len() - 1));
            prop_assert_eq!(c.in_flight(), 0);
        }
    }
}
