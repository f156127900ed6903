//! The byte streams the agent serves on: a virtio-serial port (QEMU) or AF_VSOCK
//! connections (Firecracker).
//!
//! A virtio-serial port is one long-lived character device. While no host is attached its
//! reads return 0 and poll reports POLLHUP, so "connection ended" and "wait for the next
//! host" both happen on the same open file. A vsock listener instead yields one socket per
//! host connection.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An `AsyncRead + AsyncWrite` over a non-blocking file descriptor (a virtio port or a
/// vsock socket). Cloning shares the descriptor, so one task can read while another writes.
#[derive(Debug, Clone)]
pub struct FdStream {
    fd: std::sync::Arc<AsyncFd<OwnedFd>>,
}

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            fd: std::sync::Arc::new(crate::sys::async_fd(fd)?),
        })
    }
}

fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Finds the device node of the virtio-serial port called `name`, waiting up to `wait`
/// for the host to announce port names (they arrive asynchronously after the driver binds).
pub async fn find_virtio_port(name: &str, wait: Duration) -> Option<PathBuf> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(path) = scan_virtio_ports(Path::new("/sys/class/virtio-ports"), name) {
            return Some(path);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn scan_virtio_ports(class_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class_dir).ok()?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Opens a virtio-serial port for reading and writing.
pub fn open_port(path: &Path) -> io::Result<FdStream> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_cloexec()
        .open(path)?;
    FdStream::new(OwnedFd::from(file))
}

trait CloexecExt {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecExt for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
    }
}

/// True when a host is attached to the port (poll reports no hang-up).
pub fn port_host_connected(stream: &FdStream) -> bool {
    let fd = stream.fd.get_ref().as_fd();
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// A listening AF_VSOCK socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` for connections from the host. Fails when the VM has no vsock
    /// device.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
        Ok(Self {
            fd: crate::sys::async_fd(fd)?,
        })
    }

    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                accept4(fd.get_ref().as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io::Error::from)
            }) {
                Ok(Ok(raw)) => {
                    let fd = owned_from_raw(raw);
                    return FdStream::new(fd);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

fn owned_from_raw(raw: std::os::fd::RawFd) -> OwnedFd {
    crate::sys::owned_fd(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (dev, name) in [("vport0p0", "other"), ("vport0p1", "nanobox.agent")] {
            std::fs::create_dir(dir.path().join(dev)).expect("mkdir");
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).expect("w");
        }
        assert_eq!(
            scan_virtio_ports(dir.path(), "nanobox.agent"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(scan_virtio_ports(dir.path(), "missing"), None);
    }
}
