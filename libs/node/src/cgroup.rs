//! Control groups for VMM processes: a CPU quota of the sandbox's vCPUs and a memory
//! limit of its guest memory plus the VMM's own overhead, so that a guest can never take
//! more of the host than it was given, whatever runs inside.
//!
//! cgroup v2 is used when its `cpu` and `memory` controllers are available at
//! `/sys/fs/cgroup`; on hosts still on the v1 (or hybrid) layout, the v1 `cpu` and
//! `memory` hierarchies are used instead. Where neither is writable the VM's own vCPU
//! and memory settings are the only limits, and that is logged once.

use std::path::{Path, PathBuf};

use crate::NodeError;

const ROOT: &str = "/sys/fs/cgroup";
/// The CFS period used for quotas, in microseconds.
const PERIOD_US: u64 = 100_000;

/// Which cgroup layout this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Unified hierarchy with cpu and memory controllers, rooted at the path.
    V2(PathBuf),
    /// Separate v1 `cpu` and `memory` hierarchies.
    V1 { cpu: PathBuf, memory: PathBuf },
    /// No usable controllers.
    Unavailable,
}

/// Limits for one VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

impl CgroupLayout {
    /// Looks at `/sys/fs/cgroup`.
    pub fn detect() -> Self {
        Self::detect_at(Path::new(ROOT))
    }

    fn detect_at(root: &Path) -> Self {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            return Self::V2(root.to_owned());
        }
        let cpu = root.join("cpu");
        let memory = root.join("memory");
        if cpu.join("cpu.cfs_quota_us").is_file() && memory.join("memory.limit_in_bytes").is_file()
        {
            return Self::V1 { cpu, memory };
        }
        Self::Unavailable
    }

    /// Creates the group `<parent>/<name>` with `limits` and moves `pid` into it.
    /// Returns the directories created (to remove with [`remove`]).
    pub fn place(
        &self,
        parent: &str,
        name: &str,
        limits: Limits,
        pid: u32,
    ) -> Result<Vec<PathBuf>, NodeError> {
        let quota = u64::from(limits.vcpus.max(1)) * PERIOD_US;
        match self {
            Self::Unavailable => Ok(Vec::new()),
            Self::V2(root) => {
                let parent_dir = root.join(parent);
                mkdir(&parent_dir)?;
                // Controllers must be enabled for the children of every level down to
                // the parent; the root's may already be, which is fine.
                enable_controllers(root)?;
                enable_controllers(&parent_dir)?;
                let dir = parent_dir.join(name);
                mkdir(&dir)?;
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // Never swap a guest's memory out behind its back.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("cgroup.procs"), &pid.to_string())?;
                Ok(vec![dir])
            }
            Self::V1 { cpu, memory } => {
                let cpu_dir = cpu.join(parent).join(name);
                let mem_dir = memory.join(parent).join(name);
                mkdir(&cpu_dir)?;
                mkdir(&mem_dir)?;
                write(&cpu_dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(
                    &mem_dir.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                write(&cpu_dir.join("cgroup.procs"), &pid.to_string())?;
                write(&mem_dir.join("cgroup.procs"), &pid.to_string())?;
                Ok(vec![cpu_dir, mem_dir])
            }
        }
    }
}

/// How long removal waits for a group's last process to be fully gone.
const REMOVE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Removes groups made by [`CgroupLayout::place`] once their processes have exited.
/// A killed VMM stays a member until it is reaped (by us, or by init when it outlived
/// its parent), and removal fails with EBUSY until then: retry for a while. Absent groups
/// are fine.
pub async fn remove(dirs: &[PathBuf]) {
    let deadline = tokio::time::Instant::now() + REMOVE_PATIENCE;
    for dir in dirs {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(nix::libc::EBUSY)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cgroup not removed");
                    break;
                }
            }
        }
    }
}

fn mkdir(dir: &Path) -> Result<(), NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| NodeError::io("creating a cgroup", dir, e))
}

fn write(path: &Path, value: &str) -> Result<(), NodeError> {
    std::fs::write(path, value).map_err(|e| NodeError::io("writing a cgroup file", path, e))
}

fn enable_controllers(dir: &Path) -> Result<(), NodeError> {
    let path = dir.join("cgroup.subtree_control");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current.contains("cpu") && current.contains("memory") {
        return Ok(());
    }
    write(&path, "+cpu +memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            CgroupLayout::detect_at(dir.path()),
            CgroupLayout::Unavailable
        );
        std::fs::create_dir_all(dir.path().join("cpu")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("memory")).expect("mkdir");
        std::fs::write(dir.path().join("cpu/cpu.cfs_quota_us"), "-1").expect("w");
        std::fs::write(dir.path().join("memory/memory.limit_in_bytes"), "1").expect("w");
        assert!(matches!(
            CgroupLayout::detect_at(dir.path()),
            CgroupLayout::V1 { .. }
        ));
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .expect("w");
        assert_eq!(
            CgroupLayout::detect_at(dir.path()),
            CgroupLayout::V2(dir.path().to_owned())
        );
    }
}
