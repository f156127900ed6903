//! Reaching the agent's byte stream.
//!
//! Under QEMU the agent's virtio-serial port is a Unix socket the VMM serves, so a plain
//! `UnixStream::connect` is the whole transport. Under Firecracker the host side of vsock
//! is a Unix socket too, but each connection first names the guest port: the host sends
//! `CONNECT <port>\n` and Firecracker answers `OK <host port>\n`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::AgentError;

/// Longest answer line Firecracker sends to CONNECT (`OK 4294967295\n` is 14 bytes).
const MAX_CONNECT_REPLY: usize = 32;

/// Opens a connection to guest vsock `port` through Firecracker's hybrid vsock socket.
pub async fn connect_firecracker_vsock(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, AgentError> {
    let attempt = async {
        let mut stream = UnixStream::connect(uds).await?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        // Read byte by byte: anything after the newline already belongs to the agent.
        let mut line = Vec::with_capacity(MAX_CONNECT_REPLY);
        loop {
            let b = stream.read_u8().await?;
            if b == b'\n' {
                break;
            }
            if line.len() == MAX_CONNECT_REPLY {
                return Err(AgentError::Protocol("vsock CONNECT reply too long".into()));
            }
            line.push(b);
        }
        let text = String::from_utf8_lossy(&line);
        match text.strip_prefix("OK ") {
            Some(p) if p.trim().parse::<u32>().is_ok() => Ok(stream),
            _ => Err(AgentError::Disconnected(format!(
                "vsock CONNECT {port} refused: {text:?}"
            ))),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| AgentError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    async fn fake_firecracker(reply: &'static str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut reader = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("read");
            assert_eq!(line, "CONNECT 1024\n");
            reader
                .get_mut()
                .write_all(reply.as_bytes())
                .await
                .expect("write");
            // Keep the connection open for the client to use.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn connect_accepts_ok_and_leaves_agent_bytes_unread() {
        let (_dir, path) = fake_firecracker("OK 1073741824\nNBX1").await;
        let mut stream = connect_firecracker_vsock(&path, 1024, Duration::from_secs(2))
            .await
            .expect("connect");
        let mut magic = [0u8; 4];
        stream.read_exact(&mut magic).await.expect("agent bytes");
        assert_eq!(&magic, b"NBX1");
    }

    #[tokio::test]
    async fn connect_reports_refusal_and_overlong_replies() {
        let (_dir, path) = fake_firecracker("ERR no listener\n").await;
        let err = connect_firecracker_vsock(&path, 1024, Duration::from_secs(2))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("refused"), "{err}");

        let (_dir, path) = fake_firecracker("OK 11111111111111111111111111111111111111\n").await;
        let err = connect_firecracker_vsock(&path, 1024, Duration::from_secs(2))
            .await
            .expect_err("too long");
        assert!(matches!(err, AgentError::Protocol(_)), "{err}");
    }
}
