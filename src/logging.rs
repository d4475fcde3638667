//! Log lines on standard error: human-readable text, or one flat JSON object
//! per line for a log pipeline.
//!
//! A JSON line holds the message and every field of the event at the top
//! level (tracing-subscriber's JSON format with `flatten_event`), plus
//! `version` on every line and `slot` on every line from the moment the slot
//! is known (a configuration error found before has none), so that the lines
//! of several instances and slots can be told apart without parsing text:
//!
//! ```text
//! {"addr":"0.0.0.0:9643","level":"INFO","message":"starting","slot":"walrelay","target":"walrelay::service","timestamp":"2026-05-04T09:12:44.120931Z","topic":"events","version":"0.1.0", ...}
//! ```
use std::fmt;
use std::io::IsTerminal;
use std::sync::{Arc, PoisonError, RwLock};

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;
use crate::metrics::VERSION;

/// What every JSON line carries besides the event: set once known.
#[derive(Debug, Clone, Default)]
pub struct LogContext {
    slot: Arc<RwLock<Option<String>>>,
}

impl LogContext {
    /// The replication slot the lines are about, from now on.
    pub fn set_slot(&self, slot: &str) {
        *self.slot.write().unwrap_or_else(PoisonError::into_inner) = Some(slot.to_owned());
    }

    fn slot(&self) -> Option<String> {
        self.slot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Sets up logging on standard error in `format`, filtered by `WALRELAY_LOG`
/// (`info` by default); returns the context JSON lines carry.
pub fn init(format: LogFormat) -> LogContext {
    let context = LogContext::default();
    let filter = EnvFilter::try_from_env("WALRELAY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(flat_json(context.clone()))
            .init(),
    }
    context
}

/// The JSON line format: flat, with `version` and `slot`.
pub fn flat_json(context: LogContext) -> WithContext {
    WithContext {
        inner: tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_span_list(false),
        context,
    }
}

/// tracing-subscriber's flat JSON line, with the context's fields added.
pub struct WithContext {
    inner: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    context: LogContext,
}

impl<S, N> FormatEvent<S, N> for WithContext
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(line.trim_end())
        else {
            // Not an object (it always is): the line as formatted.
            return writer.write_str(&line);
        };
        object.entry("version").or_insert_with(|| VERSION.into());
        if let Some(slot) = self.context.slot() {
            // An event's own `slot` field says the same, or more precisely.
            object.entry("slot").or_insert_with(|| slot.into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer that keeps what is written.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_are_flat_and_carry_version_and_slot() {
        let captured = Captured::default();
        let writer = captured.clone();
        let context = LogContext::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(flat_json(context.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("invalid configuration: --slot: bad");
            context.set_slot("orders");
            tracing::info!(addr = "127.0.0.1:9643", retries = 3_u64, "starting");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        // Before the slot is known: the version only.
        assert_eq!(lines[0]["message"], "invalid configuration: --slot: bad");
        assert_eq!(lines[0]["level"], "ERROR");
        assert_eq!(lines[0]["version"], VERSION);
        assert!(lines[0].get("slot").is_none(), "{text}");
        // Message and fields at the top level, with slot and version.
        assert_eq!(lines[1]["message"], "starting");
        assert_eq!(lines[1]["addr"], "127.0.0.1:9643");
        assert_eq!(lines[1]["retries"], 3);
        assert_eq!(lines[1]["slot"], "orders");
        assert_eq!(lines[1]["version"], VERSION);
        assert!(lines[1].get("fields").is_none(), "{text}");
        assert!(lines[1]["timestamp"].is_string() && lines[1]["target"].is_string());
    }
}
