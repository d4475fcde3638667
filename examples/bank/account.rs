//! The account aggregate: its events, the state they fold into, and the
//! decisions a command makes on that state. Pure: no I/O, so the command
//! side (which folds the events it reads from the events table) and the
//! query side (which applies the events it reads from Kafka) share it.
//!
//! Amounts are whole units (cents, say) in an `i64`; a balance never goes
//! below zero, and never past `i64::MAX`.

/// `event_type` of the first event of every account.
pub const OPENED: &str = "AccountOpened";
/// `event_type` of a deposit.
pub const DEPOSITED: &str = "MoneyDeposited";
/// `event_type` of a withdrawal.
pub const WITHDRAWN: &str = "MoneyWithdrawn";

/// What a client asks of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Open the account (its first event).
    Open,
    /// Put money in.
    Deposit(i64),
    /// Take money out; refused when the balance would go negative.
    Withdraw(i64),
}

/// What happened to an account: one row of the events table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `AccountOpened`, payload `{}`.
    Opened,
    /// `MoneyDeposited`, payload `{"amount": N}`.
    Deposited(i64),
    /// `MoneyWithdrawn`, payload `{"amount": N}`.
    Withdrawn(i64),
}

/// Why a command was refused: nothing is appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The account has been opened already.
    #[error("account {0:?} is open already")]
    AlreadyOpen(String),
    /// The account was never opened.
    #[error("account {0:?} does not exist; open it first")]
    NotOpen(String),
    /// Amounts are positive.
    #[error("the amount must be positive, not {0}")]
    NotPositive(i64),
    /// The withdrawal would take the balance below zero.
    #[error("account {account:?} holds {balance}, less than the {amount} to withdraw")]
    InsufficientFunds {
        /// The account.
        account: String,
        /// Its balance.
        balance: i64,
        /// The amount asked for.
        amount: i64,
    },
    /// The deposit would take the balance past what it can hold.
    #[error("account {account:?} cannot hold {balance} + {amount}")]
    TooMuch {
        /// The account.
        account: String,
        /// Its balance.
        balance: i64,
        /// The amount deposited.
        amount: i64,
    },
}

/// An event row that is not an account event this code understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event_type} event with payload {payload:?}: {why}")]
pub struct Malformed {
    /// Its `event_type`.
    pub event_type: String,
    /// Its payload as text.
    pub payload: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Event {
    /// The `event_type` column.
    pub fn event_type(self) -> &'static str {
        match self {
            Event::Opened => OPENED,
            Event::Deposited(_) => DEPOSITED,
            Event::Withdrawn(_) => WITHDRAWN,
        }
    }

    /// The `payload` column, JSON.
    pub fn payload(self) -> String {
        match self {
            Event::Opened => "{}".to_owned(),
            Event::Deposited(amount) | Event::Withdrawn(amount) => {
                serde_json::json!({ "amount": amount }).to_string()
            }
        }
    }

    /// The event of a row; `Ok(None)` for an `event_type` that is not the
    /// account's (another kind of aggregate sharing the table).
    pub fn parse(event_type: &str, payload: &str) -> Result<Option<Event>, Malformed> {
        let malformed = |why| Malformed {
            event_type: event_type.to_owned(),
            payload: payload.to_owned(),
            why,
        };
        let amount = || -> Result<i64, Malformed> {
            let json: serde_json::Value =
                serde_json::from_str(payload).map_err(|_| malformed("the payload is not JSON"))?;
            let amount = json
                .get("amount")
                .and_then(serde_json::Value::as_i64)
                .ok_or_else(|| malformed("no integer \"amount\""))?;
            if amount > 0 {
                Ok(amount)
            } else {
                Err(malformed("the amount is not positive"))
            }
        };
        Ok(Some(match event_type {
            OPENED => Event::Opened,
            DEPOSITED => Event::Deposited(amount()?),
            WITHDRAWN => Event::Withdrawn(amount()?),
            _ => return Ok(None),
        }))
    }

    /// What the event does to a balance.
    pub fn delta(self) -> i64 {
        match self {
            Event::Opened => 0,
            Event::Deposited(amount) => amount,
            Event::Withdrawn(amount) => -amount,
        }
    }
}

/// An account as its events made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The aggregate ID.
    pub id: String,
    /// The `seq_nr` of its last event; 0 before the first. The next event
    /// is `version + 1`.
    pub version: i64,
    /// Whether it was opened.
    pub open: bool,
    /// Its balance.
    pub balance: i64,
}

impl Account {
    /// An account with no events yet.
    pub fn new(id: &str) -> Self {
        Account {
            id: id.to_owned(),
            version: 0,
            open: false,
            balance: 0,
        }
    }

    /// Applies the event numbered `seq_nr`. Events come in `seq_nr` order
    /// from 1, each once: anything else is a bug upstream, reported as such.
    pub fn apply(&mut self, seq_nr: i64, event: Event) -> Result<(), String> {
        if seq_nr != self.version + 1 {
            return Err(format!(
                "{}: event {seq_nr} after event {}",
                self.id, self.version
            ));
        }
        let balance = self.balance.checked_add(event.delta());
        match (event, self.open, balance) {
            (Event::Opened, false, _) => self.open = true,
            (Event::Opened, true, _) => return Err(format!("{}: opened twice", self.id)),
            (_, false, _) => return Err(format!("{}: money moved before opening", self.id)),
            (_, true, Some(balance)) if balance >= 0 => self.balance = balance,
            (_, true, _) => {
                return Err(format!(
                    "{}: event {seq_nr} takes {} out of range",
                    self.id, self.balance
                ));
            }
        }
        self.version = seq_nr;
        Ok(())
    }

    /// The event that carries out `command`, or why it is refused.
    pub fn decide(&self, command: Command) -> Result<Event, Refusal> {
        let account = || self.id.clone();
        match command {
            Command::Open if self.open => Err(Refusal::AlreadyOpen(account())),
            Command::Open => Ok(Event::Opened),
            _ if !self.open => Err(Refusal::NotOpen(account())),
            Command::Deposit(amount) | Command::Withdraw(amount) if amount <= 0 => {
                Err(Refusal::NotPositive(amount))
            }
            Command::Deposit(amount) => match self.balance.checked_add(amount) {
                Some(_) => Ok(Event::Deposited(amount)),
                None => Err(Refusal::TooMuch {
                    account: account(),
                    balance: self.balance,
                    amount,
                }),
            },
            Command::Withdraw(amount) if amount > self.balance => Err(Refusal::InsufficientFunds {
                account: account(),
                balance: self.balance,
                amount,
            }),
            Command::Withdraw(amount) => Ok(Event::Withdrawn(amount)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened_with(balance: i64) -> Account {
        let mut account = Account::new("a");
        account.apply(1, Event::Opened).unwrap();
        if balance > 0 {
            account.apply(2, Event::Deposited(balance)).unwrap();
        }
        account
    }

    #[test]
    fn an_account_opens_once_and_moves_money_only_when_open() {
        let new = Account::new("a");
        assert_eq!(new.decide(Command::Open), Ok(Event::Opened));
        assert_eq!(
            new.decide(Command::Deposit(5)),
            Err(Refusal::NotOpen("a".into()))
        );
        let open = opened_with(0);
        assert_eq!(
            open.decide(Command::Open),
            Err(Refusal::AlreadyOpen("a".into()))
        );
        assert_eq!(open.decide(Command::Deposit(5)), Ok(Event::Deposited(5)));
        assert_eq!(
            open.decide(Command::Deposit(0)),
            Err(Refusal::NotPositive(0))
        );
    }

    #[test]
    fn a_withdrawal_that_would_go_below_zero_is_refused() {
        let account = opened_with(100);
        assert_eq!(
            account.decide(Command::Withdraw(100)),
            Ok(Event::Withdrawn(100))
        );
        assert_eq!(
            account.decide(Command::Withdraw(101)),
            Err(Refusal::InsufficientFunds {
                account: "a".into(),
                balance: 100,
                amount: 101
            })
        );
        assert!(matches!(
            opened_with(i64::MAX).decide(Command::Deposit(1)),
            Err(Refusal::TooMuch { .. })
        ));
    }

    #[test]
    fn events_fold_in_order_and_anything_else_is_an_error() {
        let mut account = opened_with(70);
        account.apply(3, Event::Withdrawn(30)).unwrap();
        assert_eq!((account.version, account.balance), (3, 40));
        // A replay, a gap, and a withdrawal past the balance.
        assert!(account.apply(3, Event::Deposited(1)).is_err());
        assert!(account.apply(5, Event::Deposited(1)).is_err());
        assert!(account.apply(4, Event::Withdrawn(41)).is_err());
        assert!(Account::new("b").apply(1, Event::Deposited(1)).is_err());
        assert_eq!((account.version, account.balance), (3, 40));
    }

    #[test]
    fn events_round_trip_through_their_columns() {
        for event in [Event::Opened, Event::Deposited(7), Event::Withdrawn(9)] {
            assert_eq!(
                Event::parse(event.event_type(), &event.payload()),
                Ok(Some(event))
            );
        }
        assert_eq!(Event::parse("OrderPlaced", "{}"), Ok(None));
        assert!(Event::parse(DEPOSITED, "{\"amount\": -3}").is_err());
        assert!(Event::parse(WITHDRAWN, "{}").is_err());
        assert!(Event::parse(DEPOSITED, "not json").is_err());
    }
}
