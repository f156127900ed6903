//! Copy-on-write root disks: each sandbox boots from its own writable clone of a cached
//! template, made without copying the template's data where the host allows it.
//!
//! Three methods, fastest first:
//!
//! - [`CowMethod::Reflink`]: `FICLONE` makes a new raw file sharing every extent of the
//!   template; blocks are copied only when the guest writes them. Needs a file system
//!   with reflinks (XFS made with `reflink=1`, btrfs) and template and clone on the same
//!   one. Works with every VMM.
//! - [`CowMethod::Qcow2`]: a qcow2 overlay whose backing file is the (read-only) template,
//!   made with `qemu-img create`. Any file system; QEMU only (Firecracker takes raw
//!   images). The overlay reads through to the template for the whole life of the
//!   sandbox, so the template must stay in place until the sandbox is gone (hold its
//!   [`crate::CachedTemplate`] that long).
//! - [`CowMethod::SparseCopy`]: a real copy of the template's data extents only
//!   (`SEEK_DATA`/`SEEK_HOLE`, `copy_file_range`), holes left as holes. Works anywhere;
//!   costs time and disk in proportion to the data in the template (except on a reflink
//!   file system, where the kernel's `copy_file_range` shares extents instead).
//!
//! [`CowPreference::Auto`] tries them in that order, qcow2 only when the caller says its
//! VMM can open qcow2, and logs and reports which one it used.
//!
//! Headroom: a template's ext4 already has free space, sized when it was built
//! (`nanobox_oci` `Ext4Options::headroom_*`); that is the primary place to set it.
//! [`CloneOptions::grow_bytes`] can add more to a raw clone (the file is extended and
//! `resize2fs` grows the ext4 offline, before boot). A qcow2 overlay is not grown: its
//! file system lives in the template and growing it would need the overlay attached to
//! the host (qemu-nbd); a request to grow one is refused, and auto mode then skips qcow2.
//!
//! The calls block (ioctls, copies, tools): from async code use
//! [`clone_rootfs_async`], which runs them on a blocking thread.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nanobox_vmm::DiskFormat;
use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::{tool, CowError};

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CowMethod {
    /// `FICLONE`: a raw file sharing the template's extents.
    Reflink,
    /// A qcow2 overlay backed by the template (QEMU only).
    Qcow2,
    /// A copy of the template's data extents, holes preserved.
    SparseCopy,
}

impl CowMethod {
    /// Every method, in the order auto mode tries them.
    pub const ALL: [CowMethod; 3] = [Self::Reflink, Self::Qcow2, Self::SparseCopy];

    /// A stable lower-case name, for logs and benchmark output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::Qcow2 => "qcow2",
            Self::SparseCopy => "sparse_copy",
        }
    }

    /// The disk format a VMM must open the clone with.
    pub fn format(self) -> DiskFormat {
        match self {
            Self::Reflink | Self::SparseCopy => DiskFormat::Raw,
            Self::Qcow2 => DiskFormat::Qcow2,
        }
    }
}

impl fmt::Display for CowMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which method(s) to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CowPreference {
    /// Reflink, then qcow2 if `qcow2` (the VMM can open qcow2, i.e. QEMU), then a sparse
    /// copy. A method this host cannot do ([`CowError::Unsupported`]) is skipped; any
    /// other failure is returned.
    Auto { qcow2: bool },
    /// This method or an error.
    Only(CowMethod),
}

impl Default for CowPreference {
    /// Auto without qcow2: the choice that works with every VMM.
    fn default() -> Self {
        Self::Auto { qcow2: false }
    }
}

/// Everything [`clone_rootfs_with`] can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneOptions {
    pub prefer: CowPreference,
    /// Bytes added to a raw clone's disk and file system (0: the template's size).
    pub grow_bytes: u64,
    /// Bound on each external tool run (`qemu-img`, `resize2fs`).
    pub tool_timeout: Duration,
    /// The `qemu-img` binary.
    pub qemu_img: PathBuf,
    /// The `resize2fs` binary.
    pub resize2fs: PathBuf,
}

impl Default for CloneOptions {
    fn default() -> Self {
        Self {
            prefer: CowPreference::default(),
            grow_bytes: 0,
            // qemu-img create takes milliseconds and resize2fs well under a second on a
            // few GiB; a minute only matters on a badly overloaded host.
            tool_timeout: Duration::from_secs(60),
            qemu_img: PathBuf::from("qemu-img"),
            resize2fs: PathBuf::from("resize2fs"),
        }
    }
}

/// A sandbox's root disk, made by [`clone_rootfs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowClone {
    pub path: PathBuf,
    pub method: CowMethod,
    /// What to put in the VM spec's `rootfs.format`.
    pub format: DiskFormat,
    /// The disk size the guest sees, in bytes.
    pub disk_bytes: u64,
}

/// Makes a writable copy-on-write clone of `template` at `dest` (which must not exist)
/// with the default options and the given preference. Blocking.
pub fn clone_rootfs(
    template: &Path,
    dest: &Path,
    prefer: CowPreference,
) -> Result<CowClone, CowError> {
    clone_rootfs_with(
        template,
        dest,
        &CloneOptions {
            prefer,
            ..CloneOptions::default()
        },
    )
}

/// [`clone_rootfs_with`] on a blocking thread.
pub async fn clone_rootfs_async(
    template: PathBuf,
    dest: PathBuf,
    options: CloneOptions,
) -> Result<CowClone, CowError> {
    tokio::task::spawn_blocking(move || clone_rootfs_with(&template, &dest, &options))
        .await
        .map_err(|e| CowError::io("the clone task failed", io::Error::other(e)))?
}

/// Makes a writable copy-on-write clone of `template` at `dest` (which must not exist).
/// Blocking. On failure nothing is left at `dest`.
pub fn clone_rootfs_with(
    template: &Path,
    dest: &Path,
    options: &CloneOptions,
) -> Result<CowClone, CowError> {
    if dest.symlink_metadata().is_ok() {
        return Err(CowError::DestinationExists(dest.display().to_string()));
    }
    let order: &[CowMethod] = match options.prefer {
        CowPreference::Only(ref method) => std::slice::from_ref(method),
        CowPreference::Auto { qcow2: true } => &CowMethod::ALL,
        CowPreference::Auto { qcow2: false } => &[CowMethod::Reflink, CowMethod::SparseCopy],
    };
    let mut skipped = Vec::new();
    for &method in order {
        let start = Instant::now();
        match clone_one(method, template, dest, options) {
            Ok(clone) => {
                tracing::info!(
                    template = %template.display(),
                    dest = %dest.display(),
                    %method,
                    skipped = %skipped.join("; "),
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    "root disk cloned"
                );
                return Ok(clone);
            }
            Err(CowError::Unsupported { method, reason }) if order.len() > 1 => {
                tracing::debug!(%method, %reason, "clone method not possible here, trying the next");
                skipped.push(format!("{method}: {reason}"));
            }
            Err(e) => return Err(e),
        }
    }
    // Unreachable in practice: the sparse copy, last in every auto order, is never
    // Unsupported. Kept as an error rather than a panic.
    Err(CowError::Unsupported {
        method: CowMethod::SparseCopy,
        reason: format!("no method worked: {}", skipped.join("; ")),
    })
}

fn clone_one(
    method: CowMethod,
    template: &Path,
    dest: &Path,
    options: &CloneOptions,
) -> Result<CowClone, CowError> {
    let template_len = template
        .metadata()
        .map_err(|e| CowError::io(format!("reading {}", template.display()), e))?
        .len();
    let result = match method {
        CowMethod::Reflink => reflink(template, dest),
        CowMethod::SparseCopy => sparse_copy_file(template, dest).map(|_| ()),
        CowMethod::Qcow2 => qcow2(template, dest, options),
    };
    let mut disk_bytes = template_len;
    let result = result.and_then(|()| {
        if method.format() == DiskFormat::Raw && options.grow_bytes > 0 {
            disk_bytes = grow_raw(dest, template_len, options)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        // A half-made clone is worthless and would make the next attempt (auto mode's
        // next method, or the caller's retry) fail on an existing destination.
        let _ = std::fs::remove_file(dest);
        return Err(e);
    }
    Ok(CowClone {
        path: dest.to_owned(),
        method,
        format: method.format(),
        disk_bytes,
    })
}

/// A new file for a clone: never an existing one, and readable and writable by the
/// owner only (the node agent hands it to a VMM; other users have no business in it).
fn create_dest(dest: &Path) -> Result<File, CowError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => CowError::DestinationExists(dest.display().to_string()),
            _ => CowError::io(format!("creating {}", dest.display()), e),
        })
}

fn open_template(template: &Path) -> Result<File, CowError> {
    File::open(template).map_err(|e| CowError::io(format!("opening {}", template.display()), e))
}

fn reflink(template: &Path, dest: &Path) -> Result<(), CowError> {
    let src = open_template(template)?;
    let dst = create_dest(dest)?;
    rustix::fs::ioctl_ficlone(&dst, &src).map_err(|errno| {
        // These say "this file system (or this pair of files) cannot share extents",
        // which auto mode answers by trying the next method; anything else is a fault.
        if [
            Errno::OPNOTSUPP,
            Errno::XDEV,
            Errno::INVAL,
            Errno::NOTTY,
            Errno::NOSYS,
            Errno::PERM,
        ]
        .contains(&errno)
        {
            CowError::Unsupported {
                method: CowMethod::Reflink,
                reason: format!(
                    "FICLONE from {} to {}: {}",
                    template.display(),
                    dest.display(),
                    io::Error::from(errno)
                ),
            }
        } else {
            CowError::io(
                format!("FICLONE from {} to {}", template.display(), dest.display()),
                errno.into(),
            )
        }
    })
}

fn qcow2(template: &Path, dest: &Path, options: &CloneOptions) -> Result<(), CowError> {
    if options.grow_bytes > 0 {
        return Err(CowError::Unsupported {
            method: CowMethod::Qcow2,
            reason: "an overlay's file system cannot be grown on the host; build the \
                     template with more headroom"
                .into(),
        });
    }
    // qcow2 resolves a relative backing path against the overlay's directory, so the
    // template is named absolutely.
    let backing = template
        .canonicalize()
        .map_err(|e| CowError::io(format!("resolving {}", template.display()), e))?;
    let mut cmd = Command::new(&options.qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&backing)
        .arg(dest);
    match tool::run("qemu-img", &mut cmd, options.tool_timeout) {
        Err(CowError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Err(CowError::Unsupported {
                method: CowMethod::Qcow2,
                reason: format!("{} is not installed", options.qemu_img.display()),
            })
        }
        other => other,
    }
}

/// Extends a raw clone by `options.grow_bytes` and grows its ext4 to fill it. Returns
/// the new disk size.
fn grow_raw(dest: &Path, template_len: u64, options: &CloneOptions) -> Result<u64, CowError> {
    let new_len = template_len.saturating_add(options.grow_bytes);
    OpenOptions::new()
        .write(true)
        .open(dest)
        .and_then(|f| f.set_len(new_len))
        .map_err(|e| CowError::io(format!("extending {}", dest.display()), e))?;
    let mut cmd = Command::new(&options.resize2fs);
    cmd.arg(dest);
    tool::run("resize2fs", &mut cmd, options.tool_timeout)?;
    Ok(new_len)
}

/// Copies `template` to a new file `dest`, data extents only: holes in the template stay
/// holes in the copy. Returns the bytes copied.
///
/// The copy is not fsynced: a sandbox's disk does not outlive a host crash in any case
/// (the sandbox is gone with it), so durability would only cost time.
pub fn sparse_copy_file(template: &Path, dest: &Path) -> Result<u64, CowError> {
    let src = open_template(template)?;
    let dst = create_dest(dest)?;
    let len = src
        .metadata()
        .map_err(|e| CowError::io(format!("reading {}", template.display()), e))?
        .len();
    sparse_copy(&src, &dst, len).map_err(|e| {
        CowError::io(
            format!("copying {} to {}", template.display(), dest.display()),
            e,
        )
    })
}

fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    // The whole length first, so that everything not written below reads as zeros and
    // takes no space.
    dst.set_len(len)?;
    let mut copied = 0;
    let mut pos = 0;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(offset) => offset,
            // No data after `pos`: the rest is one hole.
            Err(Errno::NXIO) => break,
            // No SEEK_DATA on this file system: treat the rest as data; the byte copy
            // below still skips zero blocks.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                copied += copy_range(src, dst, pos, len - pos)?;
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(len);
        copied += copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(copied)
}

/// Copies `len` bytes at `offset` from `src` to the same offset in `dst`, in the kernel
/// (`copy_file_range`) where it can, by reading and writing otherwise.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<u64> {
    let end = offset + len;
    let mut off_in = offset;
    let mut off_out = offset;
    while off_in < end {
        let chunk = usize::try_from(end - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the template shrank while being copied",
                ))
            }
            Ok(_) => {}
            // Not between these files (old kernel, different file system types): copy
            // the rest by hand.
            Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) => {
                copy_range_by_hand(src, dst, off_in, end - off_in)?;
                break;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(len)
}

fn copy_range_by_hand(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    const BUF: usize = 1 << 20;
    let mut buf = vec![0u8; BUF];
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let want = usize::try_from(end - pos).unwrap_or(BUF).min(BUF);
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the template shrank while being copied",
            ));
        }
        // Zero blocks inside a data extent (preallocated, or written as zeros) need not
        // be written: the destination reads zeros there already.
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// Creation times of every clone method for one template, as the benchmark reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowTiming {
    pub method: CowMethod,
    /// One duration per round, in round order (empty when unsupported).
    pub samples: Vec<Duration>,
    /// The median of `samples` (`None` when unsupported).
    pub median: Option<Duration>,
    /// Why the method could not run in this directory, if it could not.
    pub unsupported: Option<String>,
}

/// Times making a clone of `template` in `dir` with each method, `rounds` times,
/// alternating methods within a round so that machine noise hits all alike. Each clone
/// is removed (untimed) before the next. A method this host cannot do in `dir` (reflink
/// outside XFS/btrfs, qcow2 without `qemu-img`) is reported as unsupported. Blocking.
pub fn measure_cow(template: &Path, dir: &Path, rounds: usize) -> Result<Vec<CowTiming>, CowError> {
    let mut timings: Vec<CowTiming> = CowMethod::ALL
        .iter()
        .map(|&method| CowTiming {
            method,
            samples: Vec::new(),
            median: None,
            unsupported: None,
        })
        .collect();
    for round in 0..rounds {
        for timing in timings.iter_mut().filter(|t| t.unsupported.is_none()) {
            let dest = dir.join(format!(".measure-{}-{round}", timing.method));
            let _ = std::fs::remove_file(&dest);
            let start = Instant::now();
            let result = clone_rootfs(template, &dest, CowPreference::Only(timing.method));
            let elapsed = start.elapsed();
            let _ = std::fs::remove_file(&dest);
            match result {
                Ok(_) => timing.samples.push(elapsed),
                Err(CowError::Unsupported { reason, .. }) => timing.unsupported = Some(reason),
                Err(e) => return Err(e),
            }
        }
    }
    for timing in &mut timings {
        let mut sorted = timing.samples.clone();
        sorted.sort();
        timing.median = match sorted.len() {
            0 => None,
            n if n % 2 == 1 => Some(sorted[n / 2]),
            n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
        };
    }
    Ok(timings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_without_qcow2_never_picks_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t.img");
        std::fs::write(&template, vec![7u8; 8192]).unwrap();
        let clone = clone_rootfs(
            &template,
            &dir.path().join("c.img"),
            CowPreference::Auto { qcow2: false },
        )
        .unwrap();
        assert_ne!(clone.method, CowMethod::Qcow2);
        assert_eq!(clone.format, DiskFormat::Raw);
        assert_eq!(std::fs::read(&clone.path).unwrap(), vec![7u8; 8192]);
    }

    #[test]
    fn never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t.img");
        let dest = dir.path().join("c.img");
        std::fs::write(&template, b"template").unwrap();
        std::fs::write(&dest, b"precious").unwrap();
        for method in CowMethod::ALL {
            let err = clone_rootfs(&template, &dest, CowPreference::Only(method)).unwrap_err();
            assert!(matches!(err, CowError::DestinationExists(_)), "{err}");
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"precious");
    }

    #[test]
    fn qcow2_refuses_to_grow() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t.img");
        std::fs::write(&template, vec![0u8; 65536]).unwrap();
        let options = CloneOptions {
            prefer: CowPreference::Only(CowMethod::Qcow2),
            grow_bytes: 1 << 20,
            ..CloneOptions::default()
        };
        let dest = dir.path().join("c.qcow2");
        let err = clone_rootfs_with(&template, &dest, &options).unwrap_err();
        assert!(matches!(err, CowError::Unsupported { .. }), "{err}");
        assert!(!dest.exists());
    }
}
