//! Path handling confined to a staging root.
//!
//! Layer entries name paths chosen by whoever built the image, and earlier entries may have
//! planted symlinks. Every path is therefore resolved here component by component with
//! `lstat`, never by the kernel: a symlink met on the way is either refused or resolved
//! with the root as `/` (the way `umoci` and containerd do it, so `lib -> usr/lib` from a
//! lower layer still works), and the final component is never followed (it is removed and
//! replaced). This is sound because the staging root is private to the builder: nothing
//! else writes into it while layers are applied, so what `lstat` saw is still true at the
//! next system call.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::error::OciError;

/// How many symlinks one resolution may pass through (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// The longest name of one directory entry Linux (and ext4) can hold, in bytes.
const NAME_MAX: usize = 255;

/// Splits an entry name into its components: a leading `/` and `.` components are
/// dropped; `..`, NUL and a component longer than Linux's 255 bytes are refused. Names
/// are bytes: any other byte, valid UTF-8 or not, is kept as it is. No components means
/// the root itself.
pub(crate) fn split_entry(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' component"),
            other if other.len() > NAME_MAX => {
                return Err("a name longer than the 255 bytes Linux allows")
            }
            other => out.push(OsStr::from_bytes(other).to_owned()),
        }
    }
    Ok(out)
}

/// What [`StagingRoot::clear_slot`] left at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Nothing is there now.
    Empty,
    /// A directory was there and was kept.
    Dir,
}

/// The staging directory layers are applied into.
#[derive(Debug)]
pub(crate) struct StagingRoot {
    root: PathBuf,
    follow_parent_symlinks: bool,
    /// How many times [`StagingRoot::clear_slot`] removed something: a resolution made
    /// before is still true as long as this has not moved (creating entries never turns a
    /// real directory into something else; only a removal can).
    removals: std::cell::Cell<u64>,
}

impl StagingRoot {
    pub fn new(root: &Path, follow_parent_symlinks: bool) -> Result<Self, OciError> {
        let meta = fs::symlink_metadata(root)
            .map_err(|e| OciError::io("opening the staging root", root, e))?;
        if !meta.is_dir() {
            return Err(OciError::io(
                "opening the staging root",
                root,
                io::Error::from(io::ErrorKind::NotADirectory),
            ));
        }
        Ok(Self {
            root: root.to_owned(),
            follow_parent_symlinks,
            removals: std::cell::Cell::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// See the field: changes whenever something in the tree was removed.
    pub fn removals(&self) -> u64 {
        self.removals.get()
    }

    /// The host path of a resolved relative path.
    pub fn abs(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// Resolves directory components to a relative path made only of real directories.
    ///
    /// Missing directories are created (mode 0755, owned by the builder) when `create` is
    /// set, else the result is `None`. `times` records the times of every directory about
    /// to be modified, so they can be put back afterwards.
    pub fn resolve_dir(
        &self,
        comps: &[OsString],
        create: bool,
        entry: &str,
        mut times: Option<&mut DirTimes>,
    ) -> Result<Option<PathBuf>, OciError> {
        let mut real = PathBuf::new();
        let mut todo: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(comp) = todo.pop_front() {
            if comp.is_empty() || comp == "." {
                continue;
            }
            if comp == ".." {
                // Only symlink targets bring `..` here; at the root it stays at the root.
                real.pop();
                continue;
            }
            let candidate = real.join(&comp);
            let host = self.abs(&candidate);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => real = candidate,
                Ok(meta) if meta.file_type().is_symlink() => {
                    if !self.follow_parent_symlinks {
                        return Err(OciError::SymlinkParent {
                            entry: entry.to_owned(),
                            parent: candidate.display().to_string(),
                        });
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(OciError::SymlinkLoop {
                            entry: entry.to_owned(),
                        });
                    }
                    let target =
                        fs::read_link(&host).map_err(|e| apply_err(entry, "readlink", e))?;
                    let target = target.as_os_str().as_bytes();
                    if target.starts_with(b"/") {
                        real = PathBuf::new();
                    }
                    for part in target.split(|b| *b == b'/').rev() {
                        todo.push_front(OsStr::from_bytes(part).to_owned());
                    }
                }
                Ok(_) => {
                    return Err(OciError::NotADirectory {
                        entry: entry.to_owned(),
                        parent: candidate.display().to_string(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    if let Some(times) = times.as_deref_mut() {
                        times.note(self, &real);
                    }
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&host)
                        .map_err(|e| apply_err(entry, "creating a parent directory", e))?;
                    fs::set_permissions(&host, fs::Permissions::from_mode(0o755))
                        .map_err(|e| apply_err(entry, "chmod of a parent directory", e))?;
                    real = candidate;
                }
                Err(e) => return Err(apply_err(entry, "lstat of a parent directory", e)),
            }
        }
        Ok(Some(real))
    }

    /// True when every component of `rel` is still a real directory (not a symlink).
    pub fn is_real_dir(&self, rel: &Path) -> bool {
        let mut prefix = PathBuf::new();
        for comp in rel.components() {
            prefix.push(comp);
            match fs::symlink_metadata(self.abs(&prefix)) {
                Ok(meta) if meta.is_dir() => {}
                _ => return false,
            }
        }
        fs::symlink_metadata(self.abs(rel)).is_ok_and(|m| m.is_dir())
    }

    /// Makes room for a new entry at `rel` (whose parent is real): removes what is there,
    /// except a directory when `keep_dir` is set. Symlinks are removed, never followed.
    pub fn clear_slot(&self, rel: &Path, keep_dir: bool, entry: &str) -> Result<Slot, OciError> {
        let host = self.abs(rel);
        match fs::symlink_metadata(&host) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Slot::Empty),
            Err(e) => Err(apply_err(entry, "lstat", e)),
            Ok(meta) if meta.is_dir() => {
                if keep_dir {
                    return Ok(Slot::Dir);
                }
                self.removals.set(self.removals.get() + 1);
                fs::remove_dir_all(&host)
                    .map_err(|e| apply_err(entry, "removing a directory", e))?;
                Ok(Slot::Empty)
            }
            Ok(_) => {
                self.removals.set(self.removals.get() + 1);
                fs::remove_file(&host).map_err(|e| apply_err(entry, "removing a file", e))?;
                Ok(Slot::Empty)
            }
        }
    }
}

pub(crate) fn apply_err(entry: &str, op: &'static str, source: io::Error) -> OciError {
    OciError::Apply {
        entry: entry.to_owned(),
        op,
        source,
    }
}

/// Directory times as they were before a layer changed the directory's contents.
///
/// Creating or removing an entry bumps its parent's mtime; `umoci` and `tar` put it back.
#[derive(Debug, Default)]
pub(crate) struct DirTimes {
    saved: HashMap<PathBuf, (TimeSpec, TimeSpec)>,
}

impl DirTimes {
    /// Records `rel`'s times unless already recorded.
    pub fn note(&mut self, root: &StagingRoot, rel: &Path) {
        if self.saved.contains_key(rel) {
            return;
        }
        if let Ok(meta) = fs::symlink_metadata(root.abs(rel)) {
            let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
            let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
            self.saved.insert(rel.to_owned(), (atime, mtime));
        }
    }

    /// Forgets a directory whose times the layer sets itself.
    pub fn forget(&mut self, rel: &Path) {
        self.saved.remove(rel);
    }

    /// Puts the recorded times back on the directories that are still real directories.
    pub fn restore(self, root: &StagingRoot) {
        for (rel, (atime, mtime)) in self.saved {
            if root.is_real_dir(&rel) {
                // Best effort: a time is cosmetic, and the directory may have been
                // legitimately replaced later in the layer.
                let _ = utimensat(
                    nix::fcntl::AT_FDCWD,
                    &root.abs(&rel),
                    &atime,
                    &mtime,
                    UtimensatFlags::NoFollowSymlink,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        let ok = |s: &str| split_entry(s.as_bytes());
        assert_eq!(ok("./a/b/").ok(), Some(vec!["a".into(), "b".into()]));
        assert_eq!(ok("/abs//x").ok(), Some(vec!["abs".into(), "x".into()]));
        assert_eq!(ok("./").ok(), Some(vec![]));
        assert!(ok("a/../b").is_err());
        assert!(ok("..").is_err());
        assert!(split_entry(b"a\0b").is_err());
        assert_eq!(
            split_entry(b"caf\xe9/\xff\xfe").ok(),
            Some(vec![
                OsStr::from_bytes(b"caf\xe9").to_owned(),
                OsStr::from_bytes(b"\xff\xfe").to_owned()
            ])
        );
        assert!(split_entry(&[b'a'; 255]).is_ok());
        assert!(split_entry(&[b'a'; 256]).is_err());
    }
}
