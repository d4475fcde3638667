//! `walrelay tail`: the events table's committed inserts as JSON lines, in
//! the message contract, from a temporary slot.
//!
//! It is the operator's `kcat` for the source side: it shows what walrelay
//! would publish without touching the service's own slot (a TEMPORARY slot
//! vanishes when the session ends) or any broker. It confirms its slot after
//! each printed transaction, so a long tail does not pin WAL.
use std::future::Future;
use std::io::{self, Write};

use crate::event::{Event, Mapping, TableName, ValueKind};
use crate::pg::conn::{self, ConnError, Feedback, SnapshotAction};
use crate::pg::lsn::Lsn;
use crate::pg::metadata::{self, MetadataError, SetupError};
use crate::pg::params::ConnectParams;
use crate::pg::primary::{self, NoPrimary};
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
    /// How rows become events, and the topic each is shown with.
    pub mapping: Mapping,
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
    /// No host of the URL is a primary.
    #[error(transparent)]
    NoPrimary(#[from] NoPrimary),
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
    // The primary among the URL's hosts, for both connections.
    let ((mut repl, _), host) = primary::replication(&options.postgres, None).await?;
    let client = metadata::connect(&host).await?;
    metadata::verify_source(
        &client,
        &options.publication,
        &options.table,
        &options.mapping.needed_columns(),
    )
    .await?;
    drop(client);

    let timing =
        conn::StreamTiming::from_wal_sender_timeout(&repl.show("wal_sender_timeout").await?);
    let anchor = source::anchor(&mut repl, &options.table)
        .await?
        .ok_or_else(|| SourceError::TableMissing(options.table.clone()))?;
    let slot_name = format!("walrelay_tail_{}", repl.backend_pid());
    let slot = repl
        .create_logical_slot(&slot_name, true, SnapshotAction::Discard)
        .await?;
    let pgoutput = source::pgoutput_options(repl.server_version(), &options.publication);
    let mut stream = repl
        .start_logical(&slot.name, Lsn::ZERO, &pgoutput)
        .await?
        // A temporary slot of its own: nobody else moved it since its creation.
        .report(Feedback::new(slot.consistent_point), timing);
    tracing::info!(slot = %slot.name, start = %slot.consistent_point, table = %options.table, "tailing");

    let mut source = Source::new(options.table.clone(), options.mapping.clone(), anchor);
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
/// `{"topic": ..., "key": ..., "headers": {...}, "value": ...}`. A JSON
/// value is embedded as JSON, a text one as a string, a binary one as a
/// string in bytea's hex form (`\x0a03ff`), as psql shows a bytea.
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
    let value = &event.value;
    match event.value_kind {
        // JSON text from a json or jsonb column, or checked; should it not
        // parse, it is shown as a string rather than break the line.
        ValueKind::Json
            if serde_json::from_slice::<&serde_json::value::RawValue>(value).is_ok() =>
        {
            out.write_all(value)?;
        }
        ValueKind::Json | ValueKind::Text => {
            serde_json::to_writer(&mut *out, &String::from_utf8_lossy(value))?;
        }
        ValueKind::Binary => {
            let hex: String = std::iter::once("\\x".to_owned())
                .chain(value.iter().map(|b| format!("{b:02x}")))
                .collect();
            serde_json::to_writer(&mut *out, &hex)?;
        }
    }
    out.write_all(b"}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn event(value: &'static [u8], value_kind: ValueKind) -> Event {
        Event {
            topic: "events".into(),
            key: Bytes::from_static(b"order-\"1\""),
            seq: Some(Bytes::from_static(b"7")),
            value: Bytes::from_static(value),
            value_kind,
            headers: vec![
                (Arc::from("seq_nr"), Bytes::from_static(b"7")),
                (Arc::from("lsn"), Bytes::from_static(b"0/16B3748")),
            ],
            commit_lsn: Lsn(0x16B_3748),
            invalid_trace_context: None,
        }
    }

    fn line(e: &Event) -> String {
        let mut out = Vec::new();
        write_event(&mut out, e).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_the_contract_as_one_json_line() {
        let text = line(&event(b"{\"total\": 12.5}", ValueKind::Json));
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        assert_eq!(
            text,
            "{\"topic\":\"events\",\"key\":\"order-\\\"1\\\"\",\"headers\":{\"seq_nr\":\"7\",\"lsn\":\"0/16B3748\"},\"value\":{\"total\": 12.5}}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["value"]["total"], 12.5);
    }

    #[test]
    fn text_values_become_strings_and_binary_ones_bytea_hex() {
        let value = |v, kind| {
            serde_json::from_str::<serde_json::Value>(&line(&event(v, kind))).unwrap()["value"]
                .clone()
        };
        assert_eq!(value(b"not json", ValueKind::Json), "not json");
        assert_eq!(value(b"{\"a\":1}", ValueKind::Text), "{\"a\":1}");
        assert_eq!(value(b"{\"a\":1}", ValueKind::Json)["a"], 1);
        assert_eq!(value(&[0x0a, 0x03, 0xff], ValueKind::Binary), "\\x0a03ff");
        assert_eq!(value(b"", ValueKind::Binary), "\\x");
    }
}
