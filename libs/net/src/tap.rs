//! Persistent TAP devices. Netlink cannot create them (the kernel answers "tun/tap
//! creation via rtnetlink is not supported"), so this is the `TUNSETIFF` ioctl on
//! `/dev/net/tun`, the one place in the crate with `unsafe`.
//!
//! The TAP is made persistent so it outlives the descriptor used to create it: the VMM,
//! started later inside the sandbox's namespace, opens it by name.

#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Creates the TAP device `name` in the network namespace of the calling thread.
pub(crate) fn create_persistent(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is a plain C struct (a char array and a union of integers and
    // arrays) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // No packet-information header: QEMU and Firecracker expect plain frames.
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may update) one ifreq through the pointer, which
    // points at a live, initialised ifreq owned by this frame; the fd is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument, not a pointer; the fd is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
