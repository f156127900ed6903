//! Can Firecracker run here? The binaries, KVM, and (given a kernel) a real boot.
//!
//! `/dev/kvm` being openable is not enough: on a nested PVM host it exists, KVM_CREATE_VM
//! succeeds (seen on the project's build machine), and still no normal guest runs. So the full check boots the kernel
//! once with no disk and a short deadline: a kernel that runs to its "cannot mount root"
//! panic proves KVM works for Firecracker. The probe runs Firecracker directly (not
//! jailed): it is about the host, not the jail's permissions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::api::{ActionType, BootSource, InstanceActionInfo, MachineConfiguration};
use super::config::FirecrackerConfig;
use super::layout::Layout;
use super::plan::PlannedRequest;
use super::vm::{self, Launch};
use crate::backend::Vm;

/// How long the probe boot may take to reach the kernel's panic. A KVM guest gets there
/// in well under a second; the rest is margin for a loaded host.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_CONSOLE_LIMIT: usize = 64 * 1024;
const KVM_API_VERSION: i32 = 12;
// _IO(KVMIO = 0xAE, nr): no size, no direction.
const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_CREATE_VM: u64 = 0xAE01;

/// Why Firecracker cannot run here. The `Display` text is the reason to show (tests print
/// it when they skip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// A binary is missing: `what` is "firecracker" or "jailer".
    NoBinary {
        what: &'static str,
        looked_for: PathBuf,
    },
    /// /dev/kvm cannot be opened or refuses to create a VM.
    KvmNotUsable(String),
    /// Firecracker started but could not boot the kernel.
    CannotBoot(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoBinary { what, looked_for } => write!(
                f,
                "no {what} binary ({} is not a file, nor found on PATH)",
                looked_for.display()
            ),
            Self::KvmNotUsable(why) => write!(f, "/dev/kvm not usable: {why}"),
            Self::CannotBoot(why) => write!(
                f,
                "/dev/kvm not usable for a normal guest (a probe boot failed): {why}"
            ),
        }
    }
}

impl std::error::Error for Unavailable {}

/// `name` if it is a path to a file, else the first file of that name on PATH.
pub fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Opens /dev/kvm read-write, checks its API version and creates (and drops) a VM.
#[allow(unsafe_code)]
pub fn check_kvm() -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("opening it: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and returns an int; the descriptor is
    // open for the whole call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return Err(format!(
            "KVM API version {version}, Firecracker needs {KVM_API_VERSION}"
        ));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0, the default) by value and returns
    // a new descriptor or -1; it touches no memory of ours.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return Err(format!(
            "KVM_CREATE_VM failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `vm` is a descriptor the kernel just created for us and nothing else owns;
    // the OwnedFd closes it.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

/// Checks that `cfg`'s binaries exist and KVM works; with `kernel`, also boots it once
/// (about a second on a KVM host, at most [`PROBE_TIMEOUT`] otherwise).
pub async fn check_available(
    cfg: &FirecrackerConfig,
    kernel: Option<&Path>,
) -> Result<(), Unavailable> {
    let binary = find_binary(&cfg.binary).ok_or_else(|| Unavailable::NoBinary {
        what: "firecracker",
        looked_for: cfg.binary.clone(),
    })?;
    if let Some(jailer) = &cfg.jailer {
        find_binary(&jailer.binary).ok_or_else(|| Unavailable::NoBinary {
            what: "jailer",
            looked_for: jailer.binary.clone(),
        })?;
    }
    check_kvm().map_err(Unavailable::KvmNotUsable)?;
    if let Some(kernel) = kernel {
        probe_boot(cfg, &binary, kernel)
            .await
            .map_err(Unavailable::CannotBoot)?;
    }
    Ok(())
}

async fn probe_boot(cfg: &FirecrackerConfig, binary: &Path, kernel: &Path) -> Result<(), String> {
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let run_dir = std::env::temp_dir().join(format!(
        "nanobox-fc-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::SeqCst)
    ));
    let kernel = kernel
        .to_str()
        .ok_or_else(|| format!("kernel path {} is not UTF-8", kernel.display()))?
        .to_owned();
    let requests = [
        PlannedRequest::new(&MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: Some(false),
            track_dirty_pages: None,
            huge_pages: None,
        }),
        PlannedRequest::new(&BootSource {
            kernel_image_path: kernel,
            // No root disk: the kernel boots to "VFS: Unable to mount root fs" and panics.
            boot_args: Some(
                "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux \
                 i8042.nopnp i8042.dumbkbd"
                    .into(),
            ),
            initrd_path: None,
        }),
        PlannedRequest::new(&InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        }),
    ]
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| e.to_string())?;

    std::fs::create_dir(&run_dir).map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let direct = FirecrackerConfig {
        binary: binary.to_path_buf(),
        jailer: None,
        ..cfg.clone()
    };
    let vm = vm::spawn(
        &direct,
        Launch {
            id: "nanobox-probe".into(),
            layout: Layout::direct(&run_dir),
            jail: None,
            console_limit: PROBE_CONSOLE_LIMIT,
            console_to_stderr: false,
            die_with_parent: true,
            netns: None,
            rootfs: None,
            memory_mib: 128,
            vcpus: 1,
            network: None,
            api_timeout: cfg.api_timeout,
            snapshot_timeout: cfg.snapshot_timeout,
        },
    );
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&run_dir);
            return Err(e.to_string());
        }
    };
    let boot = async {
        vm.wait_for_api(cfg.api_socket_timeout)
            .await
            .map_err(|e| e.to_string())?;
        vm.configure(requests).await.map_err(|e| e.to_string())?;
        let panicked = async {
            while !vm.console_tail().contains("Kernel panic") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            done = tokio::time::timeout(PROBE_TIMEOUT, panicked) => done.map_err(|_| {
                format!("the kernel did not reach its root-mount panic within {PROBE_TIMEOUT:?}")
            }),
            exit = vm.wait_exit() => {
                if vm.console_tail().contains("Kernel panic") {
                    Ok(())
                } else {
                    Err(format!("Firecracker exited ({exit}) before the kernel ran"))
                }
            }
        }
    };
    let result = boot.await;
    vm.abort().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_binary_is_named() {
        let cfg = FirecrackerConfig {
            binary: "/nonexistent/firecracker".into(),
            ..FirecrackerConfig::default()
        };
        let err = check_available(&cfg, None).await.expect_err("missing");
        assert!(matches!(
            err,
            Unavailable::NoBinary {
                what: "firecracker",
                ..
            }
        ));
        assert!(
            err.to_string().starts_with("no firecracker binary"),
            "{err}"
        );
    }

    #[test]
    fn binaries_are_found_by_path_or_name() {
        assert_eq!(
            find_binary(Path::new("sh")).map(|p| p.is_file()),
            Some(true)
        );
        assert!(find_binary(Path::new("/nonexistent/sh")).is_none());
        assert!(find_binary(Path::new("no-such-binary-anywhere")).is_none());
    }

    #[test]
    fn the_kvm_check_answers_either_way() {
        // Whatever this host has, the check returns (never hangs or panics), and a
        // refusal says what failed.
        if let Err(why) = check_kvm() {
            assert!(!why.is_empty());
        }
    }
}
