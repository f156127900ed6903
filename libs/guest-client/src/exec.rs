//! Exec streams: run a command in the guest, stream its output, feed its stdin.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nanobox_agent_protocol::pb::{self, exit_status::Status, frame::Body, ErrorCode, OutputFd};
use nanobox_agent_protocol::MAX_DATA_CHUNK;
use tokio::sync::Semaphore;

use crate::client::{AgentClient, Event, OpenStream, Shared};
use crate::AgentError;

/// After the guest's own deadline for an exec, how long the host waits for the guest to
/// report it before giving up on the guest.
const HOST_DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// A command to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in PATH when it has no '/'.
    pub argv: Vec<String>,
    /// Set on top of the image's environment (or instead of it with `clear_env`).
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    /// Working directory; `None` means the image's WorkingDir.
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Kill the command's whole process group after this long.
    pub timeout: Option<Duration>,
    /// Open a stdin pipe (else the command reads /dev/null).
    pub stdin: bool,
}

impl ExecRequest {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub outcome: ExitOutcome,
    /// The command ran past its timeout and was killed.
    pub timed_out: bool,
    /// Run time measured in the guest.
    pub duration: Duration,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self.outcome {
            ExitOutcome::Code(c) => c,
            ExitOutcome::Signal(s) => 128 + s,
        }
    }

    pub fn success(&self) -> bool {
        self.outcome == ExitOutcome::Code(0) && !self.timed_out
    }
}

/// One piece of an exec's life, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// Everything an exec printed, with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// A running exec. Dropping it before the exit status arrived kills the command.
#[derive(Debug)]
pub struct ExecStream {
    stream: OpenStream,
    stdin: Option<ExecStdin>,
    deadline: Option<tokio::time::Instant>,
    exited: bool,
}

/// The command's stdin. Writes wait for the guest's flow-control credit.
#[derive(Debug)]
pub struct ExecStdin {
    id: u64,
    shared: Arc<Shared>,
    credit: Arc<Semaphore>,
    closed: bool,
}

impl ExecStdin {
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), AgentError> {
        if self.closed {
            return Err(AgentError::InvalidRequest("stdin already closed".into()));
        }
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA_CHUNK);
            self.credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| self.shared.disconnected())?
                .forget();
            self.shared
                .send(
                    self.id,
                    Body::Data(pb::Data {
                        fd: OutputFd::Unspecified as i32,
                        data: Bytes::copy_from_slice(&data[..n]),
                    }),
                )
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes the command's stdin (it reads end-of-file).
    pub async fn close(mut self) -> Result<(), AgentError> {
        self.closed = true;
        self.shared
            .send(self.id, Body::Eof(pb::Eof { fd: 0 }))
            .await
    }
}

impl AgentClient {
    /// Starts a command in the guest.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        if req.argv.is_empty() {
            return Err(AgentError::InvalidRequest("argv is empty".into()));
        }
        let want_stdin = req.stdin;
        let deadline = req
            .timeout
            .map(|t| tokio::time::Instant::now() + t + HOST_DEADLINE_GRACE);
        let stream = self
            .open(Body::Exec(pb::ExecRequest {
                argv: req.argv,
                env: req
                    .env
                    .into_iter()
                    .map(|(key, value)| pb::KeyValue { key, value })
                    .collect(),
                clear_env: req.clear_env,
                cwd: req.cwd.unwrap_or_default(),
                uid: req.uid,
                gid: req.gid,
                timeout_ms: req.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                stdin: want_stdin,
            }))
            .await?;
        let stdin = want_stdin.then(|| ExecStdin {
            id: stream.id,
            shared: stream.shared.clone(),
            credit: stream.outbound.clone(),
            closed: false,
        });
        Ok(ExecStream {
            stream,
            stdin,
            deadline,
            exited: false,
        })
    }

    /// Runs a command to completion and collects its output, failing if stdout plus
    /// stderr exceed `max_output` bytes (the command is then killed).
    pub async fn run(&self, req: ExecRequest, max_output: usize) -> Result<ExecOutput, AgentError> {
        self.exec(req).await?.collect(max_output).await
    }
}

impl ExecStream {
    /// The stdin writer, if the request asked for one (once).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Sends a signal to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.stream
            .send(Body::Signal(pb::SignalRequest { signal }))
            .await
    }

    /// The next event; `Ok(None)` after the exit status has been returned.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.exited {
            return Ok(None);
        }
        loop {
            let event = match self.deadline {
                Some(at) => match tokio::time::timeout_at(at, self.stream.next()).await {
                    Ok(ev) => ev?,
                    Err(_) => {
                        return Err(AgentError::Timeout(HOST_DEADLINE_GRACE));
                    }
                },
                None => self.stream.next().await?,
            };
            match event {
                Event::Data(fd, data) => {
                    // The chunk is the caller's now: let the guest send the next one.
                    self.stream.grant(data.len()).await?;
                    return Ok(Some(match fd {
                        OutputFd::Stderr => ExecEvent::Stderr(data),
                        _ => ExecEvent::Stdout(data),
                    }));
                }
                Event::Eof => continue,
                Event::Done(Body::Exit(exit)) => {
                    self.exited = true;
                    let outcome = match exit.status {
                        Some(Status::Code(c)) => ExitOutcome::Code(c),
                        Some(Status::Signal(s)) => ExitOutcome::Signal(s),
                        None => {
                            return Err(AgentError::Protocol("exit status without a status".into()))
                        }
                    };
                    return Ok(Some(ExecEvent::Exit(ExitStatus {
                        outcome,
                        timed_out: exit.timed_out,
                        duration: Duration::from_micros(exit.duration_us),
                    })));
                }
                Event::Done(Body::Error(e)) => {
                    self.exited = true;
                    return Err(AgentError::Remote {
                        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                        message: e.message,
                    });
                }
                Event::Done(other) => {
                    return Err(AgentError::Protocol(format!(
                        "unexpected reply to exec: {}",
                        format!("{other:?}").chars().take(80).collect::<String>()
                    )))
                }
            }
        }
    }

    /// Collects all output until exit. More than `max_output` bytes in total is an error
    /// (and dropping the stream kills the command).
    pub async fn collect(mut self, max_output: usize) -> Result<ExecOutput, AgentError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(event) = self.next().await? {
            match event {
                ExecEvent::Stdout(d) => stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => stderr.extend_from_slice(&d),
                ExecEvent::Exit(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
            }
            if stdout.len() + stderr.len() > max_output {
                return Err(AgentError::Remote {
                    code: ErrorCode::ResourceExhausted,
                    message: format!("output exceeded {max_output} bytes"),
                });
            }
        }
        Err(AgentError::Protocol(
            "exec ended without an exit status".into(),
        ))
    }
}
