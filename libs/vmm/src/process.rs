//! Spawning VMM processes: own process group, optional death with the parent, and
//! descriptors handed over at fixed numbers.

#![allow(unsafe_code)]

use std::os::fd::OwnedFd;

use command_fds::{CommandFdExt, FdMapping};
use tokio::process::Command;

/// Hands `fds` to the child at descriptor numbers 3, 4, ... and returns those numbers.
pub(crate) fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) -> Result<Vec<i32>, String> {
    let numbers: Vec<i32> = (0..fds.len() as i32).map(|i| 3 + i).collect();
    let mappings = fds
        .into_iter()
        .zip(&numbers)
        .map(|(parent_fd, &child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    cmd.fd_mappings(mappings).map_err(|e| e.to_string())?;
    Ok(numbers)
}

/// Makes the child get SIGKILL when the thread that spawned it exits... which for a tokio
/// runtime means when the process exits, since spawns happen on long-lived workers.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // prctl(2) through nix, which is async-signal-safe and touches no parent state.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Makes the child enter the network namespace `netns` (a `/run/netns/<name>` file)
/// before it executes, so the VMM sees only that namespace's devices.
pub(crate) fn enter_netns(cmd: &mut Command, netns: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns)?;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // setns(2) through nix, which is async-signal-safe. The descriptor stays open for the
    // closure's lifetime because the closure owns the file.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(file.as_raw_fd());
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}
