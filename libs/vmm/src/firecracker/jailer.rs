//! Running Firecracker under its jailer: the command line, and the chroot the VM's files
//! are put into before the jailer starts.
//!
//! The jailer creates `<chroot_base>/<binary name>/<id>/root` (it leaves an existing one
//! alone), copies Firecracker in, creates `/dev/kvm` and `/dev/net/tun`, enters the cgroup
//! and network namespace, chroots, drops to `uid:gid` and execs Firecracker with the
//! arguments after `--`. Everything Firecracker opens must therefore already be inside
//! the root, readable (and for the disk writable) by `uid:gid`; this module puts it there.
//! The jailer cleans up nothing: the VM's actor removes the jail and the cgroup when the
//! VMM has exited.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::config::{CgroupVersion, JailerConfig};
use super::layout::{Layout, JAIL_RESTORE_DIR, KERNEL_FILE, ROOTFS_FILE};
use crate::{VmSpec, VmmError};

/// Where the jailer finds cgroup hierarchies (it reads /proc/mounts; this is where they
/// are on every supported host, and is only used to remove the VM's cgroup afterwards).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The jailer's command line (without the binary): jailer options, `--`, then
/// `firecracker_args` for Firecracker itself (the jailer adds `--id`).
pub fn command_args(
    jailer: &JailerConfig,
    exec_file: &Path,
    id: &str,
    netns: Option<&Path>,
    firecracker_args: &[OsString],
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut pair = |flag: &str, value: OsString| {
        a.push(flag.into());
        a.push(value);
    };
    pair("--id", id.into());
    pair("--exec-file", exec_file.into());
    pair("--uid", jailer.uid.to_string().into());
    pair("--gid", jailer.gid.to_string().into());
    pair("--chroot-base-dir", jailer.chroot_base.clone().into());
    pair("--cgroup-version", jailer.cgroup_version.as_str().into());
    if let Some(parent) = &jailer.parent_cgroup {
        pair("--parent-cgroup", parent.into());
    }
    for (key, value) in &jailer.cgroups {
        pair("--cgroup", format!("{key}={value}").into());
    }
    for (resource, value) in &jailer.resource_limits {
        pair("--resource-limit", format!("{resource}={value}").into());
    }
    if let Some(netns) = netns {
        pair("--netns", netns.into());
    }
    a.push("--".into());
    a.extend(firecracker_args.iter().cloned());
    a
}

/// The name the jailer files Firecracker under (the last component of the exec file),
/// checked against the jailer's rule that it contain "firecracker".
pub fn exec_name(exec_file: &Path) -> Result<String, VmmError> {
    let name = exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if !name.contains("firecracker") {
        return Err(VmmError::InvalidSpec(format!(
            "the jailer runs only binaries whose name contains \"firecracker\", not {}",
            exec_file.display()
        )));
    }
    Ok(name.to_owned())
}

/// Checks what can be checked of a jailer config without touching anything.
pub fn validate(jailer: &JailerConfig) -> Result<(), VmmError> {
    if !jailer.chroot_base.is_absolute() {
        return Err(VmmError::InvalidSpec(format!(
            "the jailer's chroot base {} must be absolute",
            jailer.chroot_base.display()
        )));
    }
    for (key, value) in &jailer.cgroups {
        let ok = key.contains('.')
            && !key.contains(['=', '/'])
            && !value.is_empty()
            && !value.contains('\n');
        if !ok {
            return Err(VmmError::InvalidSpec(format!(
                "cgroup setting {key}={value:?} must be <controller>.<file>=<value>"
            )));
        }
    }
    Ok(())
}

/// Creates the jail's root directory for a VM, owned by the jail's user. The jail must
/// not exist yet: one that does belongs to another VM with this id, or is a leftover
/// whose sockets would be in the way. After this succeeds the jail is the caller's to
/// remove.
pub fn create_jail(jailer: &JailerConfig, layout: &Layout) -> Result<(), VmmError> {
    let Some(jail_dir) = layout.jail_dir() else {
        return Err(VmmError::Control("not a jailed layout".into()));
    };
    if let Some(parent) = jail_dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| VmmError::io(format!("creating {}", parent.display()), e))?;
    }
    std::fs::create_dir(jail_dir).map_err(|e| {
        VmmError::io(
            format!(
                "creating jail {} (it must not exist yet)",
                jail_dir.display()
            ),
            e,
        )
    })?;
    let root = layout.root();
    std::fs::create_dir(&root)
        .map_err(|e| VmmError::io(format!("creating {}", root.display()), e))?;
    // The jailer would chown the root itself; doing it here lets this process create the
    // log FIFO and snapshot directories for the jail's user before the jailer runs.
    chown(jailer, &root)
}

/// Puts a booting VM's files into its jail: the kernel and the root disk.
///
/// The disk is hard-linked, never copied: the VM's writes must land in the caller's disk
/// (a copy would silently diverge and break snapshots), so it must be on the same file
/// system as the chroot base. Its owner becomes `uid:gid`. The kernel is hard-linked when
/// everyone may read it (the jail's user then can), otherwise copied and the copy given to
/// the jail's user.
pub fn link_boot_files(
    jailer: &JailerConfig,
    layout: &Layout,
    spec: &VmSpec,
) -> Result<(), VmmError> {
    let root = layout.root();
    link_kernel(jailer, &spec.kernel, &root.join(KERNEL_FILE))?;
    link_disk(jailer, &spec.rootfs.path, &root.join(ROOTFS_FILE))
}

/// Puts a restoring VM's files into its jail: the root disk (the snapshot names
/// `/rootfs.ext4`) and the snapshot's files in `/restore`. Those are linked (copied across
/// file systems): the memory file backs the guest's memory for the VM's whole life, and a
/// link keeps it even if the caller deletes the snapshot directory.
pub fn link_restore_files(
    jailer: &JailerConfig,
    layout: &Layout,
    spec: &VmSpec,
    snapshot_files: &[(PathBuf, &str)],
) -> Result<(), VmmError> {
    let root = layout.root();
    link_disk(jailer, &spec.rootfs.path, &root.join(ROOTFS_FILE))?;
    let dir = root.join(JAIL_RESTORE_DIR);
    make_owned_dir(jailer, &dir)?;
    for (source, name) in snapshot_files {
        let target = dir.join(name);
        link_or_copy(&resolve("snapshot file", source)?, &target)?;
        chown(jailer, &target)?;
    }
    Ok(())
}

/// A directory inside the jail that Firecracker may write (for snapshots).
pub fn make_owned_dir(jailer: &JailerConfig, dir: &Path) -> Result<(), VmmError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(VmmError::io(format!("creating {}", dir.display()), e)),
    }
    chown(jailer, dir)
}

/// `path` with every symlink resolved: link(2) links a symlink itself, and a symlink
/// (relative or not) points nowhere useful inside the jail.
fn resolve(what: &'static str, path: &Path) -> Result<PathBuf, VmmError> {
    std::fs::canonicalize(path).map_err(|source| VmmError::MissingFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn link_kernel(jailer: &JailerConfig, kernel: &Path, target: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let kernel = &resolve("kernel", kernel)?;
    let meta = std::fs::metadata(kernel).map_err(|source| VmmError::MissingFile {
        what: "kernel",
        path: kernel.to_path_buf(),
        source,
    })?;
    let world_readable = meta.permissions().mode() & 0o004 != 0;
    if world_readable && std::fs::hard_link(kernel, target).is_ok() {
        return Ok(());
    }
    std::fs::copy(kernel, target).map_err(|e| {
        VmmError::io(
            format!("copying {} to {}", kernel.display(), target.display()),
            e,
        )
    })?;
    chown(jailer, target)
}

fn link_disk(jailer: &JailerConfig, disk: &Path, target: &Path) -> Result<(), VmmError> {
    let disk = &resolve("rootfs", disk)?;
    if let Err(e) = std::fs::hard_link(disk, target) {
        if e.raw_os_error() == Some(libc::EXDEV) {
            return Err(VmmError::InvalidSpec(format!(
                "root disk {} is on another file system than the jailer's chroot base; \
                 the jail needs a hard link to it (a copy would not be the caller's disk)",
                disk.display()
            )));
        }
        return Err(VmmError::io(
            format!("linking {} into the jail", disk.display()),
            e,
        ));
    }
    // The link is the caller's disk: its owner changes too, which is the point (the
    // jailed Firecracker must write it).
    chown(jailer, target)
}

/// Hard-links `source` to `target`, copying when they are on different file systems.
pub fn link_or_copy(source: &Path, target: &Path) -> Result<(), VmmError> {
    match std::fs::hard_link(source, target) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(source, target).map(drop).map_err(|e| {
                VmmError::io(
                    format!("copying {} to {}", source.display(), target.display()),
                    e,
                )
            })
        }
        Err(e) => Err(VmmError::io(
            format!("linking {} to {}", source.display(), target.display()),
            e,
        )),
    }
}

/// Moves `source` to `target`: a rename, or across file systems a copy beside `target`
/// renamed over it. Never written in place: an existing `target` may be the memory file a
/// restored VM still maps, and truncating it would corrupt that VM's memory; renaming over
/// it leaves the old file to whoever still has it open.
pub fn move_file(source: &Path, target: &Path) -> Result<(), VmmError> {
    match std::fs::rename(source, target) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let mut partial = target.as_os_str().to_owned();
            partial.push(".partial");
            let partial = PathBuf::from(partial);
            std::fs::copy(source, &partial).map_err(|e| {
                VmmError::io(
                    format!("copying {} to {}", source.display(), partial.display()),
                    e,
                )
            })?;
            std::fs::rename(&partial, target).map_err(|e| {
                VmmError::io(
                    format!("moving {} to {}", partial.display(), target.display()),
                    e,
                )
            })?;
            std::fs::remove_file(source)
                .map_err(|e| VmmError::io(format!("removing {}", source.display()), e))
        }
        Err(e) => Err(VmmError::io(
            format!("moving {} to {}", source.display(), target.display()),
            e,
        )),
    }
}

pub fn chown(jailer: &JailerConfig, path: &Path) -> Result<(), VmmError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(jailer.uid)),
        Some(nix::unistd::Gid::from_raw(jailer.gid)),
    )
    .map_err(|e| {
        VmmError::io(
            format!("giving {} to {}:{}", path.display(), jailer.uid, jailer.gid),
            e.into(),
        )
    })
}

/// The cgroup directories the jailer creates for VM `id`, for removal after it exits:
/// `<root>/<parent>/<id>` under cgroup v2, and that under each configured controller's
/// hierarchy under v1.
pub fn cgroup_dirs(jailer: &JailerConfig, exec_name: &str, id: &str) -> Vec<PathBuf> {
    let parent = jailer.parent_cgroup.as_deref().unwrap_or(exec_name);
    let root = Path::new(CGROUP_ROOT);
    match jailer.cgroup_version {
        CgroupVersion::V2 => vec![root.join(parent).join(id)],
        CgroupVersion::V1 => {
            let mut controllers: Vec<&str> = jailer
                .cgroups
                .iter()
                .filter_map(|(key, _)| key.split('.').next())
                .collect();
            controllers.sort_unstable();
            controllers.dedup();
            controllers
                .into_iter()
                .map(|c| root.join(c).join(parent).join(id))
                .collect()
        }
    }
}

/// Removes what the jail left behind once its VMM has exited: the jail directory (links
/// and copies only; the caller's disk stays) and the VM's cgroups. Best effort: every
/// failure is logged and the rest still removed.
pub fn cleanup(jail_dir: &Path, cgroups: &[PathBuf]) {
    if let Err(e) = std::fs::remove_dir_all(jail_dir) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!(dir = %jail_dir.display(), error = %e, "removing VM jail");
        }
    }
    for dir in cgroups {
        // rmdir: a cgroup directory goes away only when empty of processes, which it is
        // once the VMM has exited.
        if let Err(e) = std::fs::remove_dir(dir) {
            if e.kind() != ErrorKind::NotFound {
                tracing::debug!(dir = %dir.display(), error = %e, "removing VM cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriveSpec;

    fn words(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn config() -> JailerConfig {
        let mut j = JailerConfig::new(123, 100);
        j.chroot_base = "/srv/jailer".into();
        j
    }

    #[test]
    fn the_command_line_is_exact() {
        let mut j = config();
        j.parent_cgroup = Some("nanobox".into());
        j.cgroups = vec![
            ("cpu.max".into(), "50000 100000".into()),
            ("memory.max".into(), "268435456".into()),
        ];
        j.resource_limits = vec![("no-file".into(), 1024)];
        let fc_args: Vec<OsString> = ["--api-sock", "/api.sock"].iter().map(Into::into).collect();
        let args = command_args(
            &j,
            Path::new("/usr/bin/firecracker"),
            "vm-1",
            Some(Path::new("/run/netns/nbx-1")),
            &fc_args,
        );
        assert_eq!(
            words(&args),
            [
                "--id",
                "vm-1",
                "--exec-file",
                "/usr/bin/firecracker",
                "--uid",
                "123",
                "--gid",
                "100",
                "--chroot-base-dir",
                "/srv/jailer",
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "nanobox",
                "--cgroup",
                "cpu.max=50000 100000",
                "--cgroup",
                "memory.max=268435456",
                "--resource-limit",
                "no-file=1024",
                "--netns",
                "/run/netns/nbx-1",
                "--",
                "--api-sock",
                "/api.sock",
            ]
        );
    }

    #[test]
    fn the_minimal_command_line_has_no_optional_flags() {
        let args = command_args(
            &config(),
            Path::new("/opt/fc/firecracker-v1.10"),
            "a",
            None,
            &[],
        );
        assert_eq!(
            words(&args).join(" "),
            "--id a --exec-file /opt/fc/firecracker-v1.10 --uid 123 --gid 100 \
             --chroot-base-dir /srv/jailer --cgroup-version 2 --"
        );
    }

    #[test]
    fn exec_names_and_configs_are_checked() {
        assert_eq!(
            exec_name(Path::new("/usr/bin/firecracker-v1.10")).expect("ok"),
            "firecracker-v1.10"
        );
        assert!(exec_name(Path::new("/usr/bin/qemu")).is_err());
        let mut j = config();
        j.chroot_base = "relative".into();
        assert!(validate(&j).is_err());
        let mut j = config();
        j.cgroups = vec![("cpu".into(), "1".into())];
        assert!(validate(&j).is_err());
        assert!(validate(&config()).is_ok());
    }

    #[test]
    fn cgroup_dirs_follow_the_version() {
        let mut j = config();
        assert_eq!(
            cgroup_dirs(&j, "firecracker", "vm-1"),
            [PathBuf::from("/sys/fs/cgroup/firecracker/vm-1")]
        );
        j.cgroup_version = CgroupVersion::V1;
        j.parent_cgroup = Some("nbx".into());
        j.cgroups = vec![
            ("cpuset.cpus".into(), "0".into()),
            ("cpu.shares".into(), "10".into()),
            ("cpuset.mems".into(), "0".into()),
        ];
        assert_eq!(
            cgroup_dirs(&j, "firecracker", "vm-1"),
            [
                PathBuf::from("/sys/fs/cgroup/cpu/nbx/vm-1"),
                PathBuf::from("/sys/fs/cgroup/cpuset/nbx/vm-1"),
            ]
        );
    }

    #[test]
    fn the_chroot_holds_links_to_the_kernel_and_disk_owned_by_the_jail_user() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        // The kernel is named through a relative symlink, as the build cache does.
        std::fs::create_dir(dir.path().join("k1")).expect("mkdir");
        let kernel = dir.path().join("k1/vmlinux");
        let kernel_link = dir.path().join("vmlinux");
        std::os::unix::fs::symlink("k1/vmlinux", &kernel_link).expect("symlink");
        let disk = dir.path().join("disk.ext4");
        std::fs::write(&kernel, b"kernel").expect("write");
        std::fs::write(&disk, b"disk").expect("write");
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        // Our own ids: chown to them works without privileges.
        let mut j = JailerConfig::new(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        j.chroot_base = dir.path().join("jails");
        let spec = VmSpec::new(
            "vm-9",
            &kernel_link,
            DriveSpec::writable(&disk),
            dir.path().join("run"),
        );
        let layout = Layout::jailed(&spec.run_dir, &j, "firecracker", "vm-9");
        create_jail(&j, &layout).expect("jail");
        link_boot_files(&j, &layout, &spec).expect("link");

        let root = dir.path().join("jails/firecracker/vm-9/root");
        assert_eq!(layout.root(), root);
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(ino(&root.join("vmlinux")), ino(&kernel), "kernel is linked");
        let linked = std::fs::symlink_metadata(root.join("vmlinux")).expect("lstat");
        assert!(linked.is_file(), "the jail got the symlink, not the kernel");
        assert_eq!(ino(&root.join("rootfs.ext4")), ino(&disk), "disk is linked");
        assert_eq!(std::fs::metadata(&root).expect("stat").uid(), j.uid);

        // A second VM with the same id is refused rather than sharing the jail.
        assert!(create_jail(&j, &layout).is_err());

        // A kernel only its owner may read is copied instead of linked.
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let other = Layout::jailed(&spec.run_dir, &j, "firecracker", "vm-10");
        create_jail(&j, &other).expect("jail");
        link_boot_files(&j, &other, &spec).expect("link");
        let copy = dir.path().join("jails/firecracker/vm-10/root/vmlinux");
        assert_ne!(ino(&copy), ino(&kernel));
        assert_eq!(std::fs::read(&copy).expect("read"), b"kernel");

        cleanup(&dir.path().join("jails/firecracker/vm-9"), &[]);
        assert!(!dir.path().join("jails/firecracker/vm-9").exists());
        assert_eq!(std::fs::read(&disk).expect("disk stays"), b"disk");
    }
}
