//! Logging: JSON lines or human-readable text on stderr, filtered by `RUST_LOG`.

use std::fmt;
use std::io::IsTerminal;

use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{JsonVisitor, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): JSON lines unless `pretty` is asked for
/// or stderr is a terminal.
pub fn init_tracing(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match json {
        true => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(SpanJsonFields)
            .try_init(),
        false => builder.try_init(),
    };
}

/// A span's fields as one JSON object, which a later `Span::record` extends in place.
/// tracing-subscriber's `JsonFields` parses the object and writes it anew at every `record`; each
/// request records two or three fields, and that re-parsing was ~6% of the request workers' CPU.
#[derive(Debug, Default)]
pub struct SpanJsonFields;

impl<'writer> FormatFields<'writer> for SpanJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        json_object(&mut writer, fields)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        json_object(&mut added, fields)?;
        extend_object(&mut current.fields, &added);
        Ok(())
    }
}

fn json_object(writer: &mut dyn fmt::Write, fields: impl RecordFields) -> fmt::Result {
    let mut visitor = JsonVisitor::new(writer);
    fields.record(&mut visitor);
    visitor.finish()
}

/// Adds the members of JSON object `added` to JSON object `object`, both as text. A key in both
/// then appears twice; readers of JSON (serde_json, which the JSON formatter reads span fields
/// with, among them) keep the later value, as the replaced value would be.
fn extend_object(object: &mut String, added: &str) {
    let Some(members) = added.strip_prefix('{').and_then(|a| a.strip_suffix('}')) else {
        return;
    };
    if members.is_empty() {
        return;
    }
    match object.strip_suffix('}') {
        Some(open) => {
            let empty = open.trim_end() == "{";
            object.pop();
            if !empty {
                object.push(',');
            }
            object.push_str(members);
            object.push('}');
        }
        None => *object = added.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn extended(object: &str, added: &str) -> Value {
        let mut object = object.to_owned();
        extend_object(&mut object, added);
        serde_json::from_str(&object).unwrap_or_else(|e| panic!("not JSON ({e}): {object}"))
    }

    #[test]
    fn recorded_fields_join_the_object_and_a_repeated_key_keeps_its_last_value() {
        assert_eq!(
            extended(r#"{"a":1}"#, r#"{"b":"x"}"#),
            json!({"a": 1, "b": "x"})
        );
        assert_eq!(
            extended(r#"{"a":1,"b":2}"#, r#"{"b":3}"#),
            json!({"a": 1, "b": 3})
        );
        assert_eq!(extended("{}", r#"{"b":3}"#), json!({"b": 3}));
        assert_eq!(extended("", r#"{"b":3}"#), json!({"b": 3}));
        assert_eq!(extended(r#"{"a":1}"#, "{}"), json!({"a": 1}));
    }

    #[test]
    fn a_span_logs_the_fields_recorded_after_it_was_created() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::fmt::MakeWriter;

        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> MakeWriter<'a> for Lines {
            type Writer = Lines;
            fn make_writer(&'a self) -> Lines {
                self.clone()
            }
        }

        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(SpanJsonFields)
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                request_id = "r1",
                event_id = tracing::field::Empty,
                outcome = tracing::field::Empty,
                status = tracing::field::Empty
            );
            let _entered = span.enter();
            span.record("event_id", "event_1");
            span.record("outcome", "applied");
            span.record("outcome", "duplicate");
            tracing::info!(n = 2, "webhook delivered");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            line["fields"],
            json!({"message": "webhook delivered", "n": 2})
        );
        assert_eq!(
            line["span"],
            json!({"name": "request", "request_id": "r1", "event_id": "event_1", "outcome": "duplicate"})
        );
    }
}
