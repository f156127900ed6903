//! One connection of the agent protocol: decode frames, run each stream as its own task,
//! and multiplex their replies onto the one byte stream.
//!
//! The dispatcher never blocks on a stream: inbound stream traffic goes to the stream's
//! task over a channel (bounded in bytes by the flow-control window the host must honour),
//! and every reply goes through one writer task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use nanobox_agent_protocol::codec::encode_into;
use nanobox_agent_protocol::pb::{self, frame::Body, ErrorCode, Frame};
use nanobox_agent_protocol::{
    data_frame_prefix, FrameCodec, FrameError, DATA_PREFIX_ROOM, GUEST_WIRE_CHUNK, INITIAL_WINDOW,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use crate::image::ImageConfig;
use crate::reaper::Reaper;
use crate::{control, exec, files, log};

/// State shared by every connection for the life of the guest.
#[derive(Debug)]
pub struct Agent {
    pub reaper: Reaper,
    pub image: ImageConfig,
    /// Environment set by the host with `Configure`, applied on top of the image's.
    pub extra_env: Mutex<Vec<(String, String)>>,
    pub boot_id: String,
    pub started: Instant,
}

impl Agent {
    /// The environment a new exec starts from.
    pub fn base_env(&self) -> Vec<(String, String)> {
        let mut env = crate::image::env_pairs(&self.image);
        let extra = self
            .extra_env
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (k, v) in extra.iter() {
            crate::image::merge(&mut env, k, v);
        }
        env
    }

    pub fn uptime_ms(&self) -> u64 {
        crate::control::uptime_ms().unwrap_or_else(|| self.started.elapsed().as_millis() as u64)
    }

    pub fn ready(&self, nonce: u64) -> Frame {
        Frame {
            stream_id: 0,
            body: Some(Body::Ready(pb::Ready {
                nonce,
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                boot_id: self.boot_id.clone(),
                uptime_ms: self.uptime_ms(),
            })),
        }
    }
}

/// Traffic for an open stream, as the dispatcher hands it to the stream's task.
#[derive(Debug)]
pub enum Inbound {
    Data(Bytes),
    Eof,
    Window(u32),
    Signal(i32),
    Cancel,
}

/// What the writer task puts on the wire.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame to encode.
    Frame(Frame),
    /// A frame already in wire form (bulk data, built in place; see [`DataBuf`]).
    Wire(Bytes),
}

/// A buffer for one bulk-data frame: data is read straight into it behind room for the
/// frame prefix, so it reaches the wire without being copied in user space.
#[derive(Debug)]
pub struct DataBuf {
    buf: BytesMut,
}

impl DataBuf {
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(GUEST_WIRE_CHUNK);
        buf.resize(DATA_PREFIX_ROOM, 0);
        Self { buf }
    }

    /// The buffer to read into: its spare capacity is the room left for data.
    pub fn reader(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub fn data_len(&self) -> usize {
        self.buf.len() - DATA_PREFIX_ROOM
    }

    /// The complete wire frame `Data { fd, data }` on stream `stream_id`.
    fn into_wire(mut self, stream_id: u64, fd: i32) -> Bytes {
        let prefix = data_frame_prefix(stream_id, fd, self.data_len());
        let start = DATA_PREFIX_ROOM - prefix.len();
        self.buf[start..DATA_PREFIX_ROOM].copy_from_slice(&prefix);
        self.buf.freeze().slice(start..)
    }
}

impl Default for DataBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends frames for one stream; every reply of a stream goes through here.
#[derive(Debug, Clone)]
pub struct StreamTx {
    pub id: u64,
    tx: mpsc::Sender<Outgoing>,
    /// Bulk bytes the host may still send on this stream (shared with the dispatcher,
    /// which takes from it as data arrives).
    credit: Arc<AtomicU64>,
}

impl StreamTx {
    /// Returns `bytes` of credit to the host once the stream has consumed that much of
    /// its data. The credit is recorded before the update is sent, so the host can never
    /// legitimately outrun the dispatcher's check.
    pub async fn grant(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.credit.fetch_add(u64::from(bytes), Ordering::SeqCst);
        self.send(Body::WindowUpdate(pb::WindowUpdate { bytes }))
            .await
    }

    pub async fn send(&self, body: Body) -> bool {
        self.tx
            .send(Outgoing::Frame(Frame {
                stream_id: self.id,
                body: Some(body),
            }))
            .await
            .is_ok()
    }

    /// Sends the data in `buf` as one `Data` frame for output `fd`.
    pub async fn send_data(&self, fd: i32, buf: DataBuf) -> bool {
        self.tx
            .send(Outgoing::Wire(buf.into_wire(self.id, fd)))
            .await
            .is_ok()
    }

    pub async fn error(&self, code: ErrorCode, message: impl Into<String>) -> bool {
        self.send(Body::Error(pb::Error {
            code: code as i32,
            message: message.into(),
        }))
        .await
    }
}

struct OpenStream {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Bulk bytes the host may still send before it needs more credit.
    credit: Arc<AtomicU64>,
}

/// Serves one connection until the host goes away. Streams still running then are
/// cancelled (their processes killed).
pub async fn serve<R, W>(agent: Arc<Agent>, reader: R, writer: W, announce: bool)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(64);
    let writer_task = tokio::spawn(write_loop(writer, out_rx));

    if announce {
        let _ = out_tx.send(Outgoing::Frame(agent.ready(0))).await;
    }

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let mut streams: HashMap<u64, OpenStream> = HashMap::new();
    let mut frames = FramedRead::new(reader, FrameCodec::new());

    loop {
        tokio::select! {
            Some(id) = done_rx.recv() => {
                streams.remove(&id);
            }
            item = frames.next() => {
                let frame = match item {
                    None => break,
                    Some(Err(e)) => {
                        log!("agent channel read error: {e}");
                        break;
                    }
                    Some(Ok(Err(bad))) => {
                        reject(&out_tx, bad).await;
                        continue;
                    }
                    Some(Ok(Ok(frame))) => frame,
                };
                dispatch(&agent, frame, &mut streams, &out_tx, &done_tx).await;
            }
        }
    }
    // Dropping the senders cancels every stream task.
    streams.clear();
    drop(out_tx);
    writer_task.abort();
}

/// Puts frames on the wire, batching small ones into one write and writing pre-built
/// data frames as they are (each fits one virtio-serial write).
async fn write_loop<W>(mut writer: W, mut rx: mpsc::Receiver<Outgoing>)
where
    W: AsyncWrite + Unpin,
{
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Frame(frame) => {
                    if let Err(e) = encode_into(&frame, &mut batch) {
                        log!("dropping a frame that cannot be encoded: {e}");
                    }
                }
                Outgoing::Wire(bytes) => {
                    if !batch.is_empty() && writer.write_all(&batch.split()).await.is_err() {
                        return;
                    }
                    if writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
            if batch.len() >= GUEST_WIRE_CHUNK {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() && writer.write_all(&batch.split()).await.is_err() {
            return;
        }
    }
}

async fn reject(out: &mpsc::Sender<Outgoing>, bad: FrameError) {
    log!("rejected frame: {bad}");
    let stream_id = match bad {
        FrameError::Empty { stream_id } => stream_id,
        _ => 0,
    };
    let _ = out
        .send(Outgoing::Frame(Frame {
            stream_id,
            body: Some(Body::Error(pb::Error {
                code: ErrorCode::Protocol as i32,
                message: bad.to_string(),
            })),
        }))
        .await;
}

async fn dispatch(
    agent: &Arc<Agent>,
    frame: Frame,
    streams: &mut HashMap<u64, OpenStream>,
    out: &mpsc::Sender<Outgoing>,
    done: &mpsc::UnboundedSender<u64>,
) {
    let id = frame.stream_id;
    let Some(body) = frame.body else { return };
    let stream = |credit: Arc<AtomicU64>| StreamTx {
        id,
        tx: out.clone(),
        credit,
    };
    let unopened = || stream(Arc::new(AtomicU64::new(0)));

    let inbound = match body {
        Body::Hello(hello) => {
            // A new host session: whatever the previous one left running is orphaned.
            streams.clear();
            let _ = out.send(Outgoing::Frame(agent.ready(hello.nonce))).await;
            return;
        }
        Body::Data(d) => {
            let Some(open) = streams.get_mut(&id) else {
                return;
            };
            let len = d.data.len() as u64;
            if len > open.credit.load(Ordering::SeqCst) {
                let _ = unopened()
                    .error(
                        ErrorCode::Protocol,
                        "data sent beyond the flow-control window",
                    )
                    .await;
                if let Some(open) = streams.remove(&id) {
                    let _ = open.tx.send(Inbound::Cancel);
                }
                return;
            }
            open.credit.fetch_sub(len, Ordering::SeqCst);
            Inbound::Data(d.data)
        }
        Body::Eof(_) => Inbound::Eof,
        Body::WindowUpdate(w) => Inbound::Window(w.bytes),
        Body::Signal(s) => Inbound::Signal(s.signal),
        Body::Cancel(_) => Inbound::Cancel,
        request => {
            if id == 0 || streams.contains_key(&id) {
                let _ = unopened()
                    .error(
                        ErrorCode::InvalidArgument,
                        format!("stream id {id} is reserved or already open"),
                    )
                    .await;
                return;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let credit = Arc::new(AtomicU64::new(u64::from(INITIAL_WINDOW)));
            streams.insert(
                id,
                OpenStream {
                    tx,
                    credit: credit.clone(),
                },
            );
            let stream = stream(credit);
            let agent = agent.clone();
            let done = done.clone();
            tokio::spawn(async move {
                run_stream(agent, request, stream, rx).await;
                let _ = done.send(id);
            });
            return;
        }
    };
    if let Some(open) = streams.get(&id) {
        let _ = open.tx.send(inbound);
    }
}

async fn run_stream(
    agent: Arc<Agent>,
    request: Body,
    stream: StreamTx,
    rx: mpsc::UnboundedReceiver<Inbound>,
) {
    match request {
        Body::Exec(req) => exec::run(agent, req, stream, rx).await,
        Body::WriteFile(req) => files::write(req, stream, rx).await,
        Body::ReadFile(req) => files::read(req, stream, rx).await,
        Body::Info(_) => control::info(&agent, &stream).await,
        Body::Configure(req) => control::configure(&agent, req, &stream).await,
        Body::Shutdown(_) => control::shutdown(&stream).await,
        other => {
            let _ = stream
                .error(
                    ErrorCode::InvalidArgument,
                    format!("frame {} cannot open a stream", body_name(&other)),
                )
                .await;
        }
    }
}

fn body_name(body: &Body) -> &'static str {
    match body {
        Body::Hello(_) => "hello",
        Body::Ready(_) => "ready",
        Body::Exec(_) => "exec",
        Body::WriteFile(_) => "write_file",
        Body::ReadFile(_) => "read_file",
        Body::Info(_) => "info",
        Body::Configure(_) => "configure",
        Body::Shutdown(_) => "shutdown",
        Body::Data(_) => "data",
        Body::Eof(_) => "eof",
        Body::WindowUpdate(_) => "window_update",
        Body::Signal(_) => "signal",
        Body::Cancel(_) => "cancel",
        Body::Exit(_) => "exit",
        Body::FileWritten(_) => "file_written",
        Body::FileEnd(_) => "file_end",
        Body::InfoResponse(_) => "info_response",
        Body::Configured(_) => "configured",
        Body::ShutdownAccepted(_) => "shutdown_accepted",
        Body::Error(_) => "error",
    }
}
