//! The query side's decisions, pure: what a Kafka record says, and whether
//! to apply it, skip it as a replay, or stop at it as a gap.
//!
//! walrelay delivers at least once, in `seq_nr` order per aggregate (one key,
//! one partition). So for each aggregate the consumer keeps the `seq_nr` of
//! the last event it applied, in the read model's database, updated in the
//! same transaction as the change the event made:
//!
//! - `seq_nr <= last`: a replay (walrelay crashed before confirming it, or
//!   the consumer crashed before committing its Kafka offset): skip it;
//! - `seq_nr == last + 1`: the next event: apply it;
//! - `seq_nr > last + 1`: a gap. Per-aggregate order makes it impossible
//!   unless something upstream broke (events lost, a topic repartitioned so
//!   that an aggregate's events are in two partitions, a writer that skipped
//!   a `seq_nr`). Applying it would build a balance on missing history, so it
//!   is not applied: the consumer stops that partition and reports it.

/// A record of the events topic, as walrelay publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The key: the `aggregate_id` column.
    pub aggregate_id: String,
    /// The `seq_nr` header.
    pub seq_nr: i64,
    /// The `event_type` header.
    pub event_type: String,
    /// The value: the `payload` column, JSON text.
    pub payload: String,
    /// The `lsn` header: the commit LSN of the event's transaction, `X/Y`.
    pub lsn: Option<String>,
}

impl Envelope {
    /// Reads a record from its key, a lookup of its headers and its value;
    /// `Err` says what is missing or unreadable.
    pub fn parse<'a>(
        key: Option<&'a [u8]>,
        header: impl Fn(&str) -> Option<&'a [u8]>,
        value: Option<&'a [u8]>,
    ) -> Result<Self, String> {
        let text = |what: &str, bytes: Option<&'a [u8]>| -> Result<String, String> {
            let bytes = bytes.ok_or_else(|| format!("no {what}"))?;
            String::from_utf8(bytes.to_vec()).map_err(|_| format!("the {what} is not UTF-8"))
        };
        let seq_nr = text("seq_nr header", header("seq_nr"))?;
        let seq_nr = seq_nr
            .parse()
            .map_err(|_| format!("the seq_nr header {seq_nr:?} is not a number"))?;
        Ok(Envelope {
            aggregate_id: text("key", key)?,
            seq_nr,
            event_type: text("event_type header", header("event_type"))?,
            payload: text("value", value)?,
            lsn: header("lsn").and_then(|lsn| String::from_utf8(lsn.to_vec()).ok()),
        })
    }
}

/// What to do with an event, given the last `seq_nr` applied for its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next one: apply it.
    Apply,
    /// Applied already: skip it.
    Replay,
    /// Events are missing before it: do not apply it.
    Gap {
        /// The `seq_nr` that should have come.
        expected: i64,
    },
}

/// See the module's documentation.
pub fn step(last_applied: i64, seq_nr: i64) -> Step {
    if seq_nr <= last_applied {
        Step::Replay
    } else if seq_nr == last_applied + 1 {
        Step::Apply
    } else {
        Step::Gap {
            expected: last_applied + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_skipped_the_next_is_applied_and_a_gap_is_not() {
        assert_eq!(step(0, 1), Step::Apply);
        assert_eq!(step(3, 4), Step::Apply);
        assert_eq!(step(3, 3), Step::Replay);
        assert_eq!(step(3, 1), Step::Replay);
        assert_eq!(step(3, 5), Step::Gap { expected: 4 });
        assert_eq!(step(0, 2), Step::Gap { expected: 1 });
    }

    #[test]
    fn a_record_needs_its_key_seq_nr_event_type_and_value() {
        let headers = [
            ("seq_nr", b"7".as_slice()),
            ("event_type", b"MoneyDeposited"),
            ("lsn", b"0/16B3748"),
        ];
        let lookup = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        let parsed = Envelope::parse(Some(b"acc-1"), lookup, Some(b"{\"amount\": 5}")).unwrap();
        assert_eq!(
            parsed,
            Envelope {
                aggregate_id: "acc-1".into(),
                seq_nr: 7,
                event_type: "MoneyDeposited".into(),
                payload: "{\"amount\": 5}".into(),
                lsn: Some("0/16B3748".into()),
            }
        );
        assert!(Envelope::parse(None, lookup, Some(b"{}")).is_err());
        assert!(Envelope::parse(Some(b"a"), lookup, None).is_err());
        let no_seq = |name: &str| lookup(name).filter(|_| name != "seq_nr");
        assert!(Envelope::parse(Some(b"a"), no_seq, Some(b"{}")).is_err());
        let bad_seq = |name: &str| {
            if name == "seq_nr" {
                Some(b"x".as_slice())
            } else {
                lookup(name)
            }
        };
        assert!(Envelope::parse(Some(b"a"), bad_seq, Some(b"{}")).is_err());
    }
}
