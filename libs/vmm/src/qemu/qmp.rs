//! A minimal QMP (QEMU Machine Protocol) client: newline-delimited JSON over a Unix socket.
//!
//! Replies and asynchronous events share the socket; `execute` skips events until its
//! reply. Lines are bounded: QEMU runs guest-facing device emulation, so a compromised
//! QEMU is not trusted to send sane output either.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::VmmError;

const MAX_LINE: usize = 1 << 20;
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| VmmError::io(format!("connecting to QMP at {}", path.display()), e))?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Control(format!(
                "unexpected QMP greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = Vec::new();
        let read = async {
            loop {
                let buf = self.reader.fill_buf().await?;
                if buf.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "QMP closed",
                    ));
                }
                let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (buf.len(), false),
                };
                line.extend_from_slice(&buf[..take]);
                self.reader.consume(take);
                if line.len() > MAX_LINE {
                    return Err(std::io::Error::other("QMP message too long"));
                }
                if done {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(QMP_TIMEOUT, read)
            .await
            .map_err(|_| VmmError::Timeout(QMP_TIMEOUT, "QMP"))?
            .map_err(|e| VmmError::Control(format!("QMP read: {e}")))?;
        serde_json::from_slice(&line)
            .map_err(|e| VmmError::Control(format!("QMP sent invalid JSON: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| VmmError::Control(format!("QMP write: {e}")))?;
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(VmmError::Control(format!("QMP {command}: {desc}")));
            }
            // An asynchronous event: not ours.
        }
    }

    /// `query-status`: "running", "paused", ...
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }
}
