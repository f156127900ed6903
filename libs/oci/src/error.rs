//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Which budget of [`crate::Limits`] an input exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Bytes of file data written across all layers, holes not counted
    /// ([`crate::Limits::max_data_bytes`]).
    DataSize,
    /// Decompressed bytes of all layer streams together
    /// ([`crate::Limits::max_stream_bytes`]).
    StreamSize,
    /// The apparent size of one file, holes counted ([`crate::Limits::max_file_bytes`]).
    FileSize,
    /// Number of entries across all layers ([`crate::Limits::max_entries`]).
    EntryCount,
    /// Bytes of an entry's path or link target ([`crate::Limits::max_path_len`]).
    PathLength,
    /// Directories above an entry, after symlinks are resolved
    /// ([`crate::Limits::max_path_depth`]).
    PathDepth,
    /// Bytes of tar metadata (headers, PAX records, long names, sparse maps) before one
    /// entry ([`crate::Limits::max_header_bytes`]).
    HeaderSize,
    /// Bytes of one entry's extended attributes ([`crate::Limits::max_xattr_bytes`]).
    XattrSize,
    /// Milliseconds spent applying the layers ([`crate::Limits::max_duration`]).
    Duration,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DataSize => "file data (bytes written, holes excluded)",
            Self::StreamSize => "decompressed layers (bytes)",
            Self::FileSize => "file size (bytes, holes included)",
            Self::EntryCount => "entry count",
            Self::PathLength => "path length (bytes)",
            Self::PathDepth => "path depth (directories)",
            Self::HeaderSize => "tar header size (bytes)",
            Self::XattrSize => "extended attributes of one entry (bytes)",
            Self::Duration => "conversion time (ms)",
        })
    }
}

/// Errors of layer application, image reading and the ext4 builder.
///
/// Every variant caused by one archive entry names that entry (its path as written in the
/// layer), so a user can tell which file of which image is at fault.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The entry's path is not acceptable (`..` component, NUL byte, replaces the root).
    #[error("entry {entry:?}: unsafe path ({reason})")]
    UnsafePath { entry: String, reason: &'static str },
    /// A parent directory of the entry is a symlink and the options refuse those.
    #[error("entry {entry:?}: parent {parent:?} is a symlink")]
    SymlinkParent { entry: String, parent: String },
    /// Resolving the entry's parent directories met too many symlinks.
    #[error("entry {entry:?}: too many levels of symlinks in its parent directories")]
    SymlinkLoop { entry: String },
    /// A parent of the entry exists and is not a directory.
    #[error("entry {entry:?}: parent {parent:?} is not a directory")]
    NotADirectory { entry: String, parent: String },
    /// A hardlink entry whose target is unusable (escapes, missing, a directory).
    #[error("entry {entry:?}: hardlink target {target:?} {reason}")]
    BadHardlink {
        entry: String,
        target: String,
        reason: &'static str,
    },
    /// A whiteout that names nothing deletable (`.wh.`, `.wh..`, `.wh...`).
    #[error("entry {entry:?}: invalid whiteout ({reason})")]
    BadWhiteout { entry: String, reason: &'static str },
    /// A tar entry type that has no place in a rootfs.
    #[error("entry {entry:?}: unsupported tar entry type {kind:?}")]
    UnsupportedEntry { entry: String, kind: u8 },
    /// A header field that cannot be applied (uid above 2^32, bad device number, ...).
    #[error("entry {entry:?}: invalid header ({reason})")]
    BadHeader { entry: String, reason: String },
    /// A budget was exhausted; `entry` is the entry being read when it happened.
    #[error("entry {entry:?}: budget for {kind} exceeded ({value} > {limit})")]
    LimitExceeded {
        entry: String,
        kind: LimitKind,
        value: u64,
        limit: u64,
    },
    /// Applying an entry failed in the file system.
    #[error("entry {entry:?}: {op} failed")]
    Apply {
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The layer stream is not a readable (compressed) tar archive.
    #[error("corrupt layer after entry {after:?}")]
    Corrupt {
        after: String,
        #[source]
        source: io::Error,
    },
    /// The layer's media type is not a tar layer this crate can apply.
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    /// A blob's content does not match its digest.
    #[error("digest mismatch for {digest}: content hashes to {actual}")]
    DigestMismatch { digest: String, actual: String },
    /// An OCI image layout or one of its JSON documents is invalid.
    #[error("invalid OCI image layout: {0}")]
    InvalidLayout(String),
    /// A layer decompressed to a tar whose digest is not the image config's
    /// `rootfs.diff_ids` entry for it (the config describes other content).
    #[error(
        "layer {index} ({digest}) decompresses to {actual}, but the image config's \
         rootfs.diff_ids[{index}] is {expected}"
    )]
    DiffIdMismatch {
        /// The layer's position in the manifest, lowest first.
        index: usize,
        /// The layer blob's digest (as the manifest lists it).
        digest: String,
        /// The diff_id the image config lists.
        expected: String,
        /// The digest of the decompressed tar.
        actual: String,
    },
    /// The image config lists a different number of `rootfs.diff_ids` than the manifest
    /// lists layers.
    #[error(
        "the manifest lists {layers} layers but the image config lists {diff_ids} rootfs.diff_ids"
    )]
    DiffIdCount { layers: usize, diff_ids: usize },
    /// A docker archive (`docker save`, `skopeo copy ... docker-archive:`) cannot be
    /// imported as a whole: no `manifest.json`, no such image, too many entries, ...
    #[error("docker archive {}: {reason}", archive.display())]
    Archive { archive: PathBuf, reason: String },
    /// A path a docker archive's `manifest.json` names is unusable: unsafe, missing, not a
    /// regular file, too large. `entry` is the path as `manifest.json` writes it.
    #[error("docker archive {}: entry {entry:?} {reason}", archive.display())]
    ArchiveEntry {
        archive: PathBuf,
        entry: String,
        reason: String,
    },
    /// A docker archive entry's content does not hash to what the archive claims: the
    /// config to the digest in its file name, a layer to its `rootfs.diff_ids` entry.
    #[error(
        "docker archive {}: entry {entry:?} hashes to {actual}, but {expected_by} is {expected}",
        archive.display()
    )]
    ArchiveMismatch {
        archive: PathBuf,
        entry: String,
        expected_by: String,
        expected: String,
        actual: String,
    },
    /// The docker archive is not a readable tar file.
    #[error("docker archive {}: not a readable tar archive", archive.display())]
    ArchiveCorrupt {
        archive: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An external tool (mkfs.ext4) failed; `stderr` is its last output.
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    /// Pulling from a registry failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Any other I/O failure, with what was being done.
    #[error("{context} ({path})", path = path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl OciError {
    /// The layer entry this error is about, if it is about one.
    pub fn entry(&self) -> Option<&str> {
        match self {
            Self::UnsafePath { entry, .. }
            | Self::SymlinkParent { entry, .. }
            | Self::SymlinkLoop { entry }
            | Self::NotADirectory { entry, .. }
            | Self::BadHardlink { entry, .. }
            | Self::BadWhiteout { entry, .. }
            | Self::UnsupportedEntry { entry, .. }
            | Self::BadHeader { entry, .. }
            | Self::LimitExceeded { entry, .. }
            | Self::Apply { entry, .. } => Some(entry),
            Self::Corrupt { after, .. } => Some(after),
            _ => None,
        }
    }

    /// True when the input itself is bad or hostile (retrying cannot help).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Registry(e) => !e.is_retryable(),
            _ => !matches!(
                self,
                Self::Apply { .. } | Self::Io { .. } | Self::Tool { .. }
            ),
        }
    }

    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            context,
            path: path.into(),
            source,
        }
    }
}
