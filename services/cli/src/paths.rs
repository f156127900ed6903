//! Where NanoBox keeps its cached artefacts on this machine.

use std::path::PathBuf;

pub use nanobox_core::cache_dir;

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
