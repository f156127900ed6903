//! Layer compression: media types, magic sniffing, and decompression with size caps.
//!
//! The caps live here, on the decompressed stream, because a few kilobytes of zstd can
//! expand to terabytes before a single tar header looks suspicious.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use crate::error::{LimitKind, OciError};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Decide from the first bytes of the blob (gzip and zstd magic, else plain tar).
    Auto,
    /// A plain tar archive.
    None,
    /// gzip (one or more members).
    Gzip,
    /// Zstandard.
    Zstd,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

impl Compression {
    /// The compression a layer media type declares.
    ///
    /// Docker's layer types say gzip but registries hold uncompressed ones too, so those
    /// are sniffed ([`Compression::Auto`]).
    pub fn from_media_type(media_type: &str) -> Result<Self, OciError> {
        Ok(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Self::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => Self::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Self::Zstd,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar" => Self::Auto,
            other => return Err(OciError::UnsupportedMediaType(other.to_owned())),
        })
    }

    /// The compression the first bytes of a blob show.
    pub fn sniff(prefix: &[u8]) -> Self {
        if prefix.starts_with(&GZIP_MAGIC) {
            Self::Gzip
        } else if prefix.starts_with(&ZSTD_MAGIC) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// How a capped stream is doing, shared between the stream and the code that reads it.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    /// The cap that stopped the stream.
    pub hit: Cell<Option<(LimitKind, u64, u64)>>,
    /// The decompressor reached the clean end of its input.
    pub clean_eof: Cell<bool>,
    /// The reader is copying an entry's file data (everything else is tar metadata:
    /// headers, PAX records, GNU long names, padding), which the tar crate buffers whole.
    pub in_data: Cell<bool>,
    /// Metadata bytes read since the last entry was handed out.
    pub meta_run: Cell<u64>,
}

pub(crate) type LimitHit = Rc<StreamState>;

/// Caps on one decompressed layer stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamCaps {
    pub max_bytes: u64,
    pub max_ratio: u64,
    /// Below this many decompressed bytes the ratio is not checked (tiny layers of
    /// zeros compress absurdly well and are harmless).
    pub ratio_floor: u64,
    /// Metadata bytes allowed between two entries.
    pub max_meta: u64,
}

/// Counts the compressed bytes read from the blob.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// The decompressed stream, failing once it passes a cap.
pub(crate) struct Capped {
    inner: Box<dyn Read>,
    compressed: Rc<Cell<u64>>,
    out: u64,
    caps: StreamCaps,
    compressed_input: bool,
    hit: LimitHit,
}

impl Capped {
    /// Decompressed bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.out
    }
}

impl Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.hit.hit.get().is_some() {
            return Err(io::Error::other("layer stream limit exceeded"));
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit.clean_eof.set(true);
        }
        self.out += n as u64;
        if !self.hit.in_data.get() {
            self.hit.meta_run.set(self.hit.meta_run.get() + n as u64);
        }
        let meta_run = self.hit.meta_run.get();
        let exceeded = if self.out > self.caps.max_bytes {
            Some((LimitKind::LayerSize, self.out, self.caps.max_bytes))
        } else if meta_run > self.caps.max_meta {
            Some((LimitKind::HeaderSize, meta_run, self.caps.max_meta))
        } else if self.compressed_input && self.out > self.caps.ratio_floor {
            let ratio = self.out / self.compressed.get().max(1);
            (ratio > self.caps.max_ratio).then_some((
                LimitKind::CompressionRatio,
                ratio,
                self.caps.max_ratio,
            ))
        } else {
            None
        };
        if let Some(hit) = exceeded {
            self.hit.hit.set(Some(hit));
            return Err(io::Error::other("layer stream limit exceeded"));
        }
        Ok(n)
    }
}

/// Wraps a blob in the right decoder and the caps.
pub(crate) fn decoder<R: Read + 'static>(
    blob: R,
    compression: Compression,
    caps: StreamCaps,
    hit: LimitHit,
) -> io::Result<Capped> {
    let compressed = Rc::new(Cell::new(0));
    let mut buffered = BufReader::new(Counted {
        inner: blob,
        count: compressed.clone(),
    });
    let compression = match compression {
        Compression::Auto => Compression::sniff(buffered.fill_buf()?),
        other => other,
    };
    let inner: Box<dyn Read> = match compression {
        Compression::Auto | Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
    };
    Ok(Capped {
        inner,
        compressed,
        out: 0,
        caps,
        compressed_input: !matches!(compression, Compression::Auto | Compression::None),
        hit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        assert_eq!(
            Compression::from_media_type(gz).ok(),
            Some(Compression::Gzip)
        );
        let zst = "application/vnd.oci.image.layer.v1.tar+zstd";
        assert_eq!(
            Compression::from_media_type(zst).ok(),
            Some(Compression::Zstd)
        );
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(
            Compression::from_media_type(docker).ok(),
            Some(Compression::Auto)
        );
        let err = Compression::from_media_type("application/x-squashfs");
        assert!(matches!(err, Err(OciError::UnsupportedMediaType(t)) if t.contains("squashfs")));
    }

    #[test]
    fn sniffing() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(&ZSTD_MAGIC), Compression::Zstd);
        assert_eq!(Compression::sniff(b"etc/"), Compression::None);
        assert_eq!(Compression::sniff(b""), Compression::None);
    }
}
