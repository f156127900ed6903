//! The connection: handshake, one reader task that demultiplexes frames into streams, one
//! writer task, and the simple request/response operations (info, configure, shutdown,
//! file transfer). Exec lives in `exec.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use nanobox_agent_protocol::pb::{self, frame::Body, ErrorCode, Frame};
use nanobox_agent_protocol::{FrameCodec, INITIAL_WINDOW, MAX_DATA_CHUNK, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::AgentError;

/// How often the handshake repeats `Hello` while waiting for the agent.
const HELLO_INTERVAL: Duration = Duration::from_millis(200);

/// Most credit the guest may hold for sending us bulk data on one stream... and the most
/// credit we accept from it: a guest granting absurd windows is broken or hostile.
const MAX_OUTBOUND_CREDIT: usize = 64 << 20;

/// One event of a stream, as the reader task delivers it.
#[derive(Debug)]
pub(crate) enum Event {
    Data(pb::OutputFd, Bytes),
    Eof,
    Done(Body),
}

#[derive(Debug)]
struct Slot {
    tx: mpsc::UnboundedSender<Event>,
    /// Bulk bytes the guest may still send us (the window we granted, less what came).
    inbound_credit: u64,
    /// Credit the guest granted us for sending it bulk data.
    outbound: Arc<Semaphore>,
    /// Eof already seen per fd (a repeated Eof is dropped, so a guest cannot queue
    /// unbounded events).
    eof_seen: [bool; 3],
}

#[derive(Debug)]
pub(crate) struct Shared {
    out: mpsc::Sender<Frame>,
    slots: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
    /// Set once the connection is gone, with the reason.
    closed: watch::Sender<Option<String>>,
}

/// A connection to one guest agent. Clones share the connection; many operations may run
/// at once. The connection closes when the last clone and the last open stream are gone.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub(crate) shared: Arc<Shared>,
    ready: Arc<pb::Ready>,
    life: Arc<Lifetime>,
}

/// Ends the connection's reader (and so the connection) when the last user lets go. The
/// reader task itself only holds `Shared`, which would otherwise keep it alive forever.
#[derive(Debug)]
pub(crate) struct Lifetime {
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        if let Some(tx) = self
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = tx.send(());
        }
    }
}

/// A stream this side opened; dropping it before it finished cancels it in the guest.
#[derive(Debug)]
pub(crate) struct OpenStream {
    pub(crate) id: u64,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    pub(crate) outbound: Arc<Semaphore>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) finished: bool,
    /// Consumed bytes not yet returned to the guest as credit (see `grant`).
    pending_grant: usize,
    _life: Arc<Lifetime>,
}

/// Credit goes back to the guest in batches of this size: each WindowUpdate costs the
/// guest an interrupt and a wake-up, which under emulation is far from free. A quarter of
/// the window keeps the guest streaming while it waits.
const GRANT_BATCH: usize = INITIAL_WINDOW as usize / 4;

impl OpenStream {
    /// Next event; a closed connection surfaces as `Disconnected`.
    pub(crate) async fn next(&mut self) -> Result<Event, AgentError> {
        match self.events.recv().await {
            Some(ev) => {
                if let Event::Done(_) = ev {
                    self.finished = true;
                }
                Ok(ev)
            }
            None => {
                self.finished = true;
                Err(self.shared.disconnected())
            }
        }
    }

    pub(crate) async fn send(&self, body: Body) -> Result<(), AgentError> {
        self.shared.send(self.id, body).await
    }

    /// Records that the consumer took `consumed` bytes; the guest gets the credit back
    /// once a batch has accumulated.
    pub(crate) async fn grant(&mut self, consumed: usize) -> Result<(), AgentError> {
        self.pending_grant += consumed;
        if self.pending_grant < GRANT_BATCH {
            return Ok(());
        }
        let bytes = u32::try_from(std::mem::take(&mut self.pending_grant)).unwrap_or(u32::MAX);
        {
            let mut slots = self
                .shared
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = slots.get_mut(&self.id) {
                slot.inbound_credit += u64::from(bytes);
            }
        }
        self.send(Body::WindowUpdate(pb::WindowUpdate { bytes }))
            .await
    }

    /// Sends bulk data in chunks, waiting for the guest's credit.
    pub(crate) async fn send_data(&self, mut data: &[u8]) -> Result<(), AgentError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA_CHUNK);
            let permit = self
                .outbound
                .acquire_many(n as u32)
                .await
                .map_err(|_| self.shared.disconnected())?;
            permit.forget();
            self.send(Body::Data(pb::Data {
                fd: pb::OutputFd::Unspecified as i32,
                data: Bytes::copy_from_slice(&data[..n]),
            }))
            .await?;
            data = &data[n..];
        }
        Ok(())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let removed = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        if removed.is_some() && !self.finished {
            // Best effort: if the writer queue is full the connection is in trouble anyway.
            let _ = self.shared.out.try_send(Frame {
                stream_id: self.id,
                body: Some(Body::Cancel(pb::Cancel {})),
            });
        }
    }
}

impl Shared {
    pub(crate) fn disconnected(&self) -> AgentError {
        let reason = self.closed.borrow().clone();
        AgentError::Disconnected(reason.unwrap_or_else(|| "connection closed".into()))
    }

    pub(crate) async fn send(&self, stream_id: u64, body: Body) -> Result<(), AgentError> {
        self.out
            .send(Frame {
                stream_id,
                body: Some(body),
            })
            .await
            .map_err(|_| self.disconnected())
    }

    fn close(&self, reason: String) {
        self.closed.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
        // Dropping the senders wakes every waiter with Disconnected.
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(PoisonError::into_inner));
        for slot in slots.into_values() {
            slot.outbound.close();
        }
    }
}

/// What a guest reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    pub kernel_release: String,
    pub uptime_ms: u64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub cpus: u32,
    pub hostname: String,
    pub agent_version: String,
    pub boot_id: String,
}

/// Identity and settings applied to a guest (at boot and at every hand-over).
#[derive(Debug, Clone, Default)]
pub struct ConfigureRequest {
    pub hostname: String,
    pub entropy_seed: Vec<u8>,
    /// Sets the guest clock when present.
    pub unix_time_ns: Option<u64>,
    pub env: Vec<(String, String)>,
    pub network: Option<NetworkConfig>,
    pub start_sshd: bool,
}

/// How [`AgentClient::write_file_with`] creates the file.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Permission bits.
    pub mode: u32,
    /// Owner; `None` is root.
    pub uid: Option<u32>,
    /// Group; `None` is root.
    pub gid: Option<u32>,
    /// Create missing parent directories.
    pub create_parents: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            mode: 0o644,
            uid: None,
            gid: None,
            create_parents: true,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    pub address: String,
    pub gateway: String,
    pub dns_servers: Vec<String>,
    pub mtu: u32,
}

fn remote(e: pb::Error) -> AgentError {
    AgentError::Remote {
        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
        message: e.message,
    }
}

fn unexpected(what: &str, body: &Body) -> AgentError {
    AgentError::Protocol(
        format!("unexpected reply to {what}: {body:?}")
            .chars()
            .take(200)
            .collect(),
    )
}

impl AgentClient {
    /// Runs the handshake on a fresh byte stream and starts the connection's tasks.
    /// Returns once the agent answered `Ready`, or fails after `timeout`.
    pub async fn connect<S>(io: S, timeout: Duration) -> Result<Self, AgentError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel::<Frame>(256);
        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            out: out_tx,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: closed_tx,
        });
        tokio::spawn(write_loop(writer, out_rx, Arc::downgrade(&shared)));

        let mut frames = FramedRead::new(reader, FrameCodec::new());
        let nonce = rand::random::<u64>() | 1;
        let hello = || {
            Body::Hello(pb::Hello {
                nonce,
                protocol_version: PROTOCOL_VERSION,
            })
        };
        let handshake = async {
            let mut ticker = tokio::time::interval(HELLO_INTERVAL);
            loop {
                tokio::select! {
                    _ = ticker.tick() => shared.send(0, hello()).await?,
                    item = frames.next() => match item {
                        None => return Err(AgentError::Disconnected("agent channel closed during handshake".into())),
                        Some(Err(e)) => return Err(AgentError::Disconnected(format!("agent channel: {e}"))),
                        // Garbage before Ready can be a previous session's tail: skip it.
                        Some(Ok(Err(_))) => continue,
                        Some(Ok(Ok(Frame { stream_id: 0, body: Some(Body::Ready(ready)) })))
                            if ready.nonce == nonce || ready.nonce == 0 =>
                        {
                            if ready.protocol_version != PROTOCOL_VERSION {
                                return Err(AgentError::Protocol(format!(
                                    "agent speaks protocol {}, this host {}",
                                    ready.protocol_version, PROTOCOL_VERSION
                                )));
                            }
                            return Ok(ready);
                        }
                        Some(Ok(Ok(_))) => continue,
                    }
                }
            }
        };
        let ready = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| AgentError::Timeout(timeout))??;
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(read_loop(frames, shared.clone(), stop_rx));
        Ok(Self {
            shared,
            ready: Arc::new(ready),
            life: Arc::new(Lifetime {
                stop: Mutex::new(Some(stop_tx)),
            }),
        })
    }

    /// The agent's `Ready` message (version, boot id, uptime when it became ready).
    pub fn ready(&self) -> &pb::Ready {
        &self.ready
    }

    /// Resolves when the connection is gone, with the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.shared.closed.subscribe();
        let reason = match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => "connection closed".into(),
        };
        reason
    }

    pub(crate) async fn open(&self, request: Body) -> Result<OpenStream, AgentError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let outbound = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        {
            if self.shared.closed.borrow().is_some() {
                return Err(self.shared.disconnected());
            }
            let mut slots = self
                .shared
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            slots.insert(
                id,
                Slot {
                    tx,
                    inbound_credit: u64::from(INITIAL_WINDOW),
                    outbound: outbound.clone(),
                    eof_seen: [false; 3],
                },
            );
        }
        let stream = OpenStream {
            id,
            events: rx,
            outbound,
            shared: self.shared.clone(),
            finished: false,
            pending_grant: 0,
            _life: self.life.clone(),
        };
        stream.send(request).await?;
        Ok(stream)
    }

    async fn unary(
        &self,
        what: &str,
        request: Body,
        timeout: Duration,
    ) -> Result<Body, AgentError> {
        let call = async {
            let mut stream = self.open(request).await?;
            match stream.next().await? {
                Event::Done(Body::Error(e)) => Err(remote(e)),
                Event::Done(body) => Ok(body),
                other => Err(AgentError::Protocol(format!(
                    "unexpected {other:?} in reply to {what}"
                ))),
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| AgentError::Timeout(timeout))?
    }

    pub async fn info(&self, timeout: Duration) -> Result<GuestInfo, AgentError> {
        match self
            .unary("info", Body::Info(pb::InfoRequest {}), timeout)
            .await?
        {
            Body::InfoResponse(i) => Ok(GuestInfo {
                kernel_release: i.kernel_release,
                uptime_ms: i.uptime_ms,
                mem_total_kib: i.mem_total_kib,
                mem_available_kib: i.mem_available_kib,
                cpus: i.cpus,
                hostname: i.hostname,
                agent_version: i.agent_version,
                boot_id: i.boot_id,
            }),
            other => Err(unexpected("info", &other)),
        }
    }

    pub async fn configure(
        &self,
        req: ConfigureRequest,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let body = Body::Configure(pb::ConfigureRequest {
            hostname: req.hostname,
            entropy_seed: req.entropy_seed.into(),
            unix_time_ns: req.unix_time_ns.unwrap_or(0),
            env: req
                .env
                .into_iter()
                .map(|(key, value)| pb::KeyValue { key, value })
                .collect(),
            network: req.network.map(|n| pb::NetworkConfig {
                address: n.address,
                gateway: n.gateway,
                dns_servers: n.dns_servers,
                mtu: n.mtu,
            }),
            start_sshd: req.start_sshd,
        });
        match self.unary("configure", body, timeout).await? {
            Body::Configured(_) => Ok(()),
            other => Err(unexpected("configure", &other)),
        }
    }

    /// Asks the guest to sync and power off. Returns once the agent accepted; the VM
    /// exiting is the caller's to observe.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), AgentError> {
        match self
            .unary("shutdown", Body::Shutdown(pb::ShutdownRequest {}), timeout)
            .await?
        {
            Body::ShutdownAccepted(_) => Ok(()),
            other => Err(unexpected("shutdown", &other)),
        }
    }

    /// Streams `source` into the guest file `path` (written atomically: a temporary file
    /// renamed at the end). Returns the bytes written.
    pub async fn write_file<R>(&self, path: &str, mode: u32, source: R) -> Result<u64, AgentError>
    where
        R: AsyncRead + Unpin,
    {
        let options = WriteOptions {
            mode,
            ..WriteOptions::default()
        };
        self.write_file_with(path, options, source).await
    }

    /// [`Self::write_file`] with the owner and parent handling spelled out.
    pub async fn write_file_with<R>(
        &self,
        path: &str,
        options: WriteOptions,
        mut source: R,
    ) -> Result<u64, AgentError>
    where
        R: AsyncRead + Unpin,
    {
        let mut stream = self
            .open(Body::WriteFile(pb::WriteFileRequest {
                path: path.to_owned(),
                mode: options.mode,
                uid: options.uid,
                gid: options.gid,
                create_parents: options.create_parents,
            }))
            .await?;
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            // The guest may fail the write early (bad path): notice that instead of
            // sending the whole file into the void.
            let n = tokio::select! {
                biased;
                ev = stream.next() => return match ev? {
                    Event::Done(Body::Error(e)) => Err(remote(e)),
                    other => Err(AgentError::Protocol(format!("unexpected {other:?} during upload"))),
                },
                n = source.read(&mut buf) => n?,
            };
            if n == 0 {
                break;
            }
            stream.send_data(&buf[..n]).await?;
        }
        stream.send(Body::Eof(pb::Eof { fd: 0 })).await?;
        loop {
            match stream.next().await? {
                Event::Done(Body::FileWritten(w)) => return Ok(w.bytes),
                Event::Done(Body::Error(e)) => return Err(remote(e)),
                Event::Done(other) => return Err(unexpected("write_file", &other)),
                _ => continue,
            }
        }
    }

    /// Streams the guest file `path` into `sink`. Returns the bytes read.
    pub async fn read_file<W>(&self, path: &str, sink: W) -> Result<u64, AgentError>
    where
        W: AsyncWrite + Unpin,
    {
        self.read_file_range(path, 0, 0, sink).await
    }

    /// Streams `limit` bytes (0: to the end) of the guest file `path` from `offset` into
    /// `sink`. Returns the bytes read.
    pub async fn read_file_range<W>(
        &self,
        path: &str,
        offset: u64,
        limit: u64,
        mut sink: W,
    ) -> Result<u64, AgentError>
    where
        W: AsyncWrite + Unpin,
    {
        let mut stream = self
            .open(Body::ReadFile(pb::ReadFileRequest {
                path: path.to_owned(),
                offset,
                limit,
            }))
            .await?;
        let mut total = 0u64;
        loop {
            match stream.next().await? {
                Event::Data(_, data) => {
                    sink.write_all(&data).await?;
                    total += data.len() as u64;
                    stream.grant(data.len()).await?;
                }
                Event::Done(Body::FileEnd(end)) => {
                    if end.bytes != total {
                        return Err(AgentError::Protocol(format!(
                            "guest reported {} bytes but sent {total}",
                            end.bytes
                        )));
                    }
                    sink.flush().await?;
                    return Ok(total);
                }
                Event::Done(Body::Error(e)) => return Err(remote(e)),
                Event::Done(other) => return Err(unexpected("read_file", &other)),
                Event::Eof => continue,
            }
        }
    }
}

async fn write_loop<W>(writer: W, mut rx: mpsc::Receiver<Frame>, shared: std::sync::Weak<Shared>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut sink = FramedWrite::new(writer, FrameCodec::new());
    while let Some(frame) = rx.recv().await {
        let mut result = sink.feed(frame).await;
        while result.is_ok() {
            match rx.try_recv() {
                Ok(frame) => result = sink.feed(frame).await,
                Err(_) => break,
            }
        }
        if let Err(e) = result.and(sink.flush().await) {
            if let Some(shared) = shared.upgrade() {
                shared.close(format!("write failed: {e}"));
            }
            return;
        }
    }
}

async fn read_loop<R>(
    mut frames: FramedRead<R, FrameCodec>,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) where
    R: AsyncRead + Unpin,
{
    let reason = loop {
        let next = tokio::select! {
            next = frames.next() => next,
            _ = &mut stop => break "the client closed the connection".to_owned(),
        };
        let frame = match next {
            None => break "the guest closed the agent channel".to_owned(),
            Some(Err(e)) => break format!("reading the agent channel: {e}"),
            Some(Ok(Err(bad))) => break format!("guest sent an invalid frame: {bad}"),
            Some(Ok(Ok(frame))) => frame,
        };
        if let Err(violation) = deliver(&shared, frame) {
            tracing::warn!(%violation, "closing agent connection");
            break violation;
        }
    };
    shared.close(reason);
}

/// Routes one frame from the guest to its stream. An `Err` is a protocol violation that
/// ends the connection.
fn deliver(shared: &Shared, frame: Frame) -> Result<(), String> {
    let Some(body) = frame.body else {
        return Err("frame without body".into());
    };
    if frame.stream_id == 0 {
        // Late Ready replies to repeated Hellos, or a connection-level error report.
        if let Body::Error(e) = &body {
            tracing::warn!(code = e.code, message = %e.message, "guest agent reported an error");
        }
        return Ok(());
    }
    let mut slots = shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(slot) = slots.get_mut(&frame.stream_id) else {
        // A stream we cancelled (or never opened): its late frames are dropped.
        return Ok(());
    };
    let event = match body {
        Body::Data(d) => {
            let len = d.data.len() as u64;
            if len > slot.inbound_credit {
                return Err(format!(
                    "guest sent {len} bytes on stream {} with only {} bytes of window",
                    frame.stream_id, slot.inbound_credit
                ));
            }
            slot.inbound_credit -= len;
            Event::Data(
                pb::OutputFd::try_from(d.fd).unwrap_or(pb::OutputFd::Unspecified),
                d.data,
            )
        }
        Body::Eof(e) => {
            let fd = pb::OutputFd::try_from(e.fd).unwrap_or(pb::OutputFd::Unspecified);
            let seen = &mut slot.eof_seen[fd as usize];
            if std::mem::replace(seen, true) {
                return Ok(());
            }
            Event::Eof
        }
        Body::WindowUpdate(w) => {
            let n = w.bytes as usize;
            if slot.outbound.available_permits().saturating_add(n) > MAX_OUTBOUND_CREDIT {
                return Err(format!(
                    "guest granted an absurd window on stream {}",
                    frame.stream_id
                ));
            }
            slot.outbound.add_permits(n);
            return Ok(());
        }
        terminal @ (Body::Exit(_)
        | Body::FileWritten(_)
        | Body::FileEnd(_)
        | Body::InfoResponse(_)
        | Body::Configured(_)
        | Body::ShutdownAccepted(_)
        | Body::Error(_)) => {
            if let Some(slot) = slots.remove(&frame.stream_id) {
                let _ = slot.tx.send(Event::Done(terminal));
            }
            return Ok(());
        }
        other => {
            return Err(format!(
                "guest sent a host-only frame on stream {}: {}",
                frame.stream_id,
                format!("{other:?}").chars().take(60).collect::<String>()
            ))
        }
    };
    let _ = slot.tx.send(event);
    Ok(())
}
