//! Applying OCI layers, in order, into a staging directory.
//!
//! This is what `umoci unpack` does, written for NanoBox because the result must be exact
//! (symlinks stay symlinks, hardlinks stay hardlinks, owners, modes, xattrs and device
//! nodes survive) and because image content is untrusted: every path goes through
//! [`crate::staging`], every stream through the budgets in [`Limits`], and every header
//! through the bounded reader of [`crate::tar_reader`]. Names are bytes from the tar to
//! the file system. File data is written with every all-zero block left a hole, and a
//! sparse entry's holes are never read at all, so a multi-gigabyte sparse or zero-filled
//! file costs what it allocates.
//!
//! Rules, as in the OCI image spec: `.wh.<name>` deletes `<name>` from lower layers,
//! `.wh..wh..opq` empties its directory of lower-layer content, any other entry replaces
//! what is at its path (a directory over a directory merges). Whiteouts and opaque
//! markers never delete what their own layer adds, wherever they stand in the tar: a
//! whiteout of a path this layer created (or holds entries under) only removes the
//! lower content beneath it. A hardlink links whatever its target is (a symlink, a device
//! node, a fifo), never what a symlink points to. Directory modes, owners and times are
//! applied when the layer ends, so read-only directories can still be filled.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::sys::stat::{fchmodat, mknod, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};

use crate::compression::{decoder, Compression, LimitHit, StreamCaps};
use crate::error::{LimitKind, OciError};
use crate::staging::{apply_err, split_entry, DirTimes, Slot, StagingRoot};
use crate::tar_reader::{Header, Kind, ReaderLimits, TarReader};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const COPY_BUFFER: usize = 256 << 10;

/// Budgets for untrusted layers: what applying an image may cost, in absolute terms.
///
/// A decompression bomb is bounded by what it would cost, not by how well it compresses:
/// the bytes it makes the builder decompress (`max_stream_bytes`), the file data it makes
/// it write (`max_data_bytes`, holes not counted, so a large sparse or zero-filled file
/// costs what it allocates), the entries, names and metadata it makes it hold, and the
/// time. [`Limits::for_image_bytes`] sizes them all from the largest root file system a
/// template may have, which is what the builder's config sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of regular-file data written across all layers applied by one
    /// [`LayerApplier`], holes excluded (all-zero blocks are holes too).
    pub max_data_bytes: u64,
    /// Decompressed bytes of all layer streams together (headers, padding and zero runs
    /// included): what decompressing the image costs.
    pub max_stream_bytes: u64,
    /// The apparent size of one regular file, holes included.
    pub max_file_bytes: u64,
    /// Entries (of any kind, whiteouts included) across all layers.
    pub max_entries: u64,
    /// Bytes in one entry path or link target.
    pub max_path_len: usize,
    /// Directories above an entry, counted after symlinked parents are resolved.
    pub max_path_depth: usize,
    /// Bytes of tar metadata (headers, PAX records, GNU long names, sparse maps) for one
    /// entry; the reader holds them in memory.
    pub max_header_bytes: u64,
    /// Bytes of one entry's extended attributes, names and values together (Linux caps
    /// one value at 64 KiB, and ext4 keeps an inode's attributes in one block).
    pub max_xattr_bytes: u64,
    /// Time for applying all the layers of one [`LayerApplier`], from its first layer.
    pub max_duration: Duration,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

impl Limits {
    /// Budgets for an image whose root file system may hold `bytes` of file data.
    ///
    /// The stream may be twice that and a GiB more (upper layers rewrite lower files;
    /// zero runs cost decompression but no disk); one entry per 2 KiB of that data, at
    /// least 16,384 and at most 4 million (a real image averages tens of KiB per file);
    /// two minutes plus a second per 16 MiB. A sparse file may be 4 TiB apparent (the
    /// `lastlog` of an image with a user id near 2^32 is 1.2 TB of holes).
    pub fn for_image_bytes(bytes: u64) -> Self {
        Self {
            max_data_bytes: bytes,
            max_stream_bytes: bytes.saturating_mul(2).saturating_add(GIB),
            max_file_bytes: 4 << 40,
            max_entries: (bytes / 2048).clamp(16_384, 4_000_000),
            max_path_len: 4096,
            max_path_depth: 256,
            max_header_bytes: 4 * MIB,
            max_xattr_bytes: 64 << 10,
            max_duration: Duration::from_secs(120 + bytes / (16 * MIB)),
        }
    }
}

impl Default for Limits {
    /// [`Limits::for_image_bytes`] of 16 GiB.
    fn default() -> Self {
        Self::for_image_bytes(16 * GIB)
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

/// Where the data of large regular files goes instead of the staging tree (the hybrid
/// staging of [`crate::convert`]): each such file is written to a file of its own in
/// `dir` (another file system: the disk), with the entry's metadata, and the tree gets an
/// empty placeholder with the same name; [`LayerApplier::spilled`] says which spill file
/// each placeholder inode stands for. Hardlinks to a placeholder stand for the same file.
///
/// The tree keeps everything else, and it is meant to live in memory, so it is bounded:
/// past `max_files` spill files or `max_tree_bytes` of file data kept in the tree, the
/// layer fails as if its file system were full ([`io::ErrorKind::StorageFull`]), and the
/// caller converts again with the whole tree on disk.
#[derive(Debug)]
pub(crate) struct Spill {
    pub dir: PathBuf,
    /// Files of at least this apparent size go to `dir`.
    pub min_bytes: u64,
    pub max_files: usize,
    pub max_tree_bytes: u64,
    files: HashMap<(u64, u64), PathBuf>,
    tree_bytes: u64,
}

impl Spill {
    pub fn new(dir: PathBuf, min_bytes: u64, max_files: usize, max_tree_bytes: u64) -> Self {
        Self {
            dir,
            min_bytes,
            max_files,
            max_tree_bytes,
            files: HashMap::new(),
            tree_bytes: 0,
        }
    }

    /// Whether a file of `apparent` bytes is spilled; counts it against the tree's budget
    /// when it is not.
    fn claim(&mut self, apparent: u64, name: &str) -> Result<bool, OciError> {
        let full = |op| apply_err(name, op, io::ErrorKind::StorageFull.into());
        if apparent >= self.min_bytes {
            if self.files.len() >= self.max_files {
                return Err(full("spilling a large file (too many)"));
            }
            return Ok(true);
        }
        self.tree_bytes += apparent;
        if self.tree_bytes > self.max_tree_bytes {
            return Err(full("keeping small files in memory"));
        }
        Ok(false)
    }
}

/// Counts of what was applied, per layer or in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries read (whiteouts included).
    pub entries: u64,
    /// Regular-file data bytes written (holes, all-zero blocks included, excluded).
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
    /// When the first layer started: [`Limits::max_duration`] counts from here.
    started: Option<Instant>,
    /// Reused for copying file data (large copies, few system calls).
    buffer: Vec<u8>,
    /// The last parent directory resolved. Tar entries come grouped by directory, so most
    /// entries share their parent with the one before, and resolving it again would
    /// `lstat` every component once more.
    parent_cache: Option<ParentCache>,
    spill: Option<Spill>,
}

/// A parent resolution, valid while the staging root reports no removal since.
#[derive(Debug)]
struct ParentCache {
    comps: Vec<OsString>,
    real: PathBuf,
    removals: u64,
}

/// A directory whose mode, owner and times are applied when the layer ends (its
/// extended attributes are applied at once, so that what the layer holds in memory until
/// then stays small whatever the headers carry).
#[derive(Debug)]
struct DeferredDir {
    rel: PathBuf,
    meta: Meta,
}

/// The metadata of one entry, PAX overrides applied.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
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
            started: None,
            buffer: vec![0; COPY_BUFFER],
            parent_cache: None,
            spill: None,
        })
    }

    /// An applier that puts large files' data in `spill`'s directory (see [`Spill`]).
    pub(crate) fn with_spill(
        root: &Path,
        options: ApplyOptions,
        spill: Spill,
    ) -> Result<Self, OciError> {
        let mut applier = Self::new(root, options)?;
        applier.spill = Some(spill);
        Ok(applier)
    }

    /// The spill file of each placeholder, by the placeholder's (device, inode).
    pub(crate) fn spilled(&self) -> Option<&HashMap<(u64, u64), PathBuf>> {
        self.spill.as_ref().map(|s| &s.files)
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
        let started = *self.started.get_or_insert_with(Instant::now);
        let hit: LimitHit = Rc::default();
        let caps = StreamCaps {
            base: self.total.stream_bytes,
            max_total: limits.max_stream_bytes,
            started,
            max_duration: limits.max_duration,
        };
        let stream =
            decoder(blob, compression, caps, hit.clone()).map_err(|source| OciError::Corrupt {
                after: String::new(),
                source,
            })?;
        let mut tar = TarReader::new(
            stream,
            ReaderLimits {
                max_header_bytes: limits.max_header_bytes,
            },
        );
        // Each layer records the directory times it changes from its first entry on.
        self.parent_cache = None;
        let mut state = LayerState::default();
        let result = self.apply_entries(&mut tar, &mut state);
        // Directory metadata goes in place even after a failure: what was applied stays
        // consistent for inspection (the first error is the one reported).
        let finished = self.finish_layer(state.dirs, state.times);
        let mut stats = state.stats;
        let last = tar.last().to_owned();
        result.map_err(|err| budget_error(&hit, &last, err))?;
        finished?;
        let mut stream = tar.into_inner();
        // What follows the end-of-archive blocks is hashed (by the digest readers below)
        // but never interpreted.
        io::copy(&mut stream, &mut io::sink()).map_err(|source| {
            budget_error(
                &hit,
                &last,
                OciError::Corrupt {
                    after: last.clone(),
                    source,
                },
            )
        })?;
        stats.stream_bytes = stream.produced();
        self.total.entries += stats.entries;
        self.total.file_bytes += stats.file_bytes;
        self.total.whiteouts += stats.whiteouts;
        self.total.stream_bytes += stats.stream_bytes;
        Ok(stats)
    }

    fn apply_entries<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        state: &mut LayerState,
    ) -> Result<(), OciError> {
        while let Some(header) = tar.next_entry()? {
            self.apply_entry(tar, &header, state)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        header: &Header,
        state: &mut LayerState,
    ) -> Result<(), OciError> {
        let limits = self.options.limits;
        let name = &header.display_name();
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
        let raw = &header.path[..];
        if raw.len() > limits.max_path_len {
            return Err(limit(
                name,
                LimitKind::PathLength,
                raw.len() as u64,
                limits.max_path_len as u64,
            ));
        }
        let comps = split_entry(raw).map_err(|reason| OciError::UnsafePath {
            entry: name.to_owned(),
            reason,
        })?;
        let Some((base, parents)) = comps.split_last() else {
            // The root itself: only its metadata can change.
            if header.kind != Kind::Directory {
                return Err(OciError::UnsafePath {
                    entry: name.to_owned(),
                    reason: "replaces the root directory",
                });
            }
            let meta = meta_of(header, name)?;
            let xattrs = xattrs_of(header, name, limits.max_xattr_bytes)?;
            self.set_directory_xattrs(Path::new(""), &xattrs, name)?;
            state.times.forget(Path::new(""));
            state.dirs.push(DeferredDir {
                rel: PathBuf::new(),
                meta,
            });
            return Ok(());
        };
        if parents.len() >= limits.max_path_depth {
            return Err(limit(
                name,
                LimitKind::PathDepth,
                parents.len() as u64 + 1,
                limits.max_path_depth as u64,
            ));
        }
        if base.as_bytes().starts_with(WHITEOUT_PREFIX) {
            state.stats.whiteouts += 1;
            return self.whiteout(parents, base.as_bytes(), name, state);
        }

        let parent = self.parent(parents, name, state)?;
        let rel = parent.join(base);
        state.times.note(&self.root, &parent);

        if header.kind == Kind::Hardlink {
            return self.hardlink(header, &rel, name, state);
        }
        let meta = meta_of(header, name)?;
        let xattrs = xattrs_of(header, name, limits.max_xattr_bytes)?;
        let host = self.root.abs(&rel);
        match header.kind {
            Kind::Directory => {
                let slot = self.root.clear_slot(&rel, true, name)?;
                if slot == Slot::Empty {
                    fs::DirBuilder::new()
                        .create(&host)
                        .map_err(|e| apply_err(name, "mkdir", e))?;
                }
                self.set_directory_xattrs(&rel, &xattrs, name)?;
                state.times.forget(&rel);
                state.dirs.push(DeferredDir {
                    rel: rel.clone(),
                    meta,
                });
            }
            Kind::Regular => {
                let apparent = header.apparent_size();
                if apparent > limits.max_file_bytes {
                    return Err(limit(
                        name,
                        LimitKind::FileSize,
                        apparent,
                        limits.max_file_bytes,
                    ));
                }
                // Creating first and clearing the slot only when something is there saves
                // an lstat per file in the common case (O_EXCL never follows a symlink).
                let file = match create_file(&host) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.root.clear_slot(&rel, false, name)?;
                        create_file(&host)
                    }
                    other => other,
                }
                .map_err(|e| apply_err(name, "creating a file", e))?;
                let spilled = match &mut self.spill {
                    Some(spill) => spill.claim(apparent, name)?,
                    None => false,
                };
                let file = match &mut self.spill {
                    Some(spill) if spilled => {
                        let placeholder =
                            file.metadata().map_err(|e| apply_err(name, "lstat", e))?;
                        let path = spill.dir.join(spill.files.len().to_string());
                        let data = create_file(&path)
                            .map_err(|e| apply_err(name, "creating a spill file", e))?;
                        spill
                            .files
                            .insert((placeholder.dev(), placeholder.ino()), path);
                        data
                    }
                    _ => file,
                };
                let used = self.total.file_bytes + state.stats.file_bytes;
                let written = self.write_file(tar, header, &file, name, used)?;
                state.stats.file_bytes += written;
                self.set_file_meta(&file, &meta, &xattrs, name)?;
            }
            Kind::Symlink => {
                self.root.clear_slot(&rel, false, name)?;
                let target = &header.link;
                if target.is_empty() {
                    return Err(bad_header(name, "symlink without a target"));
                }
                if target.len() > limits.max_path_len {
                    return Err(limit(
                        name,
                        LimitKind::PathLength,
                        target.len() as u64,
                        limits.max_path_len as u64,
                    ));
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &host)
                    .map_err(|e| apply_err(name, "creating a symlink", e))?;
                self.set_meta(&host, &meta, &xattrs, name, true)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.root.clear_slot(&rel, false, name)?;
                let (sflag, dev) = match header.kind {
                    Kind::Fifo => (SFlag::S_IFIFO, 0),
                    kind => {
                        let sflag = if kind == Kind::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        let dev = nix::sys::stat::makedev(
                            header.dev_major.into(),
                            header.dev_minor.into(),
                        );
                        (sflag, dev)
                    }
                };
                mknod(&host, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| apply_err(name, "mknod", e.into()))?;
                self.set_meta(&host, &meta, &xattrs, name, false)?;
            }
            Kind::Hardlink => {}
        }
        state.record(&rel);
        Ok(())
    }

    /// Writes a regular file's data: every data segment at its offset (one segment from 0
    /// for a file that is not sparse), all-zero blocks left as holes, then the size set.
    /// `used` is the data the layers wrote before; returns the bytes written.
    fn write_file<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        header: &Header,
        file: &File,
        name: &str,
        used: u64,
    ) -> Result<u64, OciError> {
        let max = self.options.limits.max_data_bytes;
        let whole = [(0, header.size)];
        let segments = match &header.sparse {
            Some(sparse) => &sparse.segments[..],
            None => &whole[..],
        };
        let mut written = 0u64;
        for &(offset, length) in segments {
            written += write_segment(
                tar,
                file,
                offset,
                length,
                &mut self.buffer,
                max.saturating_sub(used + written),
            )
            .map_err(|err| match err {
                CopyError::Budget(more) => {
                    limit(name, LimitKind::DataSize, used + written + more, max)
                }
                CopyError::Read(source) => OciError::Corrupt {
                    after: name.to_owned(),
                    source,
                },
                CopyError::Write(e) => apply_err(name, "writing a file", e),
            })?;
        }
        file.set_len(header.apparent_size())
            .map_err(|e| apply_err(name, "setting a file's size", e))?;
        Ok(written)
    }

    /// Applies a directory entry's extended attributes now (those of a merged directory
    /// that the new header does not list are removed); the rest of its metadata waits
    /// for the end of the layer.
    fn set_directory_xattrs(
        &self,
        rel: &Path,
        xattrs: &[(OsString, Vec<u8>)],
        name: &str,
    ) -> Result<(), OciError> {
        let host = self.root.abs(rel);
        let names = list_xattrs(&host).map_err(|e| apply_err(name, "listing xattrs", e))?;
        for key in names {
            let keep =
                key.as_bytes() == b"security.selinux" || xattrs.iter().any(|(k, _)| *k == key);
            if !keep {
                rustix::fs::lremovexattr(&host, key.as_os_str())
                    .map_err(|e| apply_err(name, "removing an xattr", e.into()))?;
            }
        }
        for (key, value) in xattrs {
            rustix::fs::lsetxattr(
                &host,
                key.as_os_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| apply_err(name, "setting an xattr", e.into()))?;
        }
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
        // Symlinked parents can put an entry deeper than its own path says: the budget
        // is on where it really lands.
        let depth = real.components().count();
        let max = self.options.limits.max_path_depth;
        if depth >= max {
            return Err(limit(
                name,
                LimitKind::PathDepth,
                depth as u64 + 1,
                max as u64,
            ));
        }
        self.parent_cache = Some(ParentCache {
            comps: parents.to_vec(),
            real: real.clone(),
            removals: self.root.removals(),
        });
        Ok(real)
    }

    /// [`Self::set_meta`] for a regular file just written, through its descriptor: the
    /// same calls in the same order, without resolving the path four more times.
    fn set_file_meta(
        &self,
        file: &File,
        meta: &Meta,
        xattrs: &[(OsString, Vec<u8>)],
        name: &str,
    ) -> Result<(), OciError> {
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
        for (key, value) in xattrs {
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

    fn hardlink(
        &mut self,
        header: &Header,
        rel: &Path,
        name: &str,
        state: &mut LayerState,
    ) -> Result<(), OciError> {
        let raw_target = &header.link;
        if raw_target.is_empty() {
            return Err(bad_header(name, "hardlink without a target"));
        }
        let target_name = String::from_utf8_lossy(raw_target).into_owned();
        let bad = |reason| OciError::BadHardlink {
            entry: name.to_owned(),
            target: target_name.clone(),
            reason,
        };
        if raw_target.len() > self.options.limits.max_path_len {
            return Err(bad("is too long"));
        }
        let comps = split_entry(raw_target).map_err(|_| bad("leaves the root"))?;
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
        xattrs: &[(OsString, Vec<u8>)],
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
        for (key, value) in xattrs {
            if let Err(e) = rustix::fs::lsetxattr(
                host,
                key.as_os_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            ) {
                // Linux allows no user.* attributes on symlinks: skipped (umoci 0.4.7
                // fails the whole unpack instead).
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
            let name = dir.rel.to_string_lossy();
            self.set_meta(&host, &dir.meta, &[], &name, false)?;
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

/// Why writing a data segment stopped.
#[derive(Debug)]
enum CopyError {
    /// The stream failed (a budget, corruption, or an end inside the entry).
    Read(io::Error),
    /// The staging file system failed.
    Write(io::Error),
    /// The data budget ran out; this many bytes were about to be written.
    Budget(u64),
}

/// Holes are made at this granularity (the smallest block any file system here uses).
const HOLE_BLOCK: u64 = 4096;

/// Copies `length` bytes of entry data to `offset` in `file` (created empty: all holes),
/// leaving every all-zero 4 KiB block, aligned in the file, unwritten, so that zero runs
/// cost no disk here or in the ext4 image (`mkfs.ext4 -d` copies only data). Returns the
/// bytes written; fails before writing past `budget`.
fn write_segment<R: Read>(
    tar: &mut TarReader<R>,
    file: &File,
    mut offset: u64,
    length: u64,
    buffer: &mut [u8],
    budget: u64,
) -> Result<u64, CopyError> {
    use std::os::unix::fs::FileExt;
    let mut left = length;
    let mut written = 0u64;
    while left > 0 {
        let want = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let chunk = &mut buffer[..want];
        let mut filled = 0;
        while filled < want {
            match tar.read_data(&mut chunk[filled..]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CopyError::Read(e)),
            }
        }
        // Runs of data blocks, cut at block boundaries of the file, each written at once.
        let block_end = |pos: usize| {
            let at = offset + pos as u64;
            (want as u64).min((at / HOLE_BLOCK + 1) * HOLE_BLOCK - offset) as usize
        };
        let mut pos = 0usize;
        while pos < want {
            let end = block_end(pos);
            if is_zero(&chunk[pos..end]) {
                pos = end;
                continue;
            }
            let start = pos;
            pos = end;
            while pos < want {
                let end = block_end(pos);
                if is_zero(&chunk[pos..end]) {
                    break;
                }
                pos = end;
            }
            written += write_run(
                file,
                &chunk[start..pos],
                offset + start as u64,
                written,
                budget,
            )?;
        }
        offset += want as u64;
        left -= want as u64;
    }
    return Ok(written);

    fn write_run(
        file: &File,
        data: &[u8],
        at: u64,
        written: u64,
        budget: u64,
    ) -> Result<u64, CopyError> {
        let len = data.len() as u64;
        if written + len > budget {
            return Err(CopyError::Budget(written + len));
        }
        file.write_all_at(data, at).map_err(CopyError::Write)?;
        Ok(len)
    }
}

/// Whether a block is all zeros (no early exit: the compiler vectorises this).
fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(16);
    let any = words.by_ref().fold(0u128, |acc, w| {
        acc | u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16]))
    });
    any == 0 && words.remainder().iter().all(|b| *b == 0)
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

/// An error met while a layer streamed: the budget the stream ran into when one did (a
/// read error is how the stream reports it), else the error itself.
fn budget_error(hit: &LimitHit, last: &str, err: OciError) -> OciError {
    match hit.hit.get() {
        Some((kind, value, max)) => limit(last, kind, value, max),
        None => err,
    }
}

/// Mode, owner and mtime (PAX records already applied by the reader).
fn meta_of(header: &Header, name: &str) -> Result<Meta, OciError> {
    let bad = |what: &str| bad_header(name, what);
    Ok(Meta {
        mode: header.mode,
        uid: u32::try_from(header.uid).map_err(|_| bad("uid above 2^32"))?,
        gid: u32::try_from(header.gid).map_err(|_| bad("gid above 2^32"))?,
        mtime: TimeSpec::new(header.mtime.0, i64::from(header.mtime.1)),
    })
}

/// Extended attributes a layer may not set: overlayfs's own metadata (`trusted.overlay.*`,
/// and `user.overlay.*` for overlays mounted with `userxattr`). In a root file system
/// they would make an overlay in the guest see whiteouts and opaque directories that the
/// image's layers never expressed; umoci refuses them too.
const FORBIDDEN_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// The entry's extended attributes, within the budget, without the forbidden ones.
fn xattrs_of(header: &Header, name: &str, max: u64) -> Result<Vec<(OsString, Vec<u8>)>, OciError> {
    let total: u64 = header
        .xattrs
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum();
    if total > max {
        return Err(limit(name, LimitKind::XattrSize, total, max));
    }
    Ok(header
        .xattrs
        .iter()
        .filter(|(k, _)| !FORBIDDEN_XATTR_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (OsStr::from_bytes(k).to_owned(), v.clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_generous() {
        let limits = Limits::default();
        assert!(limits.max_data_bytes >= 8 << 30);
        assert!(limits.max_stream_bytes > limits.max_data_bytes);
        assert_eq!(limits.max_path_len, 4096);
        let small = Limits::for_image_bytes(512 << 20);
        assert_eq!(small.max_data_bytes, 512 << 20);
        assert_eq!(small.max_entries, 262_144);
        assert!(small.max_duration < limits.max_duration);
    }

    #[test]
    fn zero_blocks() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[0u8; 17]));
        let mut block = [0u8; 4096];
        block[4095] = 1;
        assert!(!is_zero(&block));
        let mut odd = [0u8; 17];
        odd[16] = 1;
        assert!(!is_zero(&odd));
    }
}
