//! Where NanoBox keeps cached artefacts on a machine (kernels, test images, the guest
//! init, the OCI blob cache).
//!
//! One rule for every binary and guest/kernel/build.sh: `$NANOBOX_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/nanobox`, else `~/.cache/nanobox`. Only environment variables are read.

use std::path::PathBuf;

/// The NanoBox cache directory (not created).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NANOBOX_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("nanobox")
}
