//! Layer compression: media types, magic sniffing, and decompression with size caps.
//!
//! The stream budgets live here, on the decompressed stream, because a few kilobytes of
//! zstd can expand to terabytes before a single tar header looks suspicious. They are
//! absolute (decompressed bytes of all the image's layers, and time), never a
//! compression ratio: a ratio says how well data compresses, not what it costs, and
//! legal layers holding large zero-filled files compress a thousandfold.
//!
//! Reading, hashing and decompressing a blob run on a thread of their own, a few chunks
//! ahead of the tar reader: decompression is the largest CPU cost of applying a layer,
//! and this way it overlaps with the file system work of applying entries instead of
//! adding to it. The thread never runs more than [`PIPELINE_CHUNKS`] chunks ahead, so the
//! caps bound it too.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

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

/// Which budget stopped a capped stream (shared between the stream and the code that
/// reads it, which turns the stream's `io::Error` back into the budget it was).
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    pub hit: Cell<Option<(LimitKind, u64, u64)>>,
}

pub(crate) type LimitHit = Rc<StreamState>;

/// Budgets of one decompressed layer stream, in terms of the whole image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamCaps {
    /// Decompressed bytes of the layers before this one.
    pub base: u64,
    /// Decompressed bytes of all layers together.
    pub max_total: u64,
    /// When the conversion started, and how long it may take.
    pub started: Instant,
    pub max_duration: Duration,
}

/// Decompressed bytes per chunk handed from the decompression thread to the reader.
const PIPELINE_CHUNK: usize = 1 << 20;
/// Chunks the decompression thread may run ahead of the reader.
const PIPELINE_CHUNKS: usize = 4;
/// Compressed bytes read from the blob at a time.
const BLOB_BUFFER: usize = 256 << 10;

/// The reading end of the decompression thread: chunks in order, then the end (an empty
/// chunk) or the error that stopped the thread.
struct Pipelined {
    chunks: Option<mpsc::Receiver<io::Result<Vec<u8>>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
    thread: Option<thread::JoinHandle<()>>,
}

impl Pipelined {
    fn spawn(mut inner: Box<dyn Read + Send>) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(PIPELINE_CHUNKS);
        let thread = thread::Builder::new()
            .name("layer-decompress".to_owned())
            .spawn(move || loop {
                let mut chunk = vec![0; PIPELINE_CHUNK];
                let mut filled = 0;
                // Full chunks: fewer hand-overs, and the reader copies out of one buffer.
                let result = loop {
                    match inner.read(&mut chunk[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == chunk.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                chunk.truncate(filled);
                let last = filled == 0;
                let message = match result {
                    Ok(()) => Ok(chunk),
                    Err(e) => {
                        // Data read before the error first, so the reader sees it in order.
                        if filled > 0 && tx.send(Ok(chunk)).is_err() {
                            return;
                        }
                        Err(e)
                    }
                };
                let stop = last || message.is_err();
                // A closed channel means the reader gave up: stop reading the blob.
                if tx.send(message).is_err() || stop {
                    return;
                }
            })?;
        Ok(Self {
            chunks: Some(rx),
            current: Vec::new(),
            pos: 0,
            done: false,
            thread: Some(thread),
        })
    }
}

impl Read for Pipelined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            let next = match &self.chunks {
                Some(rx) => rx.recv(),
                None => return Ok(0),
            };
            match next {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = true,
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(mpsc::RecvError) => {
                    self.done = true;
                    return Err(io::Error::other("the decompression thread died"));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        // Closing the channel stops the thread at its next chunk; joining it means the
        // blob is no longer read once the layer is over (so a digest verdict the thread
        // recorded is visible to the caller, and the file is closed).
        self.chunks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The decompressed stream, failing once it passes a budget.
pub(crate) struct Capped {
    inner: Box<dyn Read>,
    out: u64,
    caps: StreamCaps,
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
            return Err(io::Error::other("layer stream budget exceeded"));
        }
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let total = self.caps.base.saturating_add(self.out);
        let elapsed = self.caps.started.elapsed();
        let exceeded = if total > self.caps.max_total {
            Some((LimitKind::StreamSize, total, self.caps.max_total))
        } else if elapsed > self.caps.max_duration {
            Some((
                LimitKind::Duration,
                millis(elapsed),
                millis(self.caps.max_duration),
            ))
        } else {
            None
        };
        if let Some(hit) = exceeded {
            self.hit.hit.set(Some(hit));
            return Err(io::Error::other("layer stream budget exceeded"));
        }
        Ok(n)
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A blob decompressed as `compression` says (sniffed for [`Compression::Auto`]).
pub(crate) struct Decompressed {
    pub(crate) reader: Box<dyn Read + Send>,
}

/// Opens the decoder of a blob: the one place that picks it, for the layer applier's
/// capped stream and the diff_id reader alike.
pub(crate) fn decompress<R: Read + Send + 'static>(
    blob: R,
    compression: Compression,
) -> io::Result<Decompressed> {
    let mut buffered = BufReader::with_capacity(BLOB_BUFFER, blob);
    let compression = match compression {
        Compression::Auto => Compression::sniff(buffered.fill_buf()?),
        other => other,
    };
    let reader: Box<dyn Read + Send> = match compression {
        Compression::Auto | Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
    };
    Ok(Decompressed { reader })
}

/// Reads `reader` on a thread of its own, a few chunks ahead of the caller: for a blob
/// that is hashed as it is read (its digest check), so that hashing runs beside the
/// decompression (and the diff_id hash) instead of in turn with them.
pub(crate) fn read_ahead<R: Read + Send + 'static>(reader: R) -> io::Result<impl Read + Send> {
    Pipelined::spawn(Box::new(reader))
}

/// Wraps a blob in the right decoder (on its own thread) and the caps.
pub(crate) fn decoder<R: Read + Send + 'static>(
    blob: R,
    compression: Compression,
    caps: StreamCaps,
    hit: LimitHit,
) -> io::Result<Capped> {
    let decoded = decompress(blob, compression)?;
    let inner = Box::new(Pipelined::spawn(decoded.reader)?);
    Ok(Capped {
        inner,
        out: 0,
        caps,
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
