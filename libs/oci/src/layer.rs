//! Applying OCI layers, in order, into a staging directory.
//!
//! This is what `umoci unpack` does, written for NanoBox because the result must be exact
//! (symlinks stay symlinks, hardlinks stay hardlinks, owners, modes, xattrs and device
//! nodes survive) and because image content is untrusted: every path goes through
//! [`crate::staging`], and every stream through the caps in [`Limits`].
//!
//! Rules, as in the OCI image spec: `.wh.<name>` deletes `<name>` from lower layers,
//! `.wh..wh..opq` empties its directory of lower-layer content, any other entry replaces
//! what is at its path (a directory over a directory merges). Whiteouts and opaque
//! markers never delete what their own layer adds, wherever they stand in the tar: a
//! whiteout of a path this layer created (or holds entries under) only removes the
//! lower content beneath it. A hardlink links whatever its target is (a symlink, a device
//! node, a fifo), never what a symlink points to. Directory modes, owners and times are
//! applied when the layer ends, so read-only directories can still be filled.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::sys::stat::{fchmodat, mknod, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use tar::EntryType;

use crate::compression::{decoder, Compression, LimitHit, StreamCaps};
use crate::error::{LimitKind, OciError};
use crate::staging::{apply_err, split_entry, DirTimes, Slot, StagingRoot};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";
const COPY_BUFFER: usize = 256 << 10;

/// Resource limits for untrusted layers. The defaults fit real images (a few GiB) with
/// room to spare; services should set them from their config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Regular-file bytes across all layers applied by one [`LayerApplier`].
    pub max_total_bytes: u64,
    /// Entries (of any kind, whiteouts included) across all layers.
    pub max_entries: u64,
    /// Bytes in one entry path or link target.
    pub max_path_len: usize,
    /// Decompressed bytes of one layer stream (tar headers and padding included).
    pub max_layer_bytes: u64,
    /// Decompressed bytes per compressed byte, checked once a stream has produced
    /// `ratio_floor` bytes.
    pub max_compression_ratio: u64,
    /// See `max_compression_ratio`.
    pub ratio_floor: u64,
    /// Bytes of tar metadata (headers, PAX records with xattrs, GNU long names) for one
    /// entry; the tar reader holds them in memory.
    pub max_header_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_total_bytes: 32 << 30,
            max_entries: 2_000_000,
            max_path_len: 4096,
            max_layer_bytes: 32 << 30,
            max_compression_ratio: 1000,
            ratio_floor: 64 << 20,
            max_header_bytes: 4 << 20,
        }
    }
}

/// Options of a [`LayerApplier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// The resource limits.
    pub limits: Limits,
    /// When a parent directory of an entry is a symlink, resolve it inside the staging
    /// root (as `umoci` and containerd do; needed for images written against a
    /// `lib -> usr/lib` from a lower layer). When false, such entries are refused.
    pub follow_parent_symlinks: bool,
    /// Apply uid and gid from the layers (needs root, or `CAP_CHOWN`).
    pub preserve_ownership: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            follow_parent_symlinks: true,
            preserve_ownership: true,
        }
    }
}

/// Counts of what was applied, per layer or in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries read (whiteouts included).
    pub entries: u64,
    /// Regular-file bytes written.
    pub file_bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Decompressed bytes of the stream(s).
    pub stream_bytes: u64,
}

/// Applies layers, in order, into one staging directory.
///
/// Blocking: run it on a blocking thread (`tokio::task::spawn_blocking`).
#[derive(Debug)]
pub struct LayerApplier {
    root: StagingRoot,
    options: ApplyOptions,
    total: LayerStats,
    /// Reused for copying file data (large copies, few system calls).
    buffer: Vec<u8>,
    /// The last parent directory resolved. Tar entries come grouped by directory, so most
    /// entries share their parent with the one before, and resolving it again would
    /// `lstat` every component once more.
    parent_cache: Option<ParentCache>,
}

/// A parent resolution, valid while the staging root reports no removal since.
#[derive(Debug)]
struct ParentCache {
    comps: Vec<OsString>,
    real: PathBuf,
    removals: u64,
}

/// A directory whose metadata is applied when the layer ends.
#[derive(Debug)]
struct DeferredDir {
    rel: PathBuf,
    entry: String,
    meta: Meta,
}

/// The metadata of one entry, PAX overrides applied.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Per-layer state.
#[derive(Debug, Default)]
struct LayerState {
    /// Every path created by this layer and every directory above one (see
    /// [`LayerState::record`]): whiteouts and opaque markers keep these.
    created: HashSet<PathBuf>,
    dirs: Vec<DeferredDir>,
    times: DirTimes,
    stats: LayerStats,
    stream: LimitHit,
}

impl LayerState {
    /// Records a path this layer created, and the directories above it: a whiteout of
    /// one of those (in this layer) must keep what the layer put beneath it.
    fn record(&mut self, rel: &Path) {
        if !self.created.insert(rel.to_owned()) {
            return;
        }
        // Every recorded path has its ancestors recorded, so the walk stops at the first.
        let mut up = rel.parent();
        while let Some(dir) = up.filter(|d| !d.as_os_str().is_empty()) {
            if !self.created.insert(dir.to_owned()) {
                break;
            }
            up = dir.parent();
        }
    }
}

impl LayerApplier {
    /// An applier into `root`, an existing directory the caller owns exclusively while
    /// layers are applied.
    pub fn new(root: &Path, options: ApplyOptions) -> Result<Self, OciError> {
        Ok(Self {
            root: StagingRoot::new(root, options.follow_parent_symlinks)?,
            options,
            total: LayerStats::default(),
            buffer: vec![0; COPY_BUFFER],
            parent_cache: None,
        })
    }

    /// The staging directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Totals over the layers applied so far.
    pub fn total(&self) -> LayerStats {
        self.total
    }

    /// Applies the layer in the file at `path`, with the compression its media type
    /// declares (`None`: sniffed).
    pub fn apply_file(
        &mut self,
        path: &Path,
        media_type: Option<&str>,
    ) -> Result<LayerStats, OciError> {
        let compression = match media_type {
            Some(media_type) => Compression::from_media_type(media_type)?,
            None => Compression::Auto,
        };
        let file = File::open(path).map_err(|e| OciError::io("opening a layer", path, e))?;
        self.apply(file, compression)
    }

    /// Applies one layer stream (the whole stream is read, so a digest computed by the
    /// reader covers all of it).
    pub fn apply<R: Read + Send + 'static>(
        &mut self,
        blob: R,
        compression: Compression,
    ) -> Result<LayerStats, OciError> {
        let limits = self.options.limits;
        let hit: LimitHit = Rc::default();
        let caps = StreamCaps {
            max_bytes: limits.max_layer_bytes,
            max_ratio: limits.max_compression_ratio,
            ratio_floor: limits.ratio_floor,
            max_meta: limits.max_header_bytes,
        };
        let stream =
            decoder(blob, compression, caps, hit.clone()).map_err(|source| OciError::Corrupt {
                after: String::new(),
                source,
            })?;
        let mut archive = tar::Archive::new(stream);
        // Each layer records the directory times it changes from its first entry on.
        self.parent_cache = None;
        let mut state = LayerState {
            stream: hit.clone(),
            ..LayerState::default()
        };
        let mut last = String::new();
        let result = self.apply_entries(&mut archive, &mut state, &hit, &mut last);
        // Directory metadata goes in place even after a failure: what was applied stays
        // consistent for inspection (the first error is the one reported).
        let finished = self.finish_layer(state.dirs, state.times);
        let mut stats = state.stats;
        result?;
        finished?;
        let mut stream = archive.into_inner();
        // Trailing padding after the end-of-archive blocks is no header.
        hit.in_data.set(true);
        io::copy(&mut stream, &mut io::sink())
            .map_err(|source| stream_error(&hit, &last, source))?;
        stats.stream_bytes = stream.produced();
        self.total.entries += stats.entries;
        self.total.file_bytes += stats.file_bytes;
        self.total.whiteouts += stats.whiteouts;
        self.total.stream_bytes += stats.stream_bytes;
        Ok(stats)
    }

    fn apply_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
        state: &mut LayerState,
        hit: &LimitHit,
        last: &mut String,
    ) -> Result<(), OciError> {
        let entries = archive
            .entries()
            .map_err(|source| stream_error(hit, last, source))?;
        for entry in entries {
            let mut entry = match entry {
                Ok(entry) => entry,
                // umoci 0.4.7 writes layers that stop right after the last entry's data
                // (no padding, no end-of-archive blocks); Go's reader and umoci accept
                // them. Only a cleanly ended stream qualifies: a truncated gzip or zstd
                // stream fails in its decoder, and a short entry fails while it is read.
                Err(err) if hit.clean_eof.get() && hit.hit.get().is_none() && !last.is_empty() => {
                    tracing::debug!(after = %last, error = %err, "layer ends without an end-of-archive marker");
                    break;
                }
                Err(err) => return Err(stream_error(hit, last, err)),
            };
            hit.meta_run.set(0);
            let raw = entry.path_bytes().into_owned();
            *last = String::from_utf8_lossy(&raw).into_owned();
            self.apply_entry(&mut entry, &raw, last, state)
                .map_err(|err| match err {
                    // A read error inside an entry's data may be a cap firing.
                    OciError::Apply { source, .. } if hit.hit.get().is_some() => {
                        stream_error(hit, last, source)
                    }
                    other => other,
                })?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        name: &str,
        state: &mut LayerState,
    ) -> Result<(), OciError> {
        let limits = self.options.limits;
        state.stats.entries += 1;
        let count = self.total.entries + state.stats.entries;
        if count > limits.max_entries {
            return Err(limit(
                name,
                LimitKind::EntryCount,
                count,
                limits.max_entries,
            ));
        }
        if raw.len() > limits.max_path_len {
            return Err(limit(
                name,
                LimitKind::PathLength,
                raw.len() as u64,
                limits.max_path_len as u64,
            ));
        }
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        let comps = split_entry(raw).map_err(|reason| OciError::UnsafePath {
            entry: name.to_owned(),
            reason,
        })?;
        let Some((base, parents)) = comps.split_last() else {
            // The root itself: only its metadata can change.
            if !kind.is_dir() {
                return Err(OciError::UnsafePath {
                    entry: name.to_owned(),
                    reason: "replaces the root directory",
                });
            }
            let meta = read_meta(entry, name)?;
            state.times.forget(Path::new(""));
            state.dirs.push(DeferredDir {
                rel: PathBuf::new(),
                entry: name.to_owned(),
                meta,
            });
            return Ok(());
        };
        if base.as_bytes().starts_with(WHITEOUT_PREFIX) {
            state.stats.whiteouts += 1;
            return self.whiteout(parents, base.as_bytes(), name, state);
        }

        let parent = self.parent(parents, name, state)?;
        let rel = parent.join(base);
        state.times.note(&self.root, &parent);

        if kind.is_hard_link() {
            return self.hardlink(entry, &rel, name, state);
        }
        let meta = read_meta(entry, name)?;
        let host = self.root.abs(&rel);
        match kind {
            EntryType::Directory => {
                let slot = self.root.clear_slot(&rel, true, name)?;
                if slot == Slot::Empty {
                    fs::DirBuilder::new()
                        .create(&host)
                        .map_err(|e| apply_err(name, "mkdir", e))?;
                }
                state.times.forget(&rel);
                state.dirs.push(DeferredDir {
                    rel: rel.clone(),
                    entry: name.to_owned(),
                    meta,
                });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                let total = self.total.file_bytes + state.stats.file_bytes + size;
                if total > limits.max_total_bytes {
                    return Err(limit(
                        name,
                        LimitKind::TotalSize,
                        total,
                        limits.max_total_bytes,
                    ));
                }
                // Creating first and clearing the slot only when something is there saves
                // an lstat per file in the common case (O_EXCL never follows a symlink).
                let mut file = match create_file(&host) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.root.clear_slot(&rel, false, name)?;
                        create_file(&host)
                    }
                    other => other,
                }
                .map_err(|e| apply_err(name, "creating a file", e))?;
                state.stream.in_data.set(true);
                let copied = copy_data(entry, &mut file, &mut self.buffer);
                state.stream.in_data.set(false);
                let written = copied.map_err(|e| apply_err(name, "writing a file", e))?;
                state.stats.file_bytes += written;
                if written < size && kind != EntryType::GNUSparse {
                    return Err(OciError::Corrupt {
                        after: name.to_owned(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the layer ends inside the entry ({written} of {size} bytes)"),
                        ),
                    });
                }
                self.set_file_meta(&file, &meta, name)?;
            }
            EntryType::Symlink => {
                self.root.clear_slot(&rel, false, name)?;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad_header(name, "symlink without a target"))?;
                if target.len() > limits.max_path_len {
                    return Err(limit(
                        name,
                        LimitKind::PathLength,
                        target.len() as u64,
                        limits.max_path_len as u64,
                    ));
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &host)
                    .map_err(|e| apply_err(name, "creating a symlink", e))?;
                self.set_meta(&host, &meta, name, true)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.root.clear_slot(&rel, false, name)?;
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let major = entry
                            .header()
                            .device_major()
                            .map_err(|e| bad_header(name, &e.to_string()))?
                            .unwrap_or(0);
                        let minor = entry
                            .header()
                            .device_minor()
                            .map_err(|e| bad_header(name, &e.to_string()))?
                            .unwrap_or(0);
                        let sflag = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (sflag, nix::sys::stat::makedev(major.into(), minor.into()))
                    }
                };
                mknod(&host, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| apply_err(name, "mknod", e.into()))?;
                self.set_meta(&host, &meta, name, false)?;
            }
            other => {
                return Err(OciError::UnsupportedEntry {
                    entry: name.to_owned(),
                    kind: other.as_byte(),
                })
            }
        }
        state.record(&rel);
        Ok(())
    }

    /// Resolves (creating) an entry's parent directories, reusing the last resolution
    /// while nothing was removed since.
    fn parent(
        &mut self,
        parents: &[OsString],
        name: &str,
        state: &mut LayerState,
    ) -> Result<PathBuf, OciError> {
        if let Some(cache) = &self.parent_cache {
            if cache.removals == self.root.removals() && cache.comps == parents {
                return Ok(cache.real.clone());
            }
        }
        let real = self
            .root
            .resolve_dir(parents, true, name, Some(&mut state.times))?
            .ok_or_else(|| {
                apply_err(name, "resolving the parent", io::ErrorKind::NotFound.into())
            })?;
        self.parent_cache = Some(ParentCache {
            comps: parents.to_vec(),
            real: real.clone(),
            removals: self.root.removals(),
        });
        Ok(real)
    }

    /// [`Self::set_meta`] for a regular file just written, through its descriptor: the
    /// same calls in the same order, without resolving the path four more times.
    fn set_file_meta(&self, file: &File, meta: &Meta, name: &str) -> Result<(), OciError> {
        if self.options.preserve_ownership {
            nix::unistd::fchown(
                file,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(|e| apply_err(name, "chown", e.into()))?;
        }
        nix::sys::stat::fchmod(file, Mode::from_bits_truncate(meta.mode))
            .map_err(|e| apply_err(name, "chmod", e.into()))?;
        for (key, value) in &meta.xattrs {
            rustix::fs::fsetxattr(
                file,
                key.as_os_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| apply_err(name, "setting an xattr", e.into()))?;
        }
        nix::sys::stat::futimens(file, &meta.mtime, &meta.mtime)
            .map_err(|e| apply_err(name, "setting times", e.into()))?;
        Ok(())
    }

    fn hardlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        rel: &Path,
        name: &str,
        state: &mut LayerState,
    ) -> Result<(), OciError> {
        let raw_target = entry
            .link_name_bytes()
            .ok_or_else(|| bad_header(name, "hardlink without a target"))?;
        let target_name = String::from_utf8_lossy(&raw_target).into_owned();
        let bad = |reason| OciError::BadHardlink {
            entry: name.to_owned(),
            target: target_name.clone(),
            reason,
        };
        if raw_target.len() > self.options.limits.max_path_len {
            return Err(bad("is too long"));
        }
        let comps = split_entry(&raw_target).map_err(|_| bad("leaves the root"))?;
        let Some((base, parents)) = comps.split_last() else {
            return Err(bad("is the root directory"));
        };
        let parent = self
            .root
            .resolve_dir(parents, false, name, None)?
            .ok_or_else(|| bad("does not exist"))?;
        let target = parent.join(base);
        match fs::symlink_metadata(self.root.abs(&target)) {
            Err(_) => return Err(bad("does not exist")),
            Ok(meta) if meta.is_dir() => return Err(bad("is a directory")),
            Ok(_) => {}
        }
        if target == rel {
            return Ok(());
        }
        self.root.clear_slot(rel, false, name)?;
        // linkat(2) without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(self.root.abs(&target), self.root.abs(rel))
            .map_err(|e| apply_err(name, "creating a hardlink", e))?;
        state.record(rel);
        Ok(())
    }

    fn whiteout(
        &mut self,
        parents: &[OsString],
        base: &[u8],
        name: &str,
        state: &mut LayerState,
    ) -> Result<(), OciError> {
        let Some(parent) = self.root.resolve_dir(parents, false, name, None)? else {
            return Ok(());
        };
        if base == OPAQUE_MARKER {
            state.times.note(&self.root, &parent);
            return self.clear_lower(&parent, name, &state.created);
        }
        if base.starts_with(b".wh..wh.") {
            // Other AUFS metadata (hardlink directories): nothing to apply.
            return Ok(());
        }
        let target = &base[WHITEOUT_PREFIX.len()..];
        if matches!(target, b"" | b"." | b"..") {
            return Err(OciError::BadWhiteout {
                entry: name.to_owned(),
                reason: "names no file",
            });
        }
        state.times.note(&self.root, &parent);
        let rel = parent.join(OsStr::from_bytes(target));
        if state.created.contains(&rel) {
            // This layer's own entry (whiteouts delete from lower layers only): what
            // stays of the lower content is what lies beneath a directory.
            if self.root.is_real_dir(&rel) {
                state.times.note(&self.root, &rel);
                self.clear_lower(&rel, name, &state.created)?;
            }
            return Ok(());
        }
        self.root.clear_slot(&rel, false, name)?;
        Ok(())
    }

    /// Removes everything under `dir` that this layer did not create.
    fn clear_lower(
        &self,
        dir: &Path,
        name: &str,
        created: &HashSet<PathBuf>,
    ) -> Result<(), OciError> {
        let host = self.root.abs(dir);
        let listing = fs::read_dir(&host).map_err(|e| apply_err(name, "listing a directory", e))?;
        for child in listing {
            let child = child.map_err(|e| apply_err(name, "listing a directory", e))?;
            let rel = dir.join(child.file_name());
            let is_dir = child
                .file_type()
                .map_err(|e| apply_err(name, "lstat", e))?
                .is_dir();
            if created.contains(&rel) {
                if is_dir {
                    self.clear_lower(&rel, name, created)?;
                }
            } else {
                self.root.clear_slot(&rel, false, name)?;
            }
        }
        Ok(())
    }

    /// Owner, mode, xattrs and times of a just-created non-directory, in the order that
    /// keeps them all (chown clears setuid bits and file capabilities).
    fn set_meta(
        &self,
        host: &Path,
        meta: &Meta,
        name: &str,
        symlink: bool,
    ) -> Result<(), OciError> {
        if self.options.preserve_ownership {
            fchownat(
                AT_FDCWD,
                host,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| apply_err(name, "chown", e.into()))?;
        }
        if !symlink {
            // The path is not a symlink (just created or checked), so following is moot.
            fchmodat(
                AT_FDCWD,
                host,
                Mode::from_bits_truncate(meta.mode),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| apply_err(name, "chmod", e.into()))?;
        }
        for (key, value) in &meta.xattrs {
            if let Err(e) = rustix::fs::lsetxattr(
                host,
                key.as_os_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            ) {
                // Linux allows no user.* attributes on symlinks; umoci skips them too.
                if symlink && key.as_bytes().starts_with(b"user.") {
                    continue;
                }
                return Err(apply_err(name, "setting an xattr", e.into()));
            }
        }
        utimensat(
            AT_FDCWD,
            host,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| apply_err(name, "setting times", e.into()))?;
        Ok(())
    }

    /// Applies the deferred directory metadata, deepest first, then restores the times
    /// of directories whose contents changed.
    fn finish_layer(&self, mut dirs: Vec<DeferredDir>, times: DirTimes) -> Result<(), OciError> {
        times.restore(&self.root);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.rel.components().count()));
        for dir in dirs {
            // A later entry of the layer may have replaced the directory (or a parent,
            // perhaps with a symlink): then its metadata is moot.
            if !self.root.is_real_dir(&dir.rel) {
                continue;
            }
            let host = self.root.abs(&dir.rel);
            self.clear_xattrs(&host, &dir.meta, &dir.entry)?;
            self.set_meta(&host, &dir.meta, &dir.entry, false)?;
        }
        Ok(())
    }

    /// Removes xattrs of a merged directory that its new header does not list.
    fn clear_xattrs(&self, host: &Path, meta: &Meta, name: &str) -> Result<(), OciError> {
        let names = list_xattrs(host).map_err(|e| apply_err(name, "listing xattrs", e))?;
        for key in names {
            let keep =
                key.as_bytes() == b"security.selinux" || meta.xattrs.iter().any(|(k, _)| *k == key);
            if !keep {
                rustix::fs::lremovexattr(host, key.as_os_str())
                    .map_err(|e| apply_err(name, "removing an xattr", e.into()))?;
            }
        }
        Ok(())
    }
}

/// The xattr names of a path (not following symlinks).
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<OsString>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match rustix::fs::llistxattr(path, &mut buf) {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| OsStr::from_bytes(s).to_owned())
                    .collect())
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Copies an entry's data into a file through `buffer`; returns the bytes copied.
fn copy_data(from: &mut impl Read, to: &mut File, buffer: &mut [u8]) -> io::Result<u64> {
    use std::io::Write;
    let mut total = 0;
    loop {
        let n = match from.read(buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC).bits()
}

/// Creates a regular file that must not exist yet (mode 0600 until its metadata is set).
fn create_file(host: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc_flags())
        .open(host)
}

fn limit(entry: &str, kind: LimitKind, value: u64, limit: u64) -> OciError {
    OciError::LimitExceeded {
        entry: entry.to_owned(),
        kind,
        value,
        limit,
    }
}

fn bad_header(entry: &str, reason: &str) -> OciError {
    OciError::BadHeader {
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A read error of the stream: a cap that fired, or a corrupt archive.
fn stream_error(hit: &LimitHit, last: &str, source: io::Error) -> OciError {
    match hit.hit.get() {
        Some((kind, value, max)) => limit(last, kind, value, max),
        None => OciError::Corrupt {
            after: last.to_owned(),
            source,
        },
    }
}

/// Reads mode, owner, mtime and xattrs, with PAX records overriding the ustar fields.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, OciError> {
    let header = entry.header();
    let bad = |what: &str| bad_header(name, what);
    let mode = header.mode().map_err(|_| bad("mode"))? & 0o7777;
    let mut uid = header.uid().map_err(|_| bad("uid"))?;
    let mut gid = header.gid().map_err(|_| bad("gid"))?;
    let mut mtime = TimeSpec::new(
        i64::try_from(header.mtime().map_err(|_| bad("mtime"))?).map_err(|_| bad("mtime"))?,
        0,
    );
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(|_| bad("PAX records"))? {
        for ext in pax {
            let ext = ext.map_err(|_| bad("PAX records"))?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            if let Some(xattr) = key.strip_prefix(XATTR_PAX_PREFIX) {
                xattrs.push((OsString::from(xattr), value.to_vec()));
                continue;
            }
            let text = std::str::from_utf8(value).map_err(|_| bad(key))?;
            match key {
                "uid" => uid = text.parse().map_err(|_| bad("PAX uid"))?,
                "gid" => gid = text.parse().map_err(|_| bad("PAX gid"))?,
                "mtime" => mtime = parse_pax_time(text).ok_or_else(|| bad("PAX mtime"))?,
                _ => {}
            }
        }
    }
    Ok(Meta {
        mode,
        uid: u32::try_from(uid).map_err(|_| bad("uid above 2^32"))?,
        gid: u32::try_from(gid).map_err(|_| bad("gid above 2^32"))?,
        mtime,
        xattrs,
    })
}

/// Parses a PAX time, `seconds[.fraction]`, possibly negative.
fn parse_pax_time(text: &str) -> Option<TimeSpec> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut nanos: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    for _ in digits.len()..9 {
        nanos *= 10;
    }
    if secs < 0 && nanos > 0 {
        return Some(TimeSpec::new(secs - 1, 1_000_000_000 - nanos));
    }
    Some(TimeSpec::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let t = parse_pax_time("1700000000.5").map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t, Some((1_700_000_000, 500_000_000)));
        let t = parse_pax_time("12").map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t, Some((12, 0)));
        let t = parse_pax_time("-1.25").map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t, Some((-2, 750_000_000)));
        assert!(parse_pax_time("x").is_none());
    }

    #[test]
    fn default_limits_are_generous() {
        let limits = Limits::default();
        assert!(limits.max_total_bytes >= 8 << 30);
        assert_eq!(limits.max_path_len, 4096);
    }
}
