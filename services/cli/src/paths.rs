//! Where NanoBox keeps its cached artefacts on this machine.

use std::path::PathBuf;

/// `$NANOBOX_CACHE_DIR`, else `$XDG_CACHE_HOME/nanobox`, else `~/.cache/nanobox`: the same
/// rule as guest/kernel/build.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NANOBOX_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("nanobox")
}

/// The guest kernel `vm run` boots when none is given: `$NANOBOX_KERNEL`, else the newest
/// build of guest/kernel/build.sh.
pub fn default_kernel() -> PathBuf {
    std::env::var_os("NANOBOX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("vmlinux"))
}

/// A fresh directory name for one VM's sockets and logs (the backend creates it).
pub fn vm_run_dir(id: &str) -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("nanobox-{id}"))
}

/// The guest init `template build` injects when none is given: `$NANOBOX_INIT`, else the
/// copy `cargo xtask setup` keeps in the cache.
pub fn default_init() -> PathBuf {
    std::env::var_os("NANOBOX_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("nanobox-init"))
}
