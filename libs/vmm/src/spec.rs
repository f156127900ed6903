//! What to run: the backend-neutral description of one VM.

use std::path::PathBuf;

use crate::VmmError;

/// Default bound on the console output kept per VM.
pub const DEFAULT_CONSOLE_LIMIT: usize = 256 * 1024;

/// The on-disk format of a block device image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFormat {
    /// A plain image (ext4 written directly).
    #[default]
    Raw,
    /// A qcow2 overlay over a backing image (QEMU only): the node agent's copy-on-write
    /// clone of a template where the file system cannot reflink.
    Qcow2,
}

/// A block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// Writes go to a throwaway overlay and the image is never modified (QEMU only;
    /// the node agent gives each sandbox its own copy-on-write clone instead).
    pub ephemeral: bool,
    pub format: DiskFormat,
}

impl DriveSpec {
    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            ephemeral: false,
            format: DiskFormat::Raw,
        }
    }
}

/// A token bucket: `rate_bytes_per_sec` sustained, bursts up to `burst_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub rate_bytes_per_sec: u64,
    pub burst_bytes: u64,
}

/// The guest's network interface: a TAP device on the host side, which must exist (in
/// the VM's network namespace, when it has one) before launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The TAP device's name.
    pub tap: String,
    /// The guest MAC address, `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// Applied by the VMM where it can (Firecracker's rate limiter); the node agent
    /// shapes the TAP with `tc` for VMMs that cannot.
    pub rate_limit: Option<RateLimit>,
}

/// One VM, independent of the backend that runs it.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Names the VM in logs and its run directory: `[a-z0-9-]{1,64}`.
    pub id: String,
    /// Uncompressed ELF kernel with a PVH entry point.
    pub kernel: PathBuf,
    /// The root filesystem, an ext4 image; the guest sees it as /dev/vda.
    pub rootfs: DriveSpec,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to the backend's kernel command line.
    pub extra_kernel_args: Vec<String>,
    /// Directory for the VM's sockets and logs; created by the backend, removed when the
    /// VM is gone. Must not exist yet.
    pub run_dir: PathBuf,
    /// Bytes of console output kept in memory (the tail).
    pub console_limit: usize,
    /// Also copy the console to this process's stderr (debugging).
    pub console_to_stderr: bool,
    /// Kill the VMM if the process that started it dies. The CLI wants this; the node
    /// agent does not (it re-attaches to running VMs after a restart).
    pub die_with_parent: bool,
    /// The guest's network interface; `None` means no network device at all.
    pub network: Option<NetSpec>,
    /// A network namespace (`/run/netns/<name>`) the VMM process runs in, so its TAP
    /// device and addresses are private to this VM.
    pub netns: Option<PathBuf>,
}

impl VmSpec {
    pub fn new(
        id: impl Into<String>,
        kernel: impl Into<PathBuf>,
        rootfs: DriveSpec,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            id: id.into(),
            kernel: kernel.into(),
            rootfs,
            vcpus: 1,
            memory_mib: 128,
            extra_kernel_args: Vec::new(),
            run_dir: run_dir.into(),
            console_limit: DEFAULT_CONSOLE_LIMIT,
            console_to_stderr: false,
            die_with_parent: true,
            network: None,
            netns: None,
        }
    }

    /// Checks what can be checked without starting anything.
    pub fn validate(&self) -> Result<(), VmmError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(VmmError::InvalidSpec(format!(
                "VM id {:?} must be 1-64 characters of [a-z0-9-]",
                self.id
            )));
        }
        if !(1..=32).contains(&self.vcpus) {
            return Err(VmmError::InvalidSpec(format!(
                "vcpus {} is outside 1..=32",
                self.vcpus
            )));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return Err(VmmError::InvalidSpec(format!(
                "memory {} MiB is outside 64..=65536",
                self.memory_mib
            )));
        }
        for arg in &self.extra_kernel_args {
            if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(VmmError::InvalidSpec(format!(
                    "kernel argument {arg:?} is not one word"
                )));
            }
        }
        for (what, path) in [("kernel", &self.kernel), ("rootfs", &self.rootfs.path)] {
            std::fs::File::open(path).map_err(|source| VmmError::MissingFile {
                what,
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &tempfile::TempDir) -> VmSpec {
        let kernel = dir.path().join("vmlinux");
        let rootfs = dir.path().join("root.ext4");
        std::fs::write(&kernel, b"k").expect("write");
        std::fs::write(&rootfs, b"r").expect("write");
        VmSpec::new(
            "vm-1",
            kernel,
            DriveSpec::writable(rootfs),
            dir.path().join("run"),
        )
    }

    #[test]
    fn validates_ids_sizes_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(spec(&dir).validate().is_ok());
        for bad in ["", "UPPER", "a/b", "../x", &"x".repeat(65)] {
            let mut s = spec(&dir);
            s.id = bad.to_owned();
            assert!(
                matches!(s.validate(), Err(VmmError::InvalidSpec(_))),
                "{bad:?}"
            );
        }
        let mut s = spec(&dir);
        s.memory_mib = 16;
        assert!(s.validate().unwrap_err().to_string().contains("memory 16"));
        let mut s = spec(&dir);
        s.vcpus = 0;
        assert!(s.validate().is_err());
        let mut s = spec(&dir);
        s.extra_kernel_args = vec!["a b".into()];
        assert!(s.validate().is_err());
        let mut s = spec(&dir);
        s.kernel = dir.path().join("missing");
        assert!(matches!(
            s.validate(),
            Err(VmmError::MissingFile { what: "kernel", .. })
        ));
    }
}
