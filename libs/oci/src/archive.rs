//! Images saved by `docker save` (or `skopeo copy ... docker-archive:FILE`), imported
//! into an OCI image layout so that [`OciLayout::apply`] consumes them like a pulled image.
//!
//! A docker archive is a tar file holding `manifest.json` (an array of
//! `{Config, RepoTags, Layers}`, one per image), each image's config and its layers, named
//! by the writer's convention: `<id>/layer.tar` and `<hex>.json` (docker before 25),
//! `<hex>.tar` (skopeo), `blobs/sha256/<hex>` (docker 25 and later, which also writes an
//! OCI layout that is ignored here: `manifest.json` describes every variant). Nothing in
//! the archive is trusted as a path or a checksum:
//!
//! - one pass over the tar indexes every entry (name, type, data offset and size) and reads
//!   `manifest.json`; entry data is skipped by seeking, so the pass reads only headers;
//! - every path `manifest.json` names must be relative, free of `..` and resolve, through
//!   the in-archive symlinks and hardlinks that `docker save` writes for shared layers, to
//!   a regular file of the archive (never to anything outside it);
//! - the config must hash to the digest its file name carries, and each layer, streamed
//!   into the cache (temporary file, fsync, rename) while both its bytes and its
//!   decompressed tar are hashed, must decompress to its `rootfs.diff_ids` entry.
//!
//! The synthesized OCI manifest (each layer as stored: plain tar, or gzip or zstd when the
//! archive holds compressed layers, told by their magic bytes) becomes a blob of the
//! cache, is listed in its `index.json` and is resolved from there by
//! [`OciLayout::resolve`], so an imported image is re-verified by the same code as a
//! pulled one. Reading needs a seekable file: the archive is read in place, not copied.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::compression::Compression;
use crate::diff_id::sha256_digest as hex_digest;
use crate::error::OciError;
use crate::image::{OciLayout, Platform, ResolvedImage};
use crate::registry::Reference;

/// `manifest.json` and image configs are small; anything bigger is refused unread.
const MAX_DOCUMENT: u64 = 4 << 20;
/// Symlinks and hardlinks followed from one `manifest.json` path.
const MAX_LINK_HOPS: usize = 16;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Limits on what an archive may make the importer read, hash and store.
#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    /// Largest layer, both as stored in the archive and decompressed.
    pub max_layer_size: u64,
    /// Most tar entries the archive may have.
    pub max_entries: u64,
    /// Most bytes the index pass reads: tar metadata (headers, long names, PAX records)
    /// and `manifest.json`. The tar reader holds a long name in memory whole, so this
    /// bounds memory too.
    pub max_metadata: u64,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        Self {
            max_layer_size: 16 << 30,
            max_entries: 65_536,
            max_metadata: 128 << 20,
        }
    }
}

/// Imports one image of the docker archive `archive` into the OCI image layout `cache`
/// (created if missing; the registry client's blob cache is such a layout) with the
/// default [`ArchiveOptions`]. `name` picks the image by one of its `RepoTags`
/// (`busybox:latest` also matches `docker.io/library/busybox:latest`); without it the
/// archive must hold exactly one image.
pub fn import_docker_archive(
    archive: &Path,
    cache: &Path,
    name: Option<&str>,
) -> Result<(OciLayout, ResolvedImage), OciError> {
    import_docker_archive_with(archive, cache, name, &ArchiveOptions::default())
}

/// [`import_docker_archive`] with explicit limits.
pub fn import_docker_archive_with(
    archive: &Path,
    cache: &Path,
    name: Option<&str>,
    options: &ArchiveOptions,
) -> Result<(OciLayout, ResolvedImage), OciError> {
    let importer = Importer {
        archive: archive.to_owned(),
        options: options.clone(),
    };
    let mut file =
        File::open(archive).map_err(|e| OciError::io("opening the docker archive", archive, e))?;
    let len = file
        .metadata()
        .map_err(|e| OciError::io("reading the docker archive", archive, e))?
        .len();
    importer.refuse_compressed(&mut file)?;
    let index = importer.index(&file, len)?;
    let manifest = index.manifest.as_deref().ok_or_else(|| {
        importer.whole("it has no manifest.json (is it a `docker save` archive?)")
    })?;
    let images: Vec<ImageEntry> = serde_json::from_slice(manifest)
        .map_err(|e| importer.whole(format!("manifest.json is not valid: {e}")))?;
    let (image, ref_name) = importer.select(&images, name)?;

    // Every path is resolved and the config checked before anything is written, so that a
    // hostile manifest.json leaves no trace in the cache. (A layer failing its diff_id
    // later leaves the layers before it: verified, content-addressed, harmless.)
    let config_path = index
        .resolve(&image.config)
        .map_err(|reason| importer.entry(&image.config, reason))?;
    let mut layer_paths = Vec::with_capacity(image.layers.len());
    for written in &image.layers {
        let resolved = index
            .resolve(written)
            .map_err(|reason| importer.entry(written, reason))?;
        layer_paths.push(resolved);
    }
    let config = importer.read_config(&file, &image.config, &config_path)?;
    let diff_ids = importer.diff_ids(&image.config, &config)?;
    if diff_ids.len() != image.layers.len() {
        return Err(importer.whole(format!(
            "manifest.json lists {} layers but the image config {:?} lists {} rootfs.diff_ids",
            image.layers.len(),
            image.config,
            diff_ids.len()
        )));
    }

    let cache = Cache::open(cache)?;
    let mut imported: HashMap<String, LayerDigests> = HashMap::new();
    let mut layers = Vec::with_capacity(image.layers.len());
    for (i, (written, resolved)) in image.layers.iter().zip(&layer_paths).enumerate() {
        let digests = match imported.get(&resolved.name) {
            Some(digests) => digests.clone(),
            None => {
                let digests =
                    importer.import_layer(&cache, &file, written, resolved, &diff_ids[i])?;
                imported.insert(resolved.name.clone(), digests.clone());
                digests
            }
        };
        if digests.diff_id != diff_ids[i] {
            return Err(importer.diff_id_mismatch(written, i, &diff_ids[i], &digests.diff_id));
        }
        layers.push(digests);
    }
    let config_digest = cache.store_document(&config)?;
    cache.sync_blobs()?;

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers
            .iter()
            .map(|l| serde_json::json!({
                "mediaType": layer_media_type(l.compression),
                "digest": l.digest,
                "size": l.size,
            }))
            .collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest)
        .map_err(|e| OciError::InvalidLayout(format!("encoding the manifest: {e}")))?;
    let manifest_digest = cache.store_document(&manifest)?;
    let ref_name = ref_name.unwrap_or_else(|| format!("docker-archive@{manifest_digest}"));
    let resolved = cache.record_and_resolve(&ref_name, &manifest_digest, manifest.len() as u64)?;
    Ok((OciLayout::open(&cache.dir)?, resolved))
}

/// One image in `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImageEntry {
    config: String,
    /// `null` for an image saved by its ID.
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl ImageEntry {
    fn tags(&self) -> &[String] {
        self.repo_tags.as_deref().unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
struct ConfigRootfs {
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A tar entry, as the index pass saw it.
#[derive(Debug, Clone)]
enum Node {
    File {
        offset: u64,
        size: u64,
    },
    Symlink(String),
    Hardlink(String),
    /// Anything that has no content to read; the text says what it is.
    Other(&'static str),
    /// The name appears more than once; which one a reader would take is ambiguous.
    Duplicate,
}

/// Every entry of the archive by normalized name, and `manifest.json`'s content.
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Node>,
    manifest: Option<Vec<u8>>,
}

/// A `manifest.json` path resolved to the regular file that holds its content.
#[derive(Debug, Clone)]
struct Resolved {
    name: String,
    offset: u64,
    size: u64,
}

impl Index {
    /// Follows `written` (as `manifest.json` has it) through links to a regular file.
    fn resolve(&self, written: &str) -> Result<Resolved, String> {
        let mut current = normalize(written)?;
        for _ in 0..=MAX_LINK_HOPS {
            let node = self.entries.get(&current).ok_or_else(|| {
                if normalize(written).ok().as_deref() == Some(current.as_str()) {
                    "does not exist in the archive".to_owned()
                } else {
                    format!("links to {current:?}, which does not exist in the archive")
                }
            })?;
            current = match node {
                Node::File { offset, size } => {
                    return Ok(Resolved {
                        name: current,
                        offset: *offset,
                        size: *size,
                    })
                }
                Node::Symlink(target) => {
                    let dir = current.rsplit_once('/').map_or("", |(dir, _)| dir);
                    join_link(dir, target)?
                }
                // Hardlink targets are archive paths, not relative to the link.
                Node::Hardlink(target) => join_link("", target)?,
                Node::Other(what) => return Err(format!("is {what}, not a regular file")),
                Node::Duplicate => return Err("appears more than once in the archive".to_owned()),
            };
        }
        Err(format!(
            "goes through more than {MAX_LINK_HOPS} links in the archive"
        ))
    }
}

/// `path` as the index keys it: relative, without empty or `.` components. Paths with
/// `..` are refused outright, as are absolute ones: nothing honest writes them.
fn normalize(path: &str) -> Result<String, String> {
    if path.contains('\0') {
        return Err("contains a NUL byte".to_owned());
    }
    if path.starts_with('/') {
        return Err("is an absolute path (archive paths are relative)".to_owned());
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("has a '..' component".to_owned()),
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err("is an empty path".to_owned());
    }
    Ok(parts.join("/"))
}

/// The archive path a link in directory `dir` to `target` names; `..` may climb only
/// within the archive.
fn join_link(dir: &str, target: &str) -> Result<String, String> {
    if target.starts_with('/') || target.contains('\0') {
        return Err(format!("is a link to {target:?}, outside the archive"));
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("is a link to {target:?}, outside the archive"));
                }
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!("is a link to {target:?}, not to a file"));
    }
    Ok(parts.join("/"))
}

/// The sha256 digest an archive file name carries: `<hex>.json`, `<hex>.tar` or
/// `blobs/sha256/<hex>`.
fn digest_in_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let hex = if path.starts_with("blobs/sha256/") {
        name
    } else {
        name.strip_suffix(".json")
            .or_else(|| name.strip_suffix(".tar"))?
    };
    is_sha256_hex(hex).then(|| format!("sha256:{hex}"))
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn layer_media_type(compression: Compression) -> &'static str {
    match compression {
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        Compression::None | Compression::Auto => "application/vnd.oci.image.layer.v1.tar",
    }
}

/// One import: the archive's path (for errors) and the limits.
struct Importer {
    archive: PathBuf,
    options: ArchiveOptions,
}

impl Importer {
    fn whole(&self, reason: impl Into<String>) -> OciError {
        OciError::Archive {
            archive: self.archive.clone(),
            reason: reason.into(),
        }
    }

    fn entry(&self, entry: &str, reason: impl Into<String>) -> OciError {
        OciError::ArchiveEntry {
            archive: self.archive.clone(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    fn diff_id_mismatch(
        &self,
        entry: &str,
        index: usize,
        expected: &str,
        actual: &str,
    ) -> OciError {
        OciError::ArchiveMismatch {
            archive: self.archive.clone(),
            entry: entry.to_owned(),
            expected_by: format!("the image config's rootfs.diff_ids[{index}]"),
            expected: expected.to_owned(),
            actual: format!("{actual} (uncompressed)"),
        }
    }

    /// `docker save | gzip` output is common, but a compressed tar cannot be read in
    /// place; say so rather than "not a tar".
    fn refuse_compressed(&self, file: &mut File) -> Result<(), OciError> {
        let mut magic = [0u8; 4];
        let mut filled = 0;
        while filled < magic.len() {
            match file.read(&mut magic[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(OciError::io("reading the docker archive", &self.archive, e)),
            }
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| OciError::io("reading the docker archive", &self.archive, e))?;
        if Compression::sniff(&magic[..filled]) != Compression::None {
            return Err(
                self.whole("the archive is compressed; decompress it first (gunzip or unzstd)")
            );
        }
        Ok(())
    }

    /// The index pass: every entry's name, type, data offset and size, plus
    /// `manifest.json`. Entry data is seeked over, not read.
    fn index(&self, file: &File, len: u64) -> Result<Index, OciError> {
        let read = Rc::new(Cell::new(0u64));
        // Unbuffered, so that only what the tar reader asks for counts: a read-ahead
        // buffer would charge the budget for entry data that is then seeked over.
        let reader = Budgeted {
            inner: file,
            read: read.clone(),
            limit: self.options.max_metadata,
        };
        // A read error past the budget is the budget's doing (the reader stopped).
        let failed = |source: io::Error| {
            if read.get() > self.options.max_metadata {
                self.whole(format!(
                    "its tar headers and manifest.json exceed the {} byte metadata limit",
                    self.options.max_metadata
                ))
            } else {
                OciError::ArchiveCorrupt {
                    archive: self.archive.clone(),
                    source,
                }
            }
        };
        let mut tar = tar::Archive::new(reader);
        let entries = tar.entries_with_seek().map_err(failed)?;
        let mut index = Index::default();
        let mut count = 0u64;
        for entry in entries {
            let mut entry = entry.map_err(failed)?;
            count += 1;
            if count > self.options.max_entries {
                return Err(self.whole(format!(
                    "it has more than {} entries",
                    self.options.max_entries
                )));
            }
            // Names that are not UTF-8 or not safe cannot be what manifest.json (UTF-8,
            // checked the same way) refers to, so they are simply not indexed.
            let Ok(name) = String::from_utf8(entry.path_bytes().into_owned()) else {
                continue;
            };
            let Ok(name) = normalize(&name) else {
                continue;
            };
            let link = || {
                entry
                    .link_name_bytes()
                    .and_then(|l| String::from_utf8(l.into_owned()).ok())
            };
            let node = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let offset = entry.raw_file_position();
                    let size = entry.size();
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(self.entry(
                            &name,
                            "extends past the end of the archive (is the file truncated?)",
                        ));
                    }
                    Node::File { offset, size }
                }
                tar::EntryType::Symlink => link().map_or(
                    Node::Other("a link with an unreadable target"),
                    Node::Symlink,
                ),
                tar::EntryType::Link => link().map_or(
                    Node::Other("a link with an unreadable target"),
                    Node::Hardlink,
                ),
                tar::EntryType::Directory => Node::Other("a directory"),
                tar::EntryType::GNUSparse => Node::Other("a sparse file"),
                _ => Node::Other("a special file"),
            };
            if name == "manifest.json" {
                if let Node::File { size, .. } = node {
                    if size > MAX_DOCUMENT {
                        return Err(self.entry(
                            &name,
                            format!("is {size} bytes, more than the {MAX_DOCUMENT} allowed"),
                        ));
                    }
                    let mut data = Vec::with_capacity(size as usize);
                    (&mut entry)
                        .take(size)
                        .read_to_end(&mut data)
                        .map_err(failed)?;
                    index.manifest = Some(data);
                }
            }
            match index.entries.entry(name) {
                std::collections::hash_map::Entry::Occupied(mut seen) => {
                    seen.insert(Node::Duplicate);
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(node);
                }
            }
        }
        if matches!(index.entries.get("manifest.json"), Some(Node::Duplicate)) {
            return Err(self.entry("manifest.json", "appears more than once in the archive"));
        }
        Ok(index)
    }

    /// The image `name` picks (or the only one), and the name to list it under in the
    /// cache's index.
    fn select<'a>(
        &self,
        images: &'a [ImageEntry],
        name: Option<&str>,
    ) -> Result<(&'a ImageEntry, Option<String>), OciError> {
        // Bounded: the message is for a terminal, and manifest.json may list thousands.
        const SHOWN: usize = 20;
        let listing = || {
            let mut tags: Vec<String> = images
                .iter()
                .take(SHOWN)
                .map(|image| match image.tags() {
                    [] => format!("an untagged image (config {})", image.config),
                    tags => tags.join(", "),
                })
                .collect();
            if images.len() > SHOWN {
                tags.push(format!("and {} more", images.len() - SHOWN));
            }
            tags.join("; ")
        };
        let Some(name) = name else {
            return match images {
                [image] => Ok((
                    image,
                    image.tags().first().map(|t| format!("docker-archive:{t}")),
                )),
                [] => Err(self.whole("manifest.json lists no image")),
                _ => Err(self.whole(format!(
                    "it holds {} images; name one of: {}",
                    images.len(),
                    listing()
                ))),
            };
        };
        // Tags match as written, or as the same normalized reference (`app:v1` is
        // `docker.io/library/app:v1`), as skopeo writes the long form and docker the short.
        let wanted = Reference::parse(name).ok().map(|r| r.to_string());
        let matches = |tag: &String| {
            tag == name
                || (wanted.is_some() && Reference::parse(tag).ok().map(|r| r.to_string()) == wanted)
        };
        let found: Vec<(&ImageEntry, &String)> = images
            .iter()
            .filter_map(|image| image.tags().iter().find(|t| matches(t)).map(|t| (image, t)))
            .collect();
        match found.as_slice() {
            [(image, tag)] => Ok((image, Some(format!("docker-archive:{tag}")))),
            [] => Err(self.whole(format!(
                "no image is tagged {name:?}; it holds: {}",
                listing()
            ))),
            _ => Err(self.whole(format!("{} images are tagged {name:?}", found.len()))),
        }
    }

    /// Reads the config (bounded) and checks it against the digest in its file name.
    fn read_config(
        &self,
        file: &File,
        written: &str,
        resolved: &Resolved,
    ) -> Result<Vec<u8>, OciError> {
        let expected = digest_in_name(written)
            .or_else(|| digest_in_name(&resolved.name))
            .ok_or_else(|| {
                self.entry(
                    written,
                    "is the image config, but its file name carries no sha256 digest to check it against",
                )
            })?;
        if resolved.size > MAX_DOCUMENT {
            return Err(self.entry(
                written,
                format!(
                    "is {} bytes, more than the {MAX_DOCUMENT} allowed for an image config",
                    resolved.size
                ),
            ));
        }
        let data = self.read_at(file, written, resolved)?;
        let actual = hex_digest(Sha256::new_with_prefix(&data));
        if actual != expected {
            return Err(OciError::ArchiveMismatch {
                archive: self.archive.clone(),
                entry: written.to_owned(),
                expected_by: "the digest in its file name".to_owned(),
                expected,
                actual,
            });
        }
        Ok(data)
    }

    fn read_at(
        &self,
        file: &File,
        written: &str,
        resolved: &Resolved,
    ) -> Result<Vec<u8>, OciError> {
        let mut reader = file;
        reader
            .seek(SeekFrom::Start(resolved.offset))
            .map_err(|e| OciError::io("reading the docker archive", &self.archive, e))?;
        let mut data = Vec::with_capacity(resolved.size as usize);
        reader
            .take(resolved.size)
            .read_to_end(&mut data)
            .map_err(|e| OciError::io("reading the docker archive", &self.archive, e))?;
        if data.len() as u64 != resolved.size {
            return Err(self.entry(written, "is cut short (is the file truncated?)"));
        }
        Ok(data)
    }

    /// The config's `rootfs.diff_ids`, each checked to be a sha256 digest.
    fn diff_ids(&self, written: &str, config: &[u8]) -> Result<Vec<String>, OciError> {
        let parsed: ConfigRootfs = serde_json::from_slice(config)
            .map_err(|e| self.entry(written, format!("is not a valid image config: {e}")))?;
        for (i, diff_id) in parsed.rootfs.diff_ids.iter().enumerate() {
            let valid = diff_id.strip_prefix("sha256:").is_some_and(is_sha256_hex);
            if !valid {
                return Err(self.entry(
                    written,
                    format!("has rootfs.diff_ids[{i}] = {diff_id:?}, not a sha256 digest"),
                ));
            }
        }
        Ok(parsed.rootfs.diff_ids)
    }

    /// Puts one layer into the cache, always verifying the archive's copy: it is hashed
    /// as it streams (bytes and decompressed tar) and written to a temporary file that is
    /// renamed into place, unless the cache already holds a blob of that digest that
    /// still verifies, which is then kept and not written again.
    fn import_layer(
        &self,
        cache: &Cache,
        file: &File,
        written: &str,
        resolved: &Resolved,
        diff_id: &str,
    ) -> Result<LayerDigests, OciError> {
        let limit = self.options.max_layer_size;
        if resolved.size > limit {
            return Err(self.entry(
                written,
                format!(
                    "is {} bytes, more than the {limit} byte layer limit",
                    resolved.size
                ),
            ));
        }
        let hint = digest_in_name(written).or_else(|| digest_in_name(&resolved.name));
        // The blob digest is known only after reading, so guess it to decide whether to
        // write: the digest the name carries, else the diff_id (right for a plain tar,
        // which every docker archive before 25 holds). A wrong guess costs a second read.
        let guess = hint.clone().unwrap_or_else(|| diff_id.to_owned());
        if cache.blob_path(&guess)?.is_file() {
            let digests = self.stream_layer(file, written, resolved, None, cache)?;
            if digests.diff_id != diff_id {
                // The caller reports this, naming the diff_id's index.
                return Ok(digests);
            }
            self.check_hint(written, hint.as_deref(), &digests)?;
            if digests.digest == guess && cache.verify(&guess, digests.size)? {
                return Ok(digests);
            }
        }
        let temp = cache.temp_file();
        let out = File::create(&temp.path)
            .map_err(|e| OciError::io("creating a file in the cache", &temp.path, e))?;
        let mut writer = BufWriter::new(out);
        let digests = self.stream_layer(
            file,
            written,
            resolved,
            Some((&mut writer, &temp.path)),
            cache,
        )?;
        if digests.diff_id != diff_id {
            return Ok(digests);
        }
        self.check_hint(written, hint.as_deref(), &digests)?;
        let out = writer.into_inner().map_err(|e| {
            OciError::io("writing a layer into the cache", &temp.path, e.into_error())
        })?;
        out.sync_all()
            .map_err(|e| OciError::io("writing a layer into the cache", &temp.path, e))?;
        drop(out);
        temp.persist(&cache.blob_path(&digests.digest)?)?;
        Ok(digests)
    }

    /// Reads one layer entry through [`hash_layer`], copying it to `out` if given.
    fn stream_layer(
        &self,
        file: &File,
        written: &str,
        resolved: &Resolved,
        out: Option<(&mut dyn Write, &Path)>,
        cache: &Cache,
    ) -> Result<LayerDigests, OciError> {
        let limit = self.options.max_layer_size;
        let mut reader = file;
        reader
            .seek(SeekFrom::Start(resolved.offset))
            .map_err(|e| OciError::io("reading the docker archive", &self.archive, e))?;
        let (writer, out_path) = match out {
            Some((writer, path)) => (Some(writer), path.to_owned()),
            None => (None, cache.dir.clone()),
        };
        let digests =
            hash_layer(reader.take(resolved.size), writer, limit).map_err(
                |failure| match failure {
                    Failure::Read(e) => {
                        OciError::io("reading the docker archive", &self.archive, e)
                    }
                    Failure::Write(e) => {
                        OciError::io("writing a layer into the cache", &out_path, e)
                    }
                    Failure::Decode(compression, e) => {
                        let format = match compression {
                            Compression::Gzip => "gzip",
                            Compression::Zstd => "zstd",
                            Compression::None | Compression::Auto => "tar",
                        };
                        self.entry(written, format!("is not valid {format} data: {e}"))
                    }
                    Failure::TooLarge => self.entry(
                        written,
                        format!("decompresses to more than the {limit} byte layer limit"),
                    ),
                },
            )?;
        if digests.size != resolved.size {
            return Err(self.entry(written, "is cut short (is the file truncated?)"));
        }
        Ok(digests)
    }

    /// A layer whose file name carries a digest must hash to it.
    fn check_hint(
        &self,
        written: &str,
        hint: Option<&str>,
        digests: &LayerDigests,
    ) -> Result<(), OciError> {
        match hint {
            Some(hint) if hint != digests.digest => Err(OciError::ArchiveMismatch {
                archive: self.archive.clone(),
                entry: written.to_owned(),
                expected_by: "the digest in its file name".to_owned(),
                expected: hint.to_owned(),
                actual: digests.digest.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// Counts the bytes the tar reader consumes (seeks are free) and stops it past `limit`.
struct Budgeted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
    limit: u64,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        if self.read.get() > self.limit {
            return Err(io::Error::other("tar metadata limit exceeded"));
        }
        Ok(n)
    }
}

impl<R: Seek> Seek for Budgeted<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// What hashing one layer found.
#[derive(Debug, Clone)]
struct LayerDigests {
    /// Of the bytes as stored.
    digest: String,
    size: u64,
    /// Of the decompressed tar.
    diff_id: String,
    compression: Compression,
}

/// Why [`hash_layer`] stopped.
#[derive(Debug)]
enum Failure {
    Read(io::Error),
    Write(io::Error),
    Decode(Compression, io::Error),
    TooLarge,
}

/// Passes what it reads to a hash and, optionally, a writer.
struct Tee<'w, R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    out: Option<&'w mut dyn Write>,
    failure: Option<Failure>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                let message = e.to_string();
                self.failure = Some(Failure::Read(e));
                return Err(io::Error::other(message));
            }
        };
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.write_all(&buf[..n]) {
                let message = e.to_string();
                self.failure = Some(Failure::Write(e));
                return Err(io::Error::other(message));
            }
        }
        Ok(n)
    }
}

/// Hashes the decompressed stream, failing once it passes `limit`.
struct DiffSink {
    hasher: Sha256,
    size: u64,
    limit: u64,
    too_large: bool,
}

impl Write for DiffSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.size += buf.len() as u64;
        if self.size > self.limit {
            self.too_large = true;
            return Err(io::Error::other("layer size limit exceeded"));
        }
        self.hasher.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a layer once, hashing its bytes (the blob digest) and, decompressed when its
/// magic says so, its tar (the diff_id); with `out`, the bytes are also written there.
fn hash_layer<R: Read>(
    input: R,
    out: Option<&mut dyn Write>,
    limit: u64,
) -> Result<LayerDigests, Failure> {
    let mut tee = BufReader::with_capacity(
        1 << 16,
        Tee {
            inner: input,
            hasher: Sha256::new(),
            size: 0,
            out,
            failure: None,
        },
    );
    let mut diff = DiffSink {
        hasher: Sha256::new(),
        size: 0,
        limit,
        too_large: false,
    };
    let mut compression = Compression::None;
    let result = (|| -> io::Result<()> {
        compression = Compression::sniff(tee.fill_buf()?);
        match compression {
            Compression::Gzip => {
                io::copy(
                    &mut flate2::bufread::MultiGzDecoder::new(&mut tee),
                    &mut diff,
                )?;
            }
            Compression::Zstd => {
                io::copy(
                    &mut zstd::stream::read::Decoder::with_buffer(&mut tee)?,
                    &mut diff,
                )?;
            }
            Compression::None | Compression::Auto => {
                io::copy(&mut tee, &mut diff)?;
            }
        }
        // Bytes after the compressed stream still belong to the blob and its digest.
        io::copy(&mut tee, &mut io::sink())?;
        Ok(())
    })();
    let tee = tee.into_inner();
    match result {
        Ok(()) => Ok(LayerDigests {
            digest: hex_digest(tee.hasher),
            size: tee.size,
            diff_id: hex_digest(diff.hasher),
            compression,
        }),
        Err(e) => Err(match tee.failure {
            Some(failure) => failure,
            None if diff.too_large => Failure::TooLarge,
            None => Failure::Decode(compression, e),
        }),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The OCI image layout the archive is imported into.
#[derive(Debug)]
struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens `dir`, creating the layout's skeleton where it is missing (`index.json` is
    /// created under the index lock, in [`Cache::record_and_resolve`]).
    fn open(dir: &Path) -> Result<Self, OciError> {
        for sub in ["blobs/sha256", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|e| OciError::io("creating the blob cache", &path, e))?;
        }
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| OciError::io("writing", &marker, e))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The path of a blob; the digest is checked first, so that it cannot name a path.
    fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if is_sha256_hex(hex) => Ok(self.dir.join("blobs/sha256").join(hex)),
            _ => Err(OciError::InvalidLayout(format!(
                "unsupported or malformed digest {digest:?}"
            ))),
        }
    }

    fn temp_file(&self) -> TempFile {
        let path = self.dir.join("tmp").join(format!(
            "archive.{}.{}.partial",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        TempFile {
            path,
            persisted: false,
        }
    }

    /// True when the cache holds blob `digest` of `size` bytes and it still hashes to its
    /// name; a damaged one is removed (the caller then stores the archive's copy).
    fn verify(&self, digest: &str, size: u64) -> Result<bool, OciError> {
        let path = self.blob_path(digest)?;
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(OciError::io("opening a cached blob", &path, e)),
        };
        let mut hasher = Sha256::new();
        let read = io::copy(
            &mut BufReader::new(file).take(size.saturating_add(1)),
            &mut hasher,
        )
        .map_err(|e| OciError::io("reading a cached blob", &path, e))?;
        if read == size && hex_digest(hasher) == digest {
            return Ok(true);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(OciError::io("removing a damaged cached blob", &path, e)),
        }
    }

    /// Stores a small document (config, manifest) as a blob; returns its digest.
    fn store_document(&self, bytes: &[u8]) -> Result<String, OciError> {
        let digest = hex_digest(Sha256::new_with_prefix(bytes));
        let path = self.blob_path(&digest)?;
        if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
            return Ok(digest);
        }
        let temp = self.temp_file();
        write_synced(&temp.path, bytes)?;
        temp.persist(&path)?;
        Ok(digest)
    }

    /// Makes the renames into `blobs/sha256` durable before the index points at them.
    fn sync_blobs(&self) -> Result<(), OciError> {
        let dir = self.dir.join("blobs/sha256");
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| OciError::io("syncing the blob cache", &dir, e))
    }

    /// Lists the manifest in `index.json` under `ref_name` (replacing what that name
    /// pointed to) and resolves it from there. The lock is the one registry pulls into
    /// the same cache take, so that no concurrent writer loses an entry.
    fn record_and_resolve(
        &self,
        ref_name: &str,
        digest: &str,
        size: u64,
    ) -> Result<ResolvedImage, OciError> {
        let lock_path = self.dir.join("index.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| OciError::io("opening", &lock_path, e))?;
        let _lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, errno)| OciError::io("locking", &lock_path, errno.into()))?;
        let path = self.dir.join("index.json");
        let mut index: serde_json::Value = match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map_err(|e| OciError::InvalidLayout(format!("index.json: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(OciError::io("reading", &path, e)),
        };
        let mut manifests: Vec<serde_json::Value> = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        manifests.retain(|m| {
            m.get("annotations")
                .and_then(|a| a.get(REF_NAME))
                .and_then(|v| v.as_str())
                != Some(ref_name)
        });
        manifests.push(serde_json::json!({
            "mediaType": MEDIA_MANIFEST,
            "digest": digest,
            "size": size,
            "annotations": { REF_NAME: ref_name },
        }));
        index["schemaVersion"] = 2.into();
        index["manifests"] = manifests.into();
        let bytes = serde_json::to_vec_pretty(&index)
            .map_err(|e| OciError::InvalidLayout(format!("index.json: {e}")))?;
        let temp = self.temp_file();
        write_synced(&temp.path, &bytes)?;
        temp.persist(&path)?;
        OciLayout::open(&self.dir)?.resolve(Some(ref_name), &Platform::linux_amd64())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), OciError> {
    let mut file =
        File::create(path).map_err(|e| OciError::io("creating a file in the cache", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| OciError::io("writing a file in the cache", path, e))
}

/// A file being written in the cache's `tmp/`, removed unless renamed into place.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn persist(mut self, to: &Path) -> Result<(), OciError> {
        std::fs::rename(&self.path, to)
            .map_err(|e| OciError::io("moving a verified blob into the cache", to, e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_are_normalized_or_refused() {
        assert_eq!(normalize("./a//b/").ok().as_deref(), Some("a/b"));
        assert_eq!(
            normalize("blobs/sha256/x").ok().as_deref(),
            Some("blobs/sha256/x")
        );
        for bad in ["../x", "a/../b", "/etc/passwd", "", ".", "a\0b"] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn links_stay_inside_the_archive() {
        assert_eq!(
            join_link("abc", "../def.tar").ok().as_deref(),
            Some("def.tar")
        );
        assert_eq!(join_link("", "a/./b").ok().as_deref(), Some("a/b"));
        for (dir, target) in [
            ("abc", "../../x"),
            ("", "/etc/passwd"),
            ("", ".."),
            ("a", ".."),
        ] {
            assert!(join_link(dir, target).is_err(), "{dir:?} {target:?}");
        }
    }

    #[test]
    fn digests_come_only_from_digest_shaped_names() {
        let hex = "ab".repeat(32);
        let want = Some(format!("sha256:{hex}"));
        assert_eq!(digest_in_name(&format!("{hex}.json")), want);
        assert_eq!(digest_in_name(&format!("{hex}.tar")), want);
        assert_eq!(digest_in_name(&format!("blobs/sha256/{hex}")), want);
        assert_eq!(digest_in_name(&format!("{hex}/layer.tar")), None);
        assert_eq!(digest_in_name(&hex), None);
        assert_eq!(digest_in_name(&format!("{}.json", "AB".repeat(32))), None);
    }

    #[test]
    fn hashing_sees_through_compression() {
        let tar = b"not really a tar, but bytes".repeat(100);
        let plain_digest = hex_digest(Sha256::new_with_prefix(&tar));
        let plain = hash_layer(&tar[..], None, 1 << 20)
            .ok()
            .map(|d| (d.digest, d.diff_id));
        assert_eq!(plain, Some((plain_digest.clone(), plain_digest.clone())));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(&tar);
        let gz = gz.finish().unwrap_or_default();
        let digests = hash_layer(&gz[..], None, 1 << 20);
        assert!(matches!(&digests, Ok(d) if d.diff_id == plain_digest
            && d.compression == Compression::Gzip
            && d.digest == hex_digest(Sha256::new_with_prefix(&gz))));

        let zst = zstd::encode_all(&tar[..], 3).unwrap_or_default();
        let mut copy = Vec::new();
        let digests = hash_layer(&zst[..], Some(&mut copy), 1 << 20);
        assert!(matches!(&digests, Ok(d) if d.diff_id == plain_digest
            && d.compression == Compression::Zstd));
        assert_eq!(copy, zst, "the writer gets the bytes as stored");

        assert!(matches!(
            hash_layer(&gz[..], None, 100),
            Err(Failure::TooLarge)
        ));
        assert!(matches!(
            hash_layer(&gz[..gz.len() / 2], None, 1 << 20),
            Err(Failure::Decode(Compression::Gzip, _))
        ));
    }
}
