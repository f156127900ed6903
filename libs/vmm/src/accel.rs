//! Choosing between KVM and software emulation (TCG).
//!
//! `/dev/kvm` existing is not enough: on a nested PVM host it exists but only runs
//! PVM-patched guests, and a normal guest aborts or hangs under it. So `auto` boots the
//! kernel once under KVM with no root disk and a short deadline: if the kernel runs to its
//! "cannot mount root" panic and QEMU exits cleanly, KVM works.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The accelerator a QEMU VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// The configured choice: `auto | kvm | tcg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!("accel must be auto, kvm or tcg, not {other:?}")),
        }
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_OUTPUT_LIMIT: u64 = 256 * 1024;

/// Resolves `choice` to an accelerator. `kvm` is taken as asked (a broken KVM then fails
/// at launch with QEMU's own message); `auto` probes as described in the module docs.
pub async fn detect_accel(choice: AccelChoice, qemu: &Path, kernel: &Path) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if usable && probe_kvm(qemu, kernel).await {
                Accel::Kvm
            } else {
                tracing::info!("KVM not usable here; using TCG software emulation");
                Accel::Tcg
            }
        }
    }
}

async fn probe_kvm(qemu: &Path, kernel: &Path) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-accel", "kvm", "-M", "microvm,acpi=off", "-cpu", "host", "-m", "64"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 reboot=t acpi=off"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let Some(stdout) = child.stdout.take() else {
        return false;
    };
    let run = async {
        let mut out = Vec::new();
        let _ = stdout.take(PROBE_OUTPUT_LIMIT).read_to_end(&mut out).await;
        let status = child.wait().await.ok()?;
        Some(status.success() && String::from_utf8_lossy(&out).contains("Kernel panic"))
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, run).await, Ok(Some(true)))
}
