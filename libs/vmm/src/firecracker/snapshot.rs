//! Snapshots of Firecracker VMs: Firecracker's own state and memory files, and a manifest.
//!
//! A snapshot directory holds `vmstate` (devices, vCPUs; versioned by Firecracker),
//! `memory` (all guest memory, a full snapshot) and `snapshot.json`, which says what
//! machine it is for and what the snapshot recorded about the host: the root disk's path
//! as Firecracker opened it (Firecracker reopens that path on restore), the vsock socket
//! and the TAP device. Restoring checks the manifest against the spec and overrides the
//! vsock socket and TAP where they differ.
//!
//! The memory file is mapped copy-on-write by the restored VM: it must not change while
//! any VM restored from it runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{VmSpec, VmmError};

pub(crate) const STATE_FILE: &str = "vmstate";
pub(crate) const MEMORY_FILE: &str = "memory";
pub(crate) const MANIFEST_FILE: &str = "snapshot.json";
const BACKEND: &str = "firecracker";
const FORMAT: u32 = 1;

/// The network interface a snapshot was taken with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SavedNet {
    pub iface_id: String,
    pub tap: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub backend: String,
    pub format: u32,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// The Firecracker that wrote it (`vmstate` is only loadable by compatible versions).
    pub vmm_version: String,
    /// The root disk's path as Firecracker saw it.
    pub drive_path: String,
    /// The vsock device's host socket as Firecracker saw it.
    pub vsock_uds: String,
    pub network: Option<SavedNet>,
}

impl Manifest {
    pub fn write(&self, dir: &Path) -> Result<(), VmmError> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| VmmError::Control(format!("encoding snapshot manifest: {e}")))?;
        std::fs::write(&path, text)
            .map_err(|e| VmmError::io(format!("writing {}", path.display()), e))
    }

    /// Reads the manifest in `dir` and checks that it is a Firecracker snapshot of the
    /// machine `spec` describes, taken with a disk at `drive_path`, and that its state
    /// and memory files are there.
    pub fn check(dir: &Path, spec: &VmSpec, drive_path: &str) -> Result<Self, VmmError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| VmmError::MissingFile {
            what: "snapshot manifest",
            path: path.clone(),
            source,
        })?;
        // The QEMU manifest lacks most fields: look at the backend first for a clear error.
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| VmmError::InvalidSpec(format!("{}: {e}", path.display())))?;
        let backend = value.get("backend").and_then(|b| b.as_str());
        let format = value.get("format").and_then(|f| f.as_u64());
        if backend != Some(BACKEND) || format != Some(u64::from(FORMAT)) {
            return Err(VmmError::InvalidSpec(format!(
                "{} is a {} snapshot (format {}), not a Firecracker one (format {FORMAT})",
                dir.display(),
                backend.unwrap_or("unknown"),
                format.map_or_else(|| "?".to_owned(), |f| f.to_string()),
            )));
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| VmmError::InvalidSpec(format!("{}: {e}", path.display())))?;
        if manifest.memory_mib != spec.memory_mib || manifest.vcpus != spec.vcpus {
            return Err(VmmError::InvalidSpec(format!(
                "snapshot is of a {} MiB / {} vCPU machine, the spec asks for {} MiB / {} vCPUs",
                manifest.memory_mib, manifest.vcpus, spec.memory_mib, spec.vcpus
            )));
        }
        if manifest.drive_path != drive_path {
            return Err(VmmError::InvalidSpec(format!(
                "snapshot's root disk was {} and would be {drive_path} now: snapshots taken \
                 with the jailer restore only with the jailer, and without only without",
                manifest.drive_path
            )));
        }
        match (&manifest.network, &spec.network) {
            (Some(_), None) => {
                return Err(VmmError::InvalidSpec(
                    "the snapshot has a network interface: the spec must name a TAP device".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(VmmError::InvalidSpec(
                    "the snapshot has no network interface and one cannot be added on restore"
                        .into(),
                ))
            }
            _ => {}
        }
        for (what, name) in [
            ("snapshot state", STATE_FILE),
            ("snapshot memory", MEMORY_FILE),
        ] {
            let file = dir.join(name);
            std::fs::metadata(&file).map_err(|source| VmmError::MissingFile {
                what,
                path: file,
                source,
            })?;
        }
        Ok(manifest)
    }
}

/// The manifest of a snapshot being taken now.
pub(crate) fn manifest(
    memory_mib: u32,
    vcpus: u8,
    vmm_version: String,
    drive_path: String,
    vsock_uds: String,
    network: Option<SavedNet>,
) -> Manifest {
    Manifest {
        backend: BACKEND.into(),
        format: FORMAT,
        memory_mib,
        vcpus,
        vmm_version,
        drive_path,
        vsock_uds,
        network,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriveSpec;

    fn snapshot_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        manifest(
            128,
            1,
            "1.10.1".into(),
            "/proc/self/fd/3".into(),
            "/run/a/v.sock".into(),
            None,
        )
        .write(dir.path())
        .expect("write");
        std::fs::write(dir.path().join(STATE_FILE), b"s").expect("write");
        std::fs::write(dir.path().join(MEMORY_FILE), b"m").expect("write");
        dir
    }

    fn spec() -> VmSpec {
        VmSpec::new("b", "/k", DriveSpec::writable("/r"), "/run/b")
    }

    #[test]
    fn a_matching_snapshot_is_accepted() {
        let dir = snapshot_dir();
        let m = Manifest::check(dir.path(), &spec(), "/proc/self/fd/3").expect("ok");
        assert_eq!(m.vsock_uds, "/run/a/v.sock");
    }

    #[test]
    fn mismatches_are_refused_with_the_reason() {
        let dir = snapshot_dir();
        let mut s = spec();
        s.memory_mib = 256;
        let err = Manifest::check(dir.path(), &s, "/proc/self/fd/3").expect_err("memory");
        assert!(err.to_string().contains("128 MiB"), "{err}");
        let err = Manifest::check(dir.path(), &spec(), "/rootfs.ext4").expect_err("jail");
        assert!(err.to_string().contains("jailer"), "{err}");
        let mut s = spec();
        s.network = Some(crate::NetSpec {
            tap: "t".into(),
            mac: "52:54:00:00:00:01".into(),
            rate_limit: None,
        });
        assert!(Manifest::check(dir.path(), &s, "/proc/self/fd/3").is_err());
        std::fs::remove_file(dir.path().join(MEMORY_FILE)).expect("rm");
        assert!(matches!(
            Manifest::check(dir.path(), &spec(), "/proc/self/fd/3"),
            Err(VmmError::MissingFile {
                what: "snapshot memory",
                ..
            })
        ));
    }

    #[test]
    fn a_qemu_snapshot_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            r#"{"backend":"qemu","format":1,"memory_mib":128,"vcpus":1}"#,
        )
        .expect("write");
        let err = Manifest::check(dir.path(), &spec(), "/proc/self/fd/3").expect_err("qemu");
        assert!(err.to_string().contains("is a qemu snapshot"), "{err}");
    }
}
