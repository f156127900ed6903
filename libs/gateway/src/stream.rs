//! Server-streaming methods over REST: newline-delimited JSON (one `{"result": ...}` per
//! message, `{"error": {"code", "message"}}` if the stream fails after it started), and,
//! for `Sandboxes.Exec`, the aggregated answer `{stdout, stderr, exit_code, ...}` with the
//! collected output bounded.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use prost_reflect::{DynamicMessage, ReflectMessage as _, Value as PValue};
use serde_json::{json, Value};
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};

use crate::status::{code_name, ApiError};
use crate::transcode::message_json;

/// The message type of exec events; methods streaming it can be aggregated.
pub const EXEC_EVENT: &str = "nanobox.v1.ExecEvent";

/// The media type of the streamed form.
pub const NDJSON: &str = "application/x-ndjson";

/// Turns a gRPC stream into newline-delimited JSON lines. The stream ends at `deadline`
/// with a `DEADLINE_EXCEEDED` error line if the upstream has not ended it by then.
pub fn ndjson(
    stream: Streaming<DynamicMessage>,
    deadline: Instant,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let (line, more) = match next {
            Ok(Some(Ok(message))) => match message_json(&message) {
                Ok(v) => (json!({ "result": v }), true),
                Err(e) => (error_line(&e.code, &e.message), false),
            },
            Ok(Some(Err(status))) => (error_line(&status.code(), status.message()), false),
            Ok(None) => return None,
            Err(_) => (
                error_line(
                    &Code::DeadlineExceeded,
                    "the stream ran past the gateway's deadline",
                ),
                false,
            ),
        };
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        Some((Ok(Bytes::from(bytes)), more.then_some(stream)))
    })
}

fn error_line(code: &Code, message: &str) -> Value {
    json!({ "error": { "code": code_name(*code), "message": message } })
}

/// The output of one stream (stdout or stderr), kept up to a limit.
#[derive(Debug, Default)]
struct Collected {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Collected {
    fn push(&mut self, chunk: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.bytes.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// How long an aggregated exec waits, after the exit, for the end of its stream.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Collects an exec stream into one answer:
///
/// ```json
/// {"stdout": "...", "stderr": "...", "exit_code": 0, "signal": 0, "timed_out": false,
///  "duration_ms": 41, "stdout_truncated": false, "stderr_truncated": false}
/// ```
///
/// Output is decoded as UTF-8 (invalid sequences become U+FFFD) and each stream keeps at
/// most `limit` bytes; the rest is read and dropped (so the command still runs to its end
/// and its exit is reported) and `*_truncated` says so. Fails `DEADLINE_EXCEEDED` at
/// `deadline`, with the upstream's error if the stream fails, and `UNAVAILABLE` if it ends
/// without an exit.
pub async fn aggregate_exec(
    mut stream: Streaming<DynamicMessage>,
    limit: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Value, ApiError> {
    let mut stdout = Collected::default();
    let mut stderr = Collected::default();
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    Code::DeadlineExceeded,
                    format!(
                        "the command did not finish within {} s; use the streaming form \
                         (`Accept: {NDJSON}` or `?stream=true`) or a `timeout_ms` for long commands",
                        timeout.as_secs()
                    ),
                )
            })?;
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(status)) => return Err(ApiError::from(status)),
            None => {
                return Err(ApiError::from(Status::unavailable(
                    "the exec stream ended without the command's exit status",
                )))
            }
        };
        if let Some(chunk) = bytes_field(&event, "stdout") {
            stdout.push(&chunk, limit);
        } else if let Some(chunk) = bytes_field(&event, "stderr") {
            stderr.push(&chunk, limit);
        } else if let Some(exit) = message_field(&event, "exit") {
            let exit = message_json(&exit)?;
            let number = |name: &str| -> Value {
                match exit.get(name) {
                    // 64-bit integers arrive as strings in the proto3 mapping; this answer
                    // is the gateway's own shape and has them as numbers.
                    Some(Value::String(s)) => s.parse::<u64>().map_or(Value::Null, Value::from),
                    Some(v) => v.clone(),
                    None => Value::from(0),
                }
            };
            // The exit is the last event; reading on to the end of the stream takes the
            // call's OK status instead of cancelling the call, which upstream metrics and
            // traces would count as CANCELLED. Bounded: nothing waits long for it.
            let drain = deadline.min(Instant::now() + DRAIN_AFTER_EXIT);
            let _ = tokio::time::timeout_at(drain, async {
                while let Some(Ok(_)) = stream.next().await {}
            })
            .await;
            return Ok(json!({
                "stdout": stdout.text(),
                "stderr": stderr.text(),
                "exit_code": number("exit_code"),
                "signal": number("signal"),
                "timed_out": exit.get("timed_out").cloned().unwrap_or(Value::Bool(false)),
                "duration_ms": number("duration_ms"),
                "stdout_truncated": stdout.truncated,
                "stderr_truncated": stderr.truncated,
            }));
        }
    }
}

fn bytes_field(event: &DynamicMessage, name: &str) -> Option<Bytes> {
    let field = event.descriptor().get_field_by_name(name)?;
    if !event.has_field(&field) {
        return None;
    }
    match event.get_field(&field).as_ref() {
        PValue::Bytes(b) => Some(b.clone()),
        _ => None,
    }
}

fn message_field(event: &DynamicMessage, name: &str) -> Option<DynamicMessage> {
    let field = event.descriptor().get_field_by_name(name)?;
    if !event.has_field(&field) {
        return None;
    }
    event.get_field(&field).as_message().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_output_is_bounded() {
        let mut c = Collected::default();
        c.push(b"hello ", 8);
        c.push(b"world", 8);
        assert_eq!(c.text(), "hello wo");
        assert!(c.truncated);
        c.push(b"more", 8);
        assert_eq!(c.bytes.len(), 8);
        let mut c = Collected::default();
        c.push(&[0x66, 0xff, 0x6f], 8);
        assert_eq!(c.text(), "f\u{fffd}o");
        assert!(!c.truncated);
    }
}
