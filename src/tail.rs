//! `walrelay tail`: the events table's committed inserts as JSON lines, in
//! the message contract, from a temporary slot.
//!
//! It is the operator's `kcat` for the source side: it shows what walrelay
//! would publish without touching the service's own slot (a TEMPORARY slot
//! vanishes when the session ends) or any broker. It confirms its slot after
//! each printed transaction, so a long tail does not pin WAL.
use std::future::Future;
use std::io::{self, Write};

use crate::event::{Event, TableName, TopicTemplate};
use crate::pg::conn::{self, ConnError, Feedback, ReplicationConnection, SnapshotAction};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, MetadataError, SetupError};
use crate::pg::params::ConnectParams;
use crate::source::{self, Source, SourceError, Step};

/// What `tail` reads.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// The server.
    pub postgres: ConnectParams,
    /// The publication to stream.
    pub publication: String,
    /// The events table.
    pub table: TableName,
    /// The topic each event is shown with.
    pub topic: TopicTemplate,
}

/// Why `tail` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The metadata connection failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The replication connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The server or the publication is not set up for streaming.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The stream could not be followed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// Streams until `shutdown` completes or an error occurs. A closed output
/// (`walrelay tail | head`) ends it cleanly.
pub async fn run<W: Write>(
    options: &TailOptions,
    mut out: W,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TailError> {
    let client = metadata::connect(&options.postgres).await?;
    metadata::verify_source(&client, &options.publication, &options.table).await?;
    drop(client);

    let mut repl = ReplicationConnection::connect(&options.postgres).await?;
    let timing =
        conn::StreamTiming::from_wal_sender_timeout(&repl.show("wal_sender_timeout").await?);
    let anchor = source::anchor(&mut repl, &options.table)
        .await?
        .ok_or_else(|| SourceError::TableMissing(options.table.clone()))?;
    let slot_name = format!("walrelay_tail_{}", repl.backend_pid());
    let slot = repl
        .create_logical_slot(&slot_name, true, SnapshotAction::Discard)
        .await?;
    let publications = conn::quote_ident(&options.publication);
    let mut stream = repl
        .start_logical(
            &slot.name,
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", &publications)],
        )
        .await?
        // A temporary slot of its own: nobody else moved it since its creation.
        .report(Feedback::new(slot.consistent_point), timing);
    tracing::info!(slot = %slot.name, start = %slot.consistent_point, table = %options.table, "tailing");

    let mut source = Source::new(options.table.clone(), options.topic.clone(), anchor);
    tokio::pin!(shutdown);
    let result = loop {
        let message = tokio::select! {
            biased;
            // Ctrl-C or SIGTERM: stop reading; what was printed is confirmed below.
            () = &mut shutdown => break Ok(()),
            // The next message; cancel-safe, so nothing is lost to the shutdown arm.
            message = stream.next() => message,
        };
        let step = match message {
            Ok(message) => source.step(message),
            Err(e) => break Err(e.into()),
        };
        let outcome = match step {
            Ok(Step::Event(event)) => write_event(&mut out, &event),
            Ok(Step::Commit { end_lsn, .. }) => {
                // Printed and flushed: the transaction is handled.
                out.flush().map(|()| stream.feedback().confirm(end_lsn))
            }
            Ok(Step::Idle { wal_end }) => {
                // Nothing is pending outside a transaction.
                stream.feedback().confirm(wal_end);
                Ok(())
            }
            Ok(Step::Unexpected(change)) => {
                tracing::warn!(kind = change.kind, lsn = %change.commit_lsn,
                    "the append-only events table was changed by other than INSERT; not shown");
                Ok(())
            }
            Ok(Step::Nothing | Step::Begin { .. } | Step::Received { .. }) => Ok(()),
            Err(e) => break Err(e.into()),
        };
        match outcome {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(TailError::Output(e)),
        }
    };
    // Bounded: on a stalled network even the goodbye may not get through
    // (the temporary slot goes with the connection either way).
    let limit = &options.postgres.requests;
    let closed = limit.run("the final status update", stream.close()).await;
    result?;
    closed.map_err(ConnError::from)??;
    Ok(())
}

/// Writes `event` as one JSON line in the `tail` format:
/// `{"topic": ..., "key": ..., "headers": {...}, "value": ...}`.
pub fn write_event(out: &mut impl Write, event: &Event) -> io::Result<()> {
    out.write_all(b"{\"topic\":")?;
    serde_json::to_writer(&mut *out, &event.topic)?;
    out.write_all(b",\"key\":")?;
    serde_json::to_writer(&mut *out, &String::from_utf8_lossy(&event.key))?;
    out.write_all(b",\"headers\":{")?;
    for (i, (name, value)) in event.headers.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut *out, &**name)?;
        out.write_all(b":")?;
        serde_json::to_writer(&mut *out, &String::from_utf8_lossy(value))?;
    }
    out.write_all(b"},\"value\":")?;
    match &event.value {
        None => out.write_all(b"null")?,
        // The value is JSON (walrelay checks it); anything else would become a string.
        Some(v) if serde_json::from_slice::<&serde_json::value::RawValue>(v).is_ok() => {
            out.write_all(v)?;
        }
        Some(v) => serde_json::to_writer(&mut *out, &String::from_utf8_lossy(v))?,
    }
    out.write_all(b"}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn event(value: Option<&'static str>) -> Event {
        Event {
            topic: "events".into(),
            key: Bytes::from_static(b"order-\"1\""),
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
            headers: vec![
                (Arc::from("seq_nr"), Bytes::from_static(b"7")),
                (Arc::from("lsn"), Bytes::from_static(b"0/16B3748")),
            ],
            commit_lsn: Lsn(0x16B_3748),
        }
    }

    fn line(e: &Event) -> String {
        let mut out = Vec::new();
        write_event(&mut out, e).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_the_contract_as_one_json_line() {
        let text = line(&event(Some("{\"total\": 12.5}")));
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        assert_eq!(
            text,
            "{\"topic\":\"events\",\"key\":\"order-\\\"1\\\"\",\"headers\":{\"seq_nr\":\"7\",\"lsn\":\"0/16B3748\"},\"value\":{\"total\": 12.5}}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["value"]["total"], 12.5);
    }

    #[test]
    fn non_json_values_become_strings_and_null_stays_null() {
        let parsed: serde_json::Value =
            serde_json::from_str(&line(&event(Some("not json")))).unwrap();
        assert_eq!(parsed["value"], "not json");
        let parsed: serde_json::Value = serde_json::from_str(&line(&event(None))).unwrap();
        assert!(parsed["value"].is_null());
    }
}
