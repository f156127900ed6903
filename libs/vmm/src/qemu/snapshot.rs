//! Snapshots of QEMU VMs: QEMU's migration stream written to a file.
//!
//! QEMU 7.2 has no `file:` migration URI, so the stream goes through `exec:cat`. The
//! snapshot directory holds `state` (RAM and device state) and `snapshot.json` (what
//! machine it is for, checked on restore). Restoring starts QEMU with the same machine
//! and `-incoming defer`, feeds it the stream and continues the vCPUs.
//!
//! A faster variant keeps guest RAM in a shared file and migrates only device state
//! (x-ignore-shared); it needs file-backed memory from boot and is left for the pool and
//! snapshot-store work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{VmSpec, VmmError};

pub(crate) const STATE_FILE: &str = "state";
pub(crate) const MANIFEST_FILE: &str = "snapshot.json";
const FORMAT: u32 = 1;

/// How long a save or restore of the migration stream may take.
pub(crate) const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How often migration progress is polled.
pub(crate) const MIGRATION_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub backend: String,
    pub format: u32,
    pub memory_mib: u32,
    pub vcpus: u8,
}

impl Manifest {
    pub fn for_spec(memory_mib: u32, vcpus: u8) -> Self {
        Self {
            backend: "qemu".into(),
            format: FORMAT,
            memory_mib,
            vcpus,
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), VmmError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| VmmError::Control(format!("encoding snapshot manifest: {e}")))?;
        std::fs::write(dir.join(MANIFEST_FILE), text)
            .map_err(|e| VmmError::io(format!("writing {}", dir.join(MANIFEST_FILE).display()), e))
    }

    /// Reads the manifest in `dir` and checks that it is a QEMU snapshot of the machine
    /// `spec` describes.
    pub fn check(dir: &Path, spec: &VmSpec) -> Result<Self, VmmError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| VmmError::MissingFile {
            what: "snapshot manifest",
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| VmmError::InvalidSpec(format!("{}: {e}", path.display())))?;
        let want = Self::for_spec(spec.memory_mib, spec.vcpus);
        if manifest.backend != want.backend || manifest.format != want.format {
            return Err(VmmError::InvalidSpec(format!(
                "{} is a {} snapshot (format {}), not a QEMU one (format {FORMAT})",
                dir.display(),
                manifest.backend,
                manifest.format
            )));
        }
        if manifest.memory_mib != want.memory_mib || manifest.vcpus != want.vcpus {
            return Err(VmmError::InvalidSpec(format!(
                "snapshot is of a {} MiB / {} vCPU machine, the spec asks for {} MiB / {} vCPUs",
                manifest.memory_mib, manifest.vcpus, want.memory_mib, want.vcpus
            )));
        }
        Ok(manifest)
    }
}

/// The state file of a snapshot directory as a shell word for QEMU's `exec:` URI.
///
/// QEMU hands the URI to /bin/sh, so only paths made of plainly safe characters are
/// accepted; they are single-quoted besides.
pub(crate) fn shell_path(path: &Path) -> Result<String, VmmError> {
    let text = path.to_str().ok_or_else(|| {
        VmmError::InvalidSpec(format!("snapshot path {} is not UTF-8", path.display()))
    })?;
    let safe = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+@=".contains(&b));
    if !safe || !text.starts_with('/') {
        return Err(VmmError::InvalidSpec(format!(
            "snapshot path {text:?} must be absolute and use only [A-Za-z0-9/._-+@=]"
        )));
    }
    Ok(format!("'{text}'"))
}

pub(crate) fn save_uri(dir: &Path) -> Result<String, VmmError> {
    Ok(format!("exec:cat > {}", shell_path(&dir.join(STATE_FILE))?))
}

pub(crate) fn load_uri(dir: &Path) -> Result<String, VmmError> {
    Ok(format!("exec:cat {}", shell_path(&dir.join(STATE_FILE))?))
}

/// Interprets a `query-migrate` reply: `Ok(true)` when done, `Ok(false)` while running.
pub(crate) fn migration_done(reply: &Value) -> Result<bool, VmmError> {
    match reply.get("status").and_then(Value::as_str) {
        Some("completed") => Ok(true),
        Some("failed") | Some("cancelled") => Err(VmmError::Control(format!(
            "migration failed: {}",
            reply
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
        ))),
        // Incoming migrations report nothing until they start; "setup", "active", ...
        _ => Ok(false),
    }
}

pub(crate) fn migrate_args(uri: &str) -> Value {
    json!({ "uri": uri })
}

pub(crate) fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_quote_safe_paths_and_refuse_others() {
        assert_eq!(
            save_uri(Path::new("/var/lib/nanobox/snap-1")).expect("safe"),
            "exec:cat > '/var/lib/nanobox/snap-1/state'"
        );
        assert_eq!(
            load_uri(Path::new("/s")).expect("safe"),
            "exec:cat '/s/state'"
        );
        for bad in [
            "relative/dir",
            "/tmp/a b",
            "/tmp/x';rm -rf /;'",
            "/tmp/$(id)",
            "/tmp/a\nb",
        ] {
            assert!(save_uri(Path::new(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn migration_status_is_interpreted() {
        assert!(migration_done(&json!({"status": "completed"})).expect("ok"));
        assert!(!migration_done(&json!({"status": "active"})).expect("ok"));
        assert!(!migration_done(&json!({})).expect("ok"));
        let err = migration_done(&json!({"status": "failed", "error-desc": "disk full"}))
            .expect_err("failed");
        assert!(err.to_string().contains("disk full"));
    }

    #[test]
    fn manifest_must_match_the_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        Manifest::for_spec(128, 1).write(dir.path()).expect("write");
        let mut spec = VmSpec::new("x", "/k", crate::DriveSpec::writable("/r"), "/run/x");
        spec.memory_mib = 128;
        assert!(Manifest::check(dir.path(), &spec).is_ok());
        spec.memory_mib = 256;
        let err = Manifest::check(dir.path(), &spec).expect_err("mismatch");
        assert!(err.to_string().contains("128 MiB"), "{err}");
        assert!(matches!(
            Manifest::check(Path::new("/nonexistent"), &spec),
            Err(VmmError::MissingFile { .. })
        ));
    }
}
