//! The few system calls nix does not wrap: entropy crediting and interface configuration.
//!
//! Every `unsafe` block of the init lives here, each with the reason it is sound.

#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// `RNDADDENTROPY` from <linux/random.h>: _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `seed` into the kernel's entropy pool and credits it, so getrandom() and
/// /dev/random stop blocking. Without this some services (sshd on old kernels, anything
/// calling getrandom without GRND_NONBLOCK early) can block forever in a fresh VM.
pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
    if seed.is_empty() {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut req = Vec::with_capacity(8 + seed.len());
    let bits = i32::try_from(seed.len().saturating_mul(8)).unwrap_or(i32::MAX);
    let len = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    req.extend_from_slice(&bits.to_ne_bytes());
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(seed);
    // SAFETY: `req` is a live, initialised buffer laid out as `struct rand_pool_info`
    // whose `buf_size` equals the bytes that follow the header; the kernel only reads it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, req.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is a plain C struct for which all-zero bytes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn inet_socket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux, and the kernel reads
    // an AF_INET sockaddr as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_ifreq(fd: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid, exclusively borrowed ifreq for the duration of the call,
    // which is what every SIOC[GS]IF* request expects.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings interface `name` up.
pub fn link_up(name: &str) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl_ifreq(&fd, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl_ifreq(&fd, libc::SIOCSIFFLAGS, &mut req)
}

/// Assigns `addr/prefix` to interface `name` and optionally sets its MTU.
pub fn set_ipv4(name: &str, addr: Ipv4Addr, prefix: u8, mtu: Option<u32>) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl_ifreq(&fd, libc::SIOCSIFADDR, &mut req)?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    ioctl_ifreq(&fd, libc::SIOCSIFNETMASK, &mut req)?;
    if let Some(mtu) = mtu {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = i32::try_from(mtu).unwrap_or(i32::MAX);
        ioctl_ifreq(&fd, libc::SIOCSIFMTU, &mut req)?;
    }
    Ok(())
}

/// Adds a default route via `gateway`.
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let fd = inet_socket()?;
    // SAFETY: rtentry is a plain C struct for which all-zero bytes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `rt` is a valid rtentry that outlives the call; SIOCADDRT only reads it.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCADDRT,
            &mut rt as *mut libc::rtentry,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err);
        }
    }
    Ok(())
}

/// Takes ownership of a descriptor the kernel just returned (accept4).
pub fn owned_fd(raw: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `raw` was returned by a successful accept4 and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that only it closes, and moving it into
    // the AsyncFd keeps it open, and the same descriptor, for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
