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
///
/// The probe costs a QEMU start (~150 ms); with `cache` set, its answer is kept in that
/// file, keyed by everything it depends on (the QEMU binary, the kernel, /dev/kvm).
pub async fn detect_accel(
    choice: AccelChoice,
    qemu: &Path,
    kernel: &Path,
    cache: Option<&Path>,
) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if !usable {
                return Accel::Tcg;
            }
            let key = probe_key(qemu, kernel);
            if let (Some(cache), Some(key)) = (cache, &key) {
                if let Some(accel) = read_cached(cache, key) {
                    return accel;
                }
            }
            let accel = if probe_kvm(qemu, kernel).await {
                Accel::Kvm
            } else {
                tracing::info!("KVM is present but cannot run this kernel; using TCG");
                Accel::Tcg
            };
            if let (Some(cache), Some(key)) = (cache, &key) {
                let _ = write_cached(cache, key, accel);
            }
            accel
        }
    }
}

fn file_id(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime()
    ))
}

fn resolve_binary(name: &Path) -> Option<std::path::PathBuf> {
    if name.components().count() > 1 {
        return Some(name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn probe_key(qemu: &Path, kernel: &Path) -> Option<String> {
    let qemu = resolve_binary(qemu)?;
    Some(format!(
        "v1 qemu={} kernel={} kvm={}",
        file_id(&qemu)?,
        file_id(kernel)?,
        file_id(Path::new("/dev/kvm"))?
    ))
}

fn read_cached(cache: &Path, key: &str) -> Option<Accel> {
    let text = std::fs::read_to_string(cache).ok()?;
    let (cached_key, accel) = text.trim_end().rsplit_once('\n')?;
    if cached_key != key {
        return None;
    }
    match accel {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

fn write_cached(cache: &Path, key: &str, accel: Accel) -> std::io::Result<()> {
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = cache.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{key}\n{}\n", accel.as_str()))?;
    std::fs::rename(tmp, cache)
}

async fn probe_kvm(qemu: &Path, kernel: &Path) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-accel",
        "kvm",
        "-M",
        "microvm,acpi=off",
        "-cpu",
        "host",
        "-m",
        "64",
    ])
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
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, run).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips_and_rejects_other_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("sub/accel");
        write_cached(&cache, "key-a", Accel::Tcg).expect("write");
        assert_eq!(read_cached(&cache, "key-a"), Some(Accel::Tcg));
        assert_eq!(read_cached(&cache, "key-b"), None);
        write_cached(&cache, "key-b", Accel::Kvm).expect("write");
        assert_eq!(read_cached(&cache, "key-b"), Some(Accel::Kvm));
    }

    #[test]
    fn choice_parses() {
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen"
            .parse::<AccelChoice>()
            .unwrap_err()
            .contains("auto, kvm or tcg"));
    }
}
