//! Settings of the Firecracker backend that are not part of a VM spec: which binaries to
//! run, whether to jail them, the guest's base command line and the deadlines.

use std::path::PathBuf;
use std::time::Duration;

/// The kernel command line every Firecracker guest starts with; the backend appends the
/// root device mode and the spec's extra arguments.
///
/// Compared with QEMU's (`qemu::kernel_cmdline`): Firecracker resets the machine through
/// the i8042 controller, so `reboot=k`, and a panic reboots after a second (`panic=1`),
/// which ends the VMM. `pci=off` skips probing a bus Firecracker does not emulate. ACPI
/// stays on: recent Firecracker versions describe their devices through it, and older ones
/// add `virtio_mmio.device=` entries, which the kernel also understands
/// (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). The i8042 flags skip the slow probing of a
/// keyboard controller that has no mouse port or multiplexer. No TSC flags: Firecracker
/// runs only on KVM, where the guest gets a stable TSC frequency from the hypervisor.
pub const DEFAULT_BOOT_ARGS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=1",
    "pci=off",
    "quiet",
    "init=/sbin/nanobox-init",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
];

/// Firecracker's own log level (`--level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    Error,
    #[default]
    Warning,
    Info,
    Debug,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "Error",
            Self::Warning => "Warning",
            Self::Info => "Info",
            Self::Debug => "Debug",
        }
    }
}

/// Which cgroup hierarchy the jailer places the VMM in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupVersion {
    V1,
    #[default]
    V2,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "1",
            Self::V2 => "2",
        }
    }
}

/// Running Firecracker under its jailer: in a chroot, as an unprivileged user, in its own
/// cgroup and (when the spec names one) network namespace.
///
/// The VM's network namespace comes from [`crate::VmSpec::netns`] and is handed to the
/// jailer as `--netns`. The jailer's `--daemonize` and `--new-pid-ns` are not used: the
/// backend keeps the VMM as its own child, reads its console from stdout and waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary (a path, or a name looked up on PATH).
    pub binary: PathBuf,
    /// Where the jails are built: `<chroot_base>/<firecracker binary name>/<vm id>/root`.
    /// The VM's root disk is hard-linked into its jail, so this must be on the same file
    /// system as the disks.
    pub chroot_base: PathBuf,
    /// The user and group Firecracker runs as; they own the jail and the VM's root disk.
    pub uid: u32,
    pub gid: u32,
    pub cgroup_version: CgroupVersion,
    /// The cgroup the VM's own cgroup is created under (the jailer's default is the
    /// Firecracker binary's name).
    pub parent_cgroup: Option<String>,
    /// Cgroup settings the jailer writes before Firecracker starts: (`cpu.max`,
    /// `"50000 100000"`), (`memory.max`, `"268435456"`), ...
    pub cgroups: Vec<(String, String)>,
    /// Resource limits (`--resource-limit`): (`no-file`, 1024), (`fsize`, ...).
    pub resource_limits: Vec<(String, u64)>,
}

impl JailerConfig {
    /// A jailer from PATH with the jailer's default chroot base and cgroup v2.
    pub fn new(uid: u32, gid: u32) -> Self {
        Self {
            binary: "jailer".into(),
            chroot_base: "/srv/jailer".into(),
            uid,
            gid,
            cgroup_version: CgroupVersion::V2,
            parent_cgroup: None,
            cgroups: Vec::new(),
            resource_limits: Vec::new(),
        }
    }
}

/// Settings of the Firecracker backend.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary (a path, or a name looked up on PATH).
    pub binary: PathBuf,
    /// Run every VMM under the jailer (production); `None` runs Firecracker directly as
    /// this process's user (development, tests).
    pub jailer: Option<JailerConfig>,
    /// The start of every guest's kernel command line.
    pub boot_args: Vec<String>,
    pub log_level: LogLevel,
    /// How long Firecracker may take to create its API socket.
    pub api_socket_timeout: Duration,
    /// Deadline of each configuration or control request.
    pub api_timeout: Duration,
    /// Deadline of writing or loading a snapshot (memory size bound).
    pub snapshot_timeout: Duration,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            binary: "firecracker".into(),
            jailer: None,
            boot_args: DEFAULT_BOOT_ARGS.iter().map(|s| (*s).to_owned()).collect(),
            log_level: LogLevel::default(),
            api_socket_timeout: Duration::from_secs(10),
            api_timeout: Duration::from_secs(10),
            snapshot_timeout: Duration::from_secs(120),
        }
    }
}
