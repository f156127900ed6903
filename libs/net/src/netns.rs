//! Network namespaces, named the way `ip netns` names them: a bind mount of the namespace
//! on `/run/netns/<name>`, so `ip netns`, `nsenter` and the VMM's `setns(2)` all see the
//! same thing and a namespace outlives the thread that made it.
//!
//! Not `rtnetlink::NetworkNamespace::add`: it forks the calling process, and the child of
//! a fork in a multi-threaded (tokio) process may only make async-signal-safe calls until
//! it execs, while that child allocates and creates files. Namespaces are per thread in
//! Linux, so here a short-lived dedicated thread unshares its own network namespace and
//! bind-mounts it; no fork, and no thread of the runtime's pools ever changes namespace.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::NetError;

/// Where named namespaces live (what `ip netns` uses).
pub const NETNS_DIR: &str = "/run/netns";

/// Serialises the one-time preparation of [`NETNS_DIR`] within this process: two threads
/// bind-mounting it onto itself at once would stack two mounts.
static DIR_SETUP: Mutex<()> = Mutex::new(());

/// The path of the namespace called `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates the namespace `name`. Fails with `AlreadyExists` if the name is taken.
pub(crate) async fn create(name: &str) -> Result<PathBuf, NetError> {
    let target = path(name);
    let what = format!("creating network namespace {}", target.display());
    let thread_target = target.clone();
    spawn_thread(move || {
        prepare_dir()?;
        // The mount point: created exclusively, which is also what makes a name taken.
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&thread_target)?;
        let pinned = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .and_then(|()| {
                // thread-self, not self: only this thread is in the new namespace.
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &thread_target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
            })
            .map_err(io::Error::from);
        if let Err(e) = pinned {
            let _ = std::fs::remove_file(&thread_target);
            return Err(e);
        }
        Ok(())
    })
    .await
    .map_err(|e| NetError::io(what, e))?;
    Ok(target)
}

/// Removes the namespace `name`: the kernel frees it once no process (a VMM still
/// running) and no socket holds it. Returns false when there was nothing to remove.
pub(crate) fn delete(name: &str) -> Result<bool, NetError> {
    let target = path(name);
    let what = |step: &str| format!("{step} network namespace {}", target.display());
    match umount2(&target, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a half-created namespace); ENOENT: already gone.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(NetError::io(what("unmounting"), e.into())),
    }
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(NetError::io(what("removing"), e)),
    }
}

/// The names in [`NETNS_DIR`] that start with `prefix`.
pub(crate) fn list(prefix: &str) -> Result<Vec<String>, NetError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetError::io(format!("listing {NETNS_DIR}"), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| NetError::io(format!("listing {NETNS_DIR}"), e))?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(prefix) {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Runs `f` on a fresh thread inside the namespace at `ns` (`None`: this process's own).
/// The thread ends with `f`, so the namespace switch never leaks into another task.
pub(crate) async fn run_in<T, F>(ns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let file = ns.map(File::open).transpose()?;
    spawn_thread(move || {
        if let Some(file) = file {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)?;
        }
        f()
    })
    .await
}

/// A file handle on the namespace at `ns` (`None`: this process's own), for moving links.
pub(crate) fn open(ns: Option<&Path>) -> Result<File, NetError> {
    let path = ns.unwrap_or_else(|| Path::new("/proc/self/ns/net"));
    File::open(path).map_err(|e| NetError::io(format!("opening {}", path.display()), e))
}

/// Writes a sysctl under `/proc/sys/net` of the namespace `ns`: those files show the
/// namespace of the thread that opens them, hence [`run_in`].
pub(crate) async fn sysctl(ns: Option<&Path>, key: &str, value: &str) -> Result<(), NetError> {
    let file = Path::new("/proc/sys").join(key.replace('.', "/"));
    let what = format!("setting {key}={value}");
    let value = value.to_owned();
    run_in(ns, move || std::fs::write(file, value))
        .await
        .map_err(|e| NetError::io(what, e))
}

async fn spawn_thread<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nanobox-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// Makes [`NETNS_DIR`] a shared mount point, as `ip netns add` does, so namespaces
/// mounted there are seen from other mount namespaces too (a VMM in a jail, `ip netns`
/// run from a container sharing the host's /run/netns).
fn prepare_dir() -> io::Result<()> {
    let _guard = DIR_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(NETNS_DIR)?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            Ok(shared()?)
        }
        Err(e) => Err(e.into()),
    }
}
