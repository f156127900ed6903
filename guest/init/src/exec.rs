//! One exec: spawn the command in its own process group, relay stdin and output under
//! flow control, enforce the deadline, report how it ended.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nanobox_agent_protocol::pb::{self, exit_status::Status, frame::Body, ErrorCode, OutputFd};
use nanobox_agent_protocol::INITIAL_WINDOW;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::agent::{Agent, DataBuf, Inbound, StreamTx};
use crate::reaper::Exit;

/// After the command exits, output still arriving is relayed until the pipes have been
/// quiet this long. A background child that keeps the pipes open (`sleep 100 &`) must not
/// keep the exec from finishing.
const DRAIN_IDLE: Duration = Duration::from_millis(250);

pub async fn run(
    agent: Arc<Agent>,
    req: pb::ExecRequest,
    stream: StreamTx,
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
) {
    let started = Instant::now();
    let spawned = match spawn(&agent, &req) {
        Ok(s) => s,
        Err((code, message)) => {
            let _ = stream.error(code, message).await;
            return;
        }
    };
    let Spawned {
        pgid,
        exit: exit_rx,
        stdin,
        stdout,
        stderr,
    } = spawned;

    let credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
    let (exited_tx, exited_rx) = watch::channel(false);
    let out_task = tokio::spawn(pump(
        stdout,
        OutputFd::Stdout,
        stream.clone(),
        credit.clone(),
        exited_rx.clone(),
    ));
    let err_task = tokio::spawn(pump(
        stderr,
        OutputFd::Stderr,
        stream.clone(),
        credit.clone(),
        exited_rx,
    ));

    // Stdin is written by its own task so a command that never reads it cannot stall
    // signals, cancellation or the deadline.
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Option<Bytes>>();
    let stdin_task = stdin.map(|pipe| tokio::spawn(feed_stdin(pipe, stdin_rx, stream.clone())));

    let deadline = (req.timeout_ms > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms));
    let mut timed_out = false;
    let mut exit_rx = exit_rx;
    let mut inbound_open = true;

    let exit = loop {
        tokio::select! {
            status = &mut exit_rx => break status.ok(),
            msg = inbound.recv(), if inbound_open => match msg {
                Some(Inbound::Data(data)) => {
                    if stdin_task.is_some() {
                        let _ = stdin_tx.send(Some(data));
                    } else {
                        let _ = stream.grant(data.len()).await;
                    }
                }
                Some(Inbound::Eof) => { let _ = stdin_tx.send(None); }
                Some(Inbound::Window(n)) => credit.add_permits(n as usize),
                Some(Inbound::Signal(signo)) => {
                    if let Ok(sig) = Signal::try_from(signo) {
                        let _ = killpg(pgid, sig);
                    }
                }
                Some(Inbound::Cancel) | None => {
                    // The host gave up on this exec (or went away): nobody will read its
                    // output, so stop it.
                    let _ = killpg(pgid, Signal::SIGKILL);
                    inbound_open = false;
                }
            },
            _ = sleep_until(deadline), if !timed_out => {
                timed_out = true;
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        }
    };
    if timed_out {
        // Leftover members of the group still hold the pipes; they go with the leader.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let _ = exited_tx.send(true);
    // Keep granting output credit while the pumps drain.
    let drain = async {
        let _ = out_task.await;
        let _ = err_task.await;
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            msg = inbound.recv(), if inbound_open => match msg {
                Some(Inbound::Window(n)) => credit.add_permits(n as usize),
                Some(Inbound::Cancel) | None => { inbound_open = false; credit.close(); }
                Some(Inbound::Data(data)) => { let _ = stream.grant(data.len()).await; }
                Some(_) => {}
            },
        }
    }
    if let Some(task) = stdin_task {
        task.abort();
    }
    let status = match exit {
        Some(Exit::Code(code)) => Status::Code(code),
        Some(Exit::Signal(sig)) => Status::Signal(sig),
        None => {
            let _ = stream
                .error(ErrorCode::Internal, "lost the exit status of the command")
                .await;
            return;
        }
    };
    let _ = stream
        .send(Body::Exit(pb::ExitStatus {
            status: Some(status),
            timed_out,
            duration_us: started.elapsed().as_micros() as u64,
        }))
        .await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Spawned {
    pgid: Pid,
    exit: tokio::sync::oneshot::Receiver<Exit>,
    stdin: Option<pipe::Sender>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

fn spawn(agent: &Agent, req: &pb::ExecRequest) -> Result<Spawned, (ErrorCode, String)> {
    let Some(program) = req.argv.first() else {
        return Err((ErrorCode::InvalidArgument, "argv is empty".into()));
    };
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err((
            ErrorCode::InvalidArgument,
            "argv contains a NUL byte".into(),
        ));
    }
    let mut env = if req.clear_env {
        Vec::new()
    } else {
        agent.base_env()
    };
    for kv in &req.env {
        if kv.key.is_empty()
            || kv.key.contains('=')
            || kv.key.contains('\0')
            || kv.value.contains('\0')
        {
            return Err((
                ErrorCode::InvalidArgument,
                format!("invalid environment variable {:?}", kv.key),
            ));
        }
        crate::image::merge(&mut env, &kv.key, &kv.value);
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let resolved = resolve_program(program, path_var)
        .ok_or_else(|| (ErrorCode::NotFound, format!("{program}: command not found")))?;

    let mut cmd = Command::new(resolved);
    cmd.arg0(program)
        .args(&req.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    let cwd = if !req.cwd.is_empty() {
        req.cwd.as_str()
    } else if !agent.image.working_dir.is_empty() {
        agent.image.working_dir.as_str()
    } else {
        "/"
    };
    if !std::path::Path::new(cwd).is_dir() {
        return Err((
            ErrorCode::NotFound,
            format!("working directory {cwd} does not exist"),
        ));
    }
    cmd.current_dir(cwd);
    if let Some(gid) = req.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = req.uid {
        cmd.uid(uid);
    }
    // Its own process group, so a deadline or a signal reaches every descendant.
    cmd.process_group(0);
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());

    let (mut child, exit) = agent.reaper.spawn(&mut cmd).map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorCode::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            _ => ErrorCode::Internal,
        };
        (code, format!("{program}: {e}"))
    })?;
    let pgid = Pid::from_raw(child.id() as i32);
    let internal = |e: std::io::Error| (ErrorCode::Internal, format!("pipe setup: {e}"));
    let stdin = match child.stdin.take() {
        Some(s) => Some(pipe::Sender::from_owned_fd(OwnedFd::from(s)).map_err(internal)?),
        None => None,
    };
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| internal(std::io::Error::other("no stdout")))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| internal(std::io::Error::other("no stderr")))?;
    Ok(Spawned {
        pgid,
        exit,
        stdin,
        stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout)).map_err(internal)?,
        stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr)).map_err(internal)?,
    })
}

/// Looks `program` up in `path` the way execvp does, so that "command not found" is an
/// error reply rather than a child that fails after fork.
fn resolve_program(program: &str, path: Option<&str>) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &std::path::Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return p.exists().then_some(p);
    }
    path.unwrap_or(crate::image::DEFAULT_PATH)
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| is_exec(p))
}

async fn pump(
    mut pipe: pipe::Receiver,
    fd: OutputFd,
    stream: StreamTx,
    credit: Arc<Semaphore>,
    mut exited: watch::Receiver<bool>,
) {
    loop {
        let mut buf = DataBuf::new();
        let read = tokio::select! {
            r = pipe.read_buf(buf.reader()) => r,
            _ = idle_after_exit(&mut exited) => break,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Wait for the host to have room for this chunk: this is the backpressure that
        // keeps a fast producer from filling host memory.
        match credit.acquire_many(n as u32).await {
            Ok(permit) => permit.forget(),
            Err(_) => return, // the host cancelled the stream
        }
        if !stream.send_data(fd as i32, buf).await {
            return;
        }
    }
    let _ = stream.send(Body::Eof(pb::Eof { fd: fd as i32 })).await;
}

/// Resolves once the command has exited and the pipe has then been idle for DRAIN_IDLE.
async fn idle_after_exit(exited: &mut watch::Receiver<bool>) {
    if exited.wait_for(|done| *done).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(DRAIN_IDLE).await;
}

async fn feed_stdin(
    mut pipe: pipe::Sender,
    mut rx: mpsc::UnboundedReceiver<Option<Bytes>>,
    stream: StreamTx,
) {
    let mut broken = false;
    while let Some(Some(data)) = rx.recv().await {
        if !broken && pipe.write_all(&data).await.is_err() {
            // The command closed its stdin; keep taking (and discarding) what the host
            // sends so it is not left waiting for credit.
            broken = true;
        }
        if !stream.grant(data.len()).await {
            return;
        }
    }
    // Eof (or the exec ended): dropping the pipe closes the command's stdin.
}
