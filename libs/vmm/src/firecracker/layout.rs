//! Where a Firecracker VM's files live, seen from the host and from Firecracker.
//!
//! Run directly, Firecracker sees host paths and everything lives in the VM's run
//! directory. Under the jailer it is chrooted into `<chroot_base>/<binary>/<id>/root` and
//! is told paths inside that root; the host reaches the same files under the jail.
//!
//! The root disk is special because snapshots record its path and Firecracker reopens that
//! path on restore (there is no drive override). Jailed, the disk is `/rootfs.ext4` in
//! every jail. Run directly, Firecracker inherits the disk as descriptor 3 and opens
//! `/proc/self/fd/3`: the same path in every process, so a snapshot restores onto
//! whichever disk the restoring spec names, as it does under QEMU.

use std::path::{Path, PathBuf};

use super::JailerConfig;
use crate::{VmSpec, VmmError};

pub(crate) const API_SOCKET: &str = "api.sock";
pub(crate) const VSOCK_SOCKET: &str = "v.sock";
pub(crate) const LOG_FIFO: &str = "firecracker.log";
pub(crate) const KERNEL_FILE: &str = "vmlinux";
pub(crate) const ROOTFS_FILE: &str = "rootfs.ext4";
/// A restored VM's snapshot files inside its jail (Firecracker can read nothing outside).
pub(crate) const JAIL_RESTORE_DIR: &str = "restore";
/// The descriptor a directly run Firecracker inherits its root disk at.
pub(crate) const ROOTFS_FD: i32 = 3;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A file as the host sees it and as Firecracker is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub host: PathBuf,
    pub vmm: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Firecracker runs as this process's user and sees host paths.
    Direct { run_dir: PathBuf },
    /// Firecracker runs in the jail `jail_dir/root`.
    Jailed { run_dir: PathBuf, jail_dir: PathBuf },
}

impl Layout {
    pub fn direct(run_dir: &Path) -> Self {
        Self::Direct {
            run_dir: run_dir.to_path_buf(),
        }
    }

    /// The jail the jailer builds for VM `id`: `<chroot_base>/<exec file name>/<id>`.
    pub fn jailed(run_dir: &Path, jailer: &JailerConfig, exec_name: &str, id: &str) -> Self {
        Self::Jailed {
            run_dir: run_dir.to_path_buf(),
            jail_dir: jailer.chroot_base.join(exec_name).join(id),
        }
    }

    pub fn run_dir(&self) -> &Path {
        match self {
            Self::Direct { run_dir } | Self::Jailed { run_dir, .. } => run_dir,
        }
    }

    pub fn jail_dir(&self) -> Option<&Path> {
        match self {
            Self::Direct { .. } => None,
            Self::Jailed { jail_dir, .. } => Some(jail_dir),
        }
    }

    /// The directory Firecracker's own files (sockets, log) are created in.
    pub fn root(&self) -> PathBuf {
        match self {
            Self::Direct { run_dir } => run_dir.clone(),
            Self::Jailed { jail_dir, .. } => jail_dir.join("root"),
        }
    }

    /// A file in [`Self::root`].
    pub fn place(&self, name: &str) -> Result<Place, VmmError> {
        let host = self.root().join(name);
        let vmm = match self {
            Self::Direct { .. } => utf8("run directory", &host)?.to_owned(),
            Self::Jailed { .. } => format!("/{name}"),
        };
        Ok(Place { host, vmm })
    }

    pub fn api_socket(&self) -> Result<Place, VmmError> {
        let place = self.place(API_SOCKET)?;
        check_socket_path(&place.host)?;
        Ok(place)
    }

    pub fn vsock(&self) -> Result<Place, VmmError> {
        let place = self.place(VSOCK_SOCKET)?;
        check_socket_path(&place.host)?;
        Ok(place)
    }

    pub fn log(&self) -> Result<Place, VmmError> {
        self.place(LOG_FIFO)
    }

    /// The kernel as Firecracker opens it.
    pub fn kernel(&self, spec: &VmSpec) -> Result<String, VmmError> {
        match self {
            Self::Direct { .. } => Ok(utf8("kernel", &spec.kernel)?.to_owned()),
            Self::Jailed { .. } => Ok(format!("/{KERNEL_FILE}")),
        }
    }

    /// The root disk as Firecracker opens it (see the module docs).
    pub fn rootfs(&self) -> String {
        match self {
            Self::Direct { .. } => format!("/proc/self/fd/{ROOTFS_FD}"),
            Self::Jailed { .. } => format!("/{ROOTFS_FILE}"),
        }
    }

    /// Paths of the boot plan.
    pub fn vmm_paths(&self, spec: &VmSpec) -> Result<super::plan::VmmPaths, VmmError> {
        Ok(super::plan::VmmPaths {
            kernel: self.kernel(spec)?,
            rootfs: self.rootfs(),
            vsock_uds: self.vsock()?.vmm,
        })
    }
}

pub(crate) fn utf8<'a>(what: &str, path: &'a Path) -> Result<&'a str, VmmError> {
    path.to_str().ok_or_else(|| {
        VmmError::InvalidSpec(format!("{what} path {} is not UTF-8", path.display()))
    })
}

fn check_socket_path(path: &Path) -> Result<(), VmmError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmmError::InvalidSpec(format!(
            "socket path {} is {len} bytes, more than a Unix socket allows \
             ({MAX_SOCKET_PATH}); use a shorter run directory or chroot base",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriveSpec;

    #[test]
    fn direct_paths_are_host_paths_and_the_disk_is_a_descriptor() {
        let spec = VmSpec::new("a", "/k/vmlinux", DriveSpec::writable("/d/r"), "/run/a");
        let layout = Layout::direct(Path::new("/run/a"));
        let paths = layout.vmm_paths(&spec).expect("paths");
        assert_eq!(paths.kernel, "/k/vmlinux");
        assert_eq!(paths.rootfs, "/proc/self/fd/3");
        assert_eq!(paths.vsock_uds, "/run/a/v.sock");
        let api = layout.api_socket().expect("api");
        assert_eq!(api.host, Path::new("/run/a/api.sock"));
        assert_eq!(api.vmm, "/run/a/api.sock");
    }

    #[test]
    fn jailed_paths_are_inside_the_chroot() {
        let spec = VmSpec::new("vm-7", "/k/vmlinux", DriveSpec::writable("/d/r"), "/run/x");
        let mut jailer = JailerConfig::new(123, 100);
        jailer.chroot_base = "/srv/jail".into();
        let layout = Layout::jailed(Path::new("/run/x"), &jailer, "firecracker", "vm-7");
        assert_eq!(
            layout.jail_dir(),
            Some(Path::new("/srv/jail/firecracker/vm-7"))
        );
        let paths = layout.vmm_paths(&spec).expect("paths");
        assert_eq!(paths.kernel, "/vmlinux");
        assert_eq!(paths.rootfs, "/rootfs.ext4");
        assert_eq!(paths.vsock_uds, "/v.sock");
        let vsock = layout.vsock().expect("vsock");
        assert_eq!(
            vsock.host,
            Path::new("/srv/jail/firecracker/vm-7/root/v.sock")
        );
        assert_eq!(layout.log().expect("log").vmm, "/firecracker.log");
    }

    #[test]
    fn overlong_socket_paths_are_refused() {
        let long = format!("/tmp/{}", "d".repeat(120));
        let layout = Layout::direct(Path::new(&long));
        assert!(matches!(
            layout.api_socket(),
            Err(VmmError::InvalidSpec(m)) if m.contains("Unix socket")
        ));
    }
}
