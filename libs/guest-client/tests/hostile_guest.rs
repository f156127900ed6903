//! The host side against a fake guest that breaks the protocol. A guest is untrusted: it
//! must not be able to make the host buffer without bound, hang, or panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use nanobox_agent_protocol::pb::{self, frame::Body, Frame};
use nanobox_agent_protocol::{FrameCodec, INITIAL_WINDOW, PROTOCOL_VERSION};
use nanobox_guest_client::{AgentClient, AgentError, ExecEvent, ExecRequest};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::codec::Framed;

const GUARD: Duration = Duration::from_secs(10);

fn ready() -> Frame {
    Frame {
        stream_id: 0,
        body: Some(Body::Ready(pb::Ready {
            nonce: 0,
            protocol_version: PROTOCOL_VERSION,
            agent_version: "fake".into(),
            boot_id: "b".into(),
            uptime_ms: 1,
        })),
    }
}

/// Connects a client to a fake guest and returns the guest's end, after the handshake.
async fn pair() -> (AgentClient, Framed<DuplexStream, FrameCodec>) {
    let (host, guest) = tokio::io::duplex(4 << 20);
    let mut guest = Framed::new(guest, FrameCodec::new());
    guest.send(ready()).await.expect("send ready");
    let client = AgentClient::connect(host, GUARD).await.expect("handshake");
    (client, guest)
}

/// Reads host frames until one opens a stream; returns its id.
async fn next_request(guest: &mut Framed<DuplexStream, FrameCodec>) -> (u64, Body) {
    loop {
        let frame = guest
            .next()
            .await
            .expect("host frame")
            .expect("io")
            .expect("valid frame");
        match frame.body {
            Some(Body::Hello(_)) | Some(Body::WindowUpdate(_)) => continue,
            Some(body) => return (frame.stream_id, body),
            None => panic!("empty frame from host"),
        }
    }
}

fn data(stream_id: u64, len: usize) -> Frame {
    Frame {
        stream_id,
        body: Some(Body::Data(pb::Data {
            fd: pb::OutputFd::Stdout as i32,
            data: Bytes::from(vec![b'x'; len]),
        })),
    }
}

#[tokio::test]
async fn data_beyond_the_window_closes_the_connection() {
    let (client, mut guest) = pair().await;
    let mut exec = client
        .exec(ExecRequest::new(["flood"]))
        .await
        .expect("exec");
    let (id, body) = next_request(&mut guest).await;
    assert!(matches!(body, Body::Exec(_)));
    // Send the whole window without waiting for credit, then one byte more.
    let chunk = 128 * 1024;
    for _ in 0..(INITIAL_WINDOW as usize / chunk) {
        guest.send(data(id, chunk)).await.expect("send");
    }
    guest.send(data(id, 1)).await.expect("send");
    // The client may hand out what was within the window, then must fail, not buffer.
    let err = tokio::time::timeout(GUARD, async {
        loop {
            match exec.next().await {
                Ok(Some(ExecEvent::Stdout(_))) => continue,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("client hung");
    assert!(
        matches!(err, AgentError::Disconnected(ref m) if m.contains("window")),
        "{err}"
    );
}

#[tokio::test]
async fn oversized_frame_from_the_guest_closes_the_connection() {
    let (client, guest) = pair().await;
    let mut exec = client.exec(ExecRequest::new(["x"])).await.expect("exec");
    let mut raw = guest.into_inner();
    raw.write_all(b"NBX1").await.expect("write");
    raw.write_all(&u32::MAX.to_le_bytes()).await.expect("write");
    let err = tokio::time::timeout(GUARD, exec.next())
        .await
        .expect("hung")
        .expect_err("must fail");
    assert!(
        matches!(err, AgentError::Disconnected(ref m) if m.contains("exceeds the limit")),
        "{err}"
    );
    let err = client
        .run(ExecRequest::new(["y"]), 10)
        .await
        .expect_err("closed");
    assert!(matches!(err, AgentError::Disconnected(_)), "{err}");
}

#[tokio::test]
async fn a_silent_guest_times_out_the_handshake() {
    let (host, _guest) = tokio::io::duplex(1024);
    let err = AgentClient::connect(host, Duration::from_millis(300))
        .await
        .expect_err("no Ready");
    assert!(matches!(err, AgentError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let (host, guest) = tokio::io::duplex(1024);
    let mut guest = Framed::new(guest, FrameCodec::new());
    let mut r = ready();
    if let Some(Body::Ready(ref mut ready)) = r.body {
        ready.protocol_version = 99;
    }
    guest.send(r).await.expect("send");
    let err = AgentClient::connect(host, GUARD)
        .await
        .expect_err("version");
    assert!(
        matches!(err, AgentError::Protocol(ref m) if m.contains("99")),
        "{err}"
    );
}

#[tokio::test]
async fn frames_for_unknown_streams_are_ignored_and_absurd_windows_refused() {
    let (client, mut guest) = pair().await;
    let mut exec = client.exec(ExecRequest::new(["x"])).await.expect("exec");
    let (id, _) = next_request(&mut guest).await;
    // Noise on streams the host never opened changes nothing...
    guest.send(data(id + 1000, 10)).await.expect("send");
    guest.send(data(id, 3)).await.expect("send");
    let ev = tokio::time::timeout(GUARD, exec.next())
        .await
        .expect("hung")
        .expect("event");
    assert_eq!(ev, Some(ExecEvent::Stdout(Bytes::from_static(b"xxx"))));
    // ...but granting the host an absurd window is a protocol violation.
    for _ in 0..40 {
        guest
            .send(Frame {
                stream_id: id,
                body: Some(Body::WindowUpdate(pb::WindowUpdate {
                    bytes: u32::MAX / 2,
                })),
            })
            .await
            .expect("send");
    }
    let err = tokio::time::timeout(GUARD, exec.next())
        .await
        .expect("hung")
        .expect_err("closed");
    assert!(
        matches!(err, AgentError::Disconnected(ref m) if m.contains("absurd window")),
        "{err}"
    );
}

#[tokio::test]
async fn dropping_an_exec_cancels_it_in_the_guest() {
    let (client, mut guest) = pair().await;
    let exec = client
        .exec(ExecRequest::new(["sleep", "100"]))
        .await
        .expect("exec");
    let (id, _) = next_request(&mut guest).await;
    drop(exec);
    let frame = tokio::time::timeout(GUARD, guest.next())
        .await
        .expect("hung")
        .expect("frame")
        .expect("io")
        .expect("valid");
    assert_eq!(frame.stream_id, id);
    assert!(matches!(frame.body, Some(Body::Cancel(_))), "{frame:?}");
}
