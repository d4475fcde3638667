//! The initial snapshot: on first start, the rows the events table already
//! holds, published before the slot streams what commits later.
//!
//! Creating the slot with `EXPORT_SNAPSHOT` yields a snapshot of exactly the
//! moment the slot becomes consistent: every transaction that committed
//! before its consistent point is visible in it, and every one that commits
//! after is streamed by the slot. Reading the table in that snapshot,
//! ordered by the key and sequence columns, and then streaming, therefore
//! leaves no gap and sends nothing twice. A table without a sequence column
//! (`--seq-column none`) is read ordered by the key and then `ctid`, its
//! rows' physical order: the only order left, which is insertion order only
//! as long as no row was deleted and one writer appended at a time.
//!
//! The exported snapshot lives only until the replication connection that
//! created the slot runs its next command, so it is imported at once
//! (`SET TRANSACTION SNAPSHOT`) into a transaction on the metadata
//! connection, which holds it from then on, and the replication connection
//! is closed. Everything after, the marker's removal included, goes over the
//! metadata connection: an idle replication connection cut by a NAT or a
//! load balancer during a long snapshot can no longer strand it.
//!
//! The snapshot must survive a crash half-way. walrelay's only durable state
//! is in PostgreSQL, so a marker lives there too: a physical replication slot
//! named `<slot>_init`, created before the logical slot and dropped only once
//! every snapshot row was acknowledged. It reserves no WAL and costs nothing.
//! A start that finds the marker knows the snapshot was interrupted, drops
//! both slots and begins again (republishing rows is allowed; losing them is
//! not).
//!
//! The marker is only meaningful if no one else is publishing a snapshot at
//! the same moment: while one instance publishes, the marker is there and
//! inactive, exactly as if it had died. First starts are therefore
//! serialized by a session-level advisory lock on the metadata connection
//! ([`lock_first_start`]), taken before the slots are looked at and held
//! until the snapshot is acknowledged and the marker dropped. It needs no
//! privilege, and PostgreSQL releases it when the session ends, so a crash
//! cannot leave it behind. An instance that gets the lock after waiting looks
//! again: the slot without a marker means the other instance finished (resume
//! from the slot); the marker means it died (start over).
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::checkpoint::TxnId;
use crate::config::RunConfig;
use crate::event::{EventLayout, RowError, Transaction};
use crate::metrics::Metrics;
use crate::pg::conn::{self, ConnError, CreatedSlot, ReplicationConnection};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::MetadataError;
use crate::pg::pgoutput::{Column, ColumnValue, Relation, ReplicaIdentity};
use crate::pg::protocol::system_time_to_pg;
use crate::sink::{PublishFailure, Sink, SinkError};
use crate::source::{SourceError, row_error};

/// Rows fetched from the snapshot cursor at a time.
const FETCH_ROWS: usize = 1000;

/// How often the wait for the snapshot's acknowledgements looks at the watermark.
const ACK_POLL: Duration = Duration::from_millis(20);

/// How often that wait says it still waits.
const ACK_WAIT_REPORT: Duration = Duration::from_secs(5);

/// How often an instance waiting for another's first start tries the lock.
const LOCK_RETRY: Duration = Duration::from_millis(500);

/// How long a fetch from the snapshot cursor may take when `--request-timeout`
/// is shorter: the first one sorts the whole table (`ORDER BY aggregate_id,
/// seq_nr`) before it returns a row, which takes minutes on a large table.
/// Abandoning it early would help nothing: the next start sorts again.
pub const SNAPSHOT_FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The server's timeouts that could end the snapshot's session while it
/// waits on the broker, turned off for it: `statement_timeout` (the first
/// fetch sorts the table), `idle_in_transaction_session_timeout` (the
/// transaction that holds the snapshot idles while the producer queue is
/// full), and, session-wide, `idle_session_timeout` (PostgreSQL 14+: the
/// session idles after COMMIT while the acknowledgements come in, and must
/// live on to drop the marker and hold the first-start lock).
pub const SESSION_TIMEOUTS_OFF: &str = "SELECT set_config('idle_session_timeout', '0', false)
      WHERE current_setting('server_version_num')::int >= 140000";

/// Why the initial snapshot could not be published. The marker stays, so the
/// next start begins it again.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The metadata connection, which reads the snapshot, failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The replication connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The producer failed or refused a row for good.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The table's rows cannot become events.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Shutdown came while the snapshot waited for the broker: not every row
    /// was handed over, so the marker stays and the next start begins again.
    #[error("stopped during the initial snapshot; the next start begins it again")]
    ShutDown,
}

/// The name of the marker slot of `slot`.
pub fn marker_name(slot: &str) -> String {
    format!("{slot}_init")
}

/// The advisory-lock key that serializes the first starts of `slot`: the
/// 64-bit FNV-1a hash of `walrelay first start of slot <slot>`. Slot names
/// are unique in the cluster, so every instance configured for the slot, and
/// nothing else, agrees on it (in `pg_locks`, an `advisory` lock with the
/// key's high and low halves as `classid` and `objid`).
pub fn first_start_lock_key(slot: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"walrelay first start of slot "
        .iter()
        .chain(slot.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Takes the session-level lock that serializes the first starts of `slot`
/// on `client`, waiting as long as another instance holds it (cancel the
/// future to stop waiting). Dropping the connection releases it.
/// `waiting(true)` is called when the wait begins, `waiting(false)` when it
/// ends.
pub async fn lock_first_start(
    client: &crate::pg::metadata::Client,
    slot: &str,
    waiting: impl Fn(bool),
) -> Result<(), MetadataError> {
    let key = first_start_lock_key(slot);
    let mut waited = false;
    // Polled rather than pg_advisory_lock, which would leave a backend queued
    // for the lock after a shutdown dropped the connection.
    while !client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .get::<_, bool>(0)
    {
        if !waited {
            tracing::info!(slot = %slot, "waiting for another instance's first start (its initial snapshot) to finish");
            waited = true;
            waiting(true);
        }
        tokio::time::sleep(LOCK_RETRY).await;
    }
    if waited {
        waiting(false);
        tracing::info!(slot = %slot, "the other instance's first start is over; looking at the slot again");
    }
    Ok(())
}

/// A snapshot exported by slot creation, imported on the metadata
/// connection and waiting to be published.
#[derive(Debug)]
pub struct InitialSnapshot {
    /// The metadata connection, holding the first-start lock, inside a
    /// read-only transaction that imported the snapshot.
    client: crate::pg::metadata::Client,
    /// The exported snapshot's name.
    name: String,
    /// The slot's consistent point: the `lsn` header of the snapshot's events.
    consistent_point: Lsn,
}

impl InitialSnapshot {
    /// Imports the snapshot that creating the slot exported on `repl` into a
    /// transaction on `client` (which holds the first-start lock), then
    /// closes `repl`: the importing transaction holds the snapshot from here on.
    pub async fn import(
        client: crate::pg::metadata::Client,
        repl: ReplicationConnection,
        created: &CreatedSlot,
    ) -> Result<Self, SnapshotError> {
        let name = created.snapshot_name.clone().ok_or_else(|| {
            ConnError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into())
        })?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}; \
                 SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0",
                conn::quote_literal(&name)
            ))
            .await?;
        repl.close().await?;
        Ok(InitialSnapshot {
            client,
            name,
            consistent_point: created.consistent_point,
        })
    }

    /// Ends the transaction that holds the snapshot, keeping the session
    /// (and with it the first-start lock): a snapshot held open for hours
    /// would keep every database's dead rows from being vacuumed.
    pub async fn end_transaction(&self) {
        if let Err(error) = self.client.batch_execute("ROLLBACK").await {
            tracing::debug!(error = %error, "ending the snapshot's transaction");
        }
    }
}

/// The cursor over the table's rows, every column as text, in the order the
/// events of each aggregate were written.
fn declare_cursor(config: &RunConfig, relation: &Relation) -> String {
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|c| format!("t.{}::text", conn::quote_ident(&c.name)))
        .collect();
    // Qualified, so that ORDER BY sorts by the columns, not by their text
    // forms in the select list ("10" < "9").
    let mapped = &config.mapping.columns;
    let order = match &mapped.seq {
        Some(seq) => conn::quote_ident(seq),
        None => "ctid".to_owned(),
    };
    format!(
        "DECLARE walrelay_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}.{} AS t \
         ORDER BY t.{}, t.{order}",
        columns.join(", "),
        conn::quote_ident(&config.table.schema),
        conn::quote_ident(&config.table.name),
        conn::quote_ident(&mapped.key),
    )
}

/// Publishes every row of the table as of the snapshot, waits until all are
/// acknowledged, then removes the marker and releases the first-start lock.
/// Returns the number of rows, or [`SnapshotError::ShutDown`] when
/// `ensure_topic` says shutdown came first (never `Ok` unless every row was
/// acknowledged and the marker is gone).
pub async fn publish(
    config: &RunConfig,
    sink: &Sink,
    metrics: &Metrics,
    snapshot: &InitialSnapshot,
    mut ensure_topic: impl AsyncFnMut(&str) -> Result<bool, SinkError>,
) -> Result<u64, SnapshotError> {
    let InitialSnapshot {
        client,
        name,
        consistent_point,
    } = snapshot;
    let consistent_point = *consistent_point;
    let relation = describe_table(client, config).await?;
    let layout = EventLayout::new(&relation, &config.mapping).map_err(SourceError::from)?;
    client
        .batch_execute(&declare_cursor(config, &relation))
        .await?;

    let commit_ts = system_time_to_pg(SystemTime::now());
    let txn = Transaction::new(consistent_point, commit_ts);
    let id = sink.begin(commit_ts);
    let mut sent = 0u64;
    metrics.snapshot_running.set(1);
    let running = metrics.snapshot_running.clone();
    // However publishing ends (done, halted, stopped), it no longer runs.
    let _running = scopeguard(move || running.set(0));
    tracing::info!(snapshot = %name, consistent_point = %consistent_point, "publishing the rows that existed when the slot was created");
    loop {
        let rows = client
            .query_within(
                SNAPSHOT_FETCH_TIMEOUT,
                &format!("FETCH {FETCH_ROWS} FROM walrelay_snapshot"),
                &[],
            )
            .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let tuple = (0..row.len())
                .map(|i| {
                    row.get::<_, Option<String>>(i)
                        .map_or(ColumnValue::Null, |text| {
                            ColumnValue::Text(Bytes::from(text))
                        })
                })
                .collect();
            let event = match layout.event(&txn, &tuple) {
                Ok(event) => event,
                Err(reason) => {
                    let row = row_error(&layout, &tuple, consistent_point, reason);
                    poison_row(config, sink, metrics, id, row).await?;
                    sent += 1;
                    metrics.snapshot_rows.inc();
                    continue;
                }
            };
            match ensure_topic(&event.topic).await {
                Ok(true) => {}
                // Shut down meanwhile.
                Ok(false) => return Err(SnapshotError::ShutDown),
                Err(SinkError::TopicMissing(topic)) => {
                    let reason = RowError::TopicMissing(topic);
                    let row = row_error(&layout, &tuple, consistent_point, reason);
                    poison_row(config, sink, metrics, id, row).await?;
                    sent += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            sink.send(id, &event).await?;
            sent += 1;
            metrics.snapshot_rows.inc();
        }
    }
    client.batch_execute("COMMIT").await?;
    sink.commit(id, sent, consistent_point);

    // Only once every row is acknowledged, dead-letter records in place of
    // refused rows included, may the marker go.
    wait_acknowledged(sink, id).await?;
    client
        .execute(
            "SELECT pg_drop_replication_slot($1)",
            &[&marker_name(&config.slot)],
        )
        .await?;
    // The next instance's first start may look now (it finds the slot and
    // resumes). Should this fail, the session is gone, and the lock with it.
    if let Err(error) = client
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&first_start_lock_key(&config.slot)],
        )
        .await
    {
        tracing::debug!(error = %error, "releasing the first-start lock");
    }
    tracing::info!(rows = sent, "initial snapshot published");
    Ok(sent)
}

/// Runs `f` when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn scopeguard<F: FnMut()>(f: F) -> OnDrop<F> {
    OnDrop(f)
}

/// A row of the snapshot that cannot become an event, as `--on-poison` says
/// and as in streaming: counted, then either the end of the run (the marker
/// stays, so the next start begins the snapshot again) or a record on the
/// dead-letter topic in its place, as one event of transaction `id`.
async fn poison_row(
    config: &RunConfig,
    sink: &Sink,
    metrics: &Metrics,
    id: TxnId,
    row: SourceError,
) -> Result<(), SnapshotError> {
    metrics
        .publish_errors
        .with_label_values(&["invalid_row"])
        .inc();
    let (
        Some(_),
        SourceError::Row {
            aggregate,
            seq_nr,
            commit_lsn,
            reason,
        },
    ) = (&config.dead_letter_topic, &row)
    else {
        tracing::warn!(
            "the initial snapshot stops at this row (--on-poison halt); the next start begins it again"
        );
        return Err(row.into());
    };
    let failure = PublishFailure::invalid_row(
        aggregate.clone(),
        seq_nr.clone(),
        *commit_lsn,
        config.mapping.topic.to_string(),
        reason,
    );
    tracing::warn!(aggregate = %failure.aggregate, seq_nr = %failure.seq_nr, lsn = %failure.lsn,
        reason = %failure.reason, "row of the initial snapshot cannot be published; sending it to the dead-letter topic");
    sink.dead_letter(id, &failure).await?;
    Ok(())
}

/// Waits until the snapshot's transaction `id` is fully acknowledged, as the
/// watermark sees it. An empty producer queue is not enough: a row the broker
/// refuses leaves the queue before its dead-letter record, queued by another
/// task, enters it.
async fn wait_acknowledged(sink: &Sink, id: TxnId) -> Result<(), SinkError> {
    let mut report_at = tokio::time::Instant::now() + ACK_WAIT_REPORT;
    while !sink.completed(id) {
        tokio::select! {
            // Refused for good (--on-poison halt): it never completes.
            failure = sink.failed() => return Err(SinkError::Publish(Box::new(failure))),
            () = tokio::time::sleep(ACK_POLL) => {}
        }
        if tokio::time::Instant::now() >= report_at {
            tracing::info!("waiting for the broker to acknowledge the snapshot");
            report_at += ACK_WAIT_REPORT;
        }
    }
    Ok(())
}

/// The table's columns as a Relation, so the snapshot's rows map exactly as
/// streamed rows do.
async fn describe_table(
    client: &crate::pg::metadata::Client,
    config: &RunConfig,
) -> Result<Relation, MetadataError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::oid, a.atttypmod FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&config.table.schema, &config.table.name],
        )
        .await?;
    Ok(Relation {
        oid: 0,
        namespace: config.table.schema.clone(),
        name: config.table.name.clone(),
        replica_identity: ReplicaIdentity::Default,
        columns: rows
            .iter()
            .map(|r| Column {
                flags: 0,
                name: r.get(0),
                type_oid: r.get(1),
                type_modifier: r.get(2),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_key_is_stable_and_differs_per_slot() {
        // Instances of different walrelay versions must agree on it.
        assert_eq!(
            first_start_lock_key("walrelay"),
            first_start_lock_key("walrelay")
        );
        assert_eq!(first_start_lock_key("walrelay"), 0x569c_f4f4_c5a4_84e6);
        assert_ne!(
            first_start_lock_key("walrelay"),
            first_start_lock_key("walrelay_2")
        );
    }
}
