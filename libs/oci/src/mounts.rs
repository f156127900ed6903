//! A private mount namespace for one piece of work: the hybrid staging's bind mounts.
//!
//! The work runs on a thread of its own that leaves this process's mount namespace
//! (`unshare(CLONE_NEWNS)`, which a thread may do alone: it takes a private copy of the
//! file system context with it), makes every mount in its copy private so that nothing
//! propagates back to the host, bind-mounts what it was given, and runs the work, whose
//! child processes (mkfs, debugfs) inherit the thread's namespace. When the thread ends
//! no task uses the namespace any more and the kernel tears it down with every mount in
//! it: nothing is ever unmounted by hand, and nothing is left behind if the process dies.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::OciError;

/// Enters a private mount namespace on the calling thread.
fn private_namespace() -> nix::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

fn bind(source: &Path, target: &Path) -> nix::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

/// Runs `work` on a thread in a private mount namespace where each `(target, source)`
/// of `binds` has `source` bind-mounted over `target`.
pub(crate) fn with_binds<T: Send>(
    binds: &[(PathBuf, PathBuf)],
    work: impl FnOnce() -> Result<T, OciError> + Send,
) -> Result<T, OciError> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("staging-mounts".to_owned())
            .spawn_scoped(scope, || {
                private_namespace().map_err(|e| {
                    OciError::io("entering a private mount namespace", "/", e.into())
                })?;
                for (target, source) in binds {
                    bind(source, target).map_err(|e| {
                        OciError::io("bind-mounting a spill file", target, e.into())
                    })?;
                }
                work()
            })
            .map_err(|e| OciError::io("starting the staging-mounts thread", "/", e))?;
        thread.join().map_err(|_| {
            OciError::io(
                "the staging-mounts thread panicked",
                "/",
                io::Error::other("panic"),
            )
        })?
    })
}

/// Whether [`with_binds`] works here (it needs CAP_SYS_ADMIN, and a seccomp profile
/// that allows `unshare` and `mount`): binds one file over another in /dev/shm and reads
/// it back.
pub(crate) fn probe() -> bool {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        return false;
    };
    let (source, target) = (dir.path().join("source"), dir.path().join("target"));
    if std::fs::write(&source, b"bound").is_err() || std::fs::write(&target, b"").is_err() {
        return false;
    }
    let binds = [(target.clone(), source)];
    let read = with_binds(&binds, || {
        std::fs::read(&target).map_err(|e| OciError::io("reading", &target, e))
    });
    matches!(read, Ok(data) if data == b"bound")
}
