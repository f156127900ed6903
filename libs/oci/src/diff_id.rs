//! Layer diff_ids: the digest of a layer's uncompressed tar, which the image config lists
//! per layer in `rootfs.diff_ids`.
//!
//! The blob digest only says the bytes are the ones the manifest names; the diff_id is
//! what the config (and so the image's identity, its chain ids) claims those bytes
//! decompress to. [`DiffIdReader`] decompresses a layer blob and hashes the tar on the
//! way to the [`LayerApplier`](crate::LayerApplier), in the same pass that applies it,
//! and fails at the end of the stream when the digest is not the expected one.
//!
//! Decompressing here rather than in the applier is what lets the tar be hashed without
//! a change to layer application: the applier gets a plain tar
//! ([`Compression::None`]), and its decompression thread runs this reader, so the
//! decompression and the hashing still overlap with applying entries.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::compression::{decompress, Compression};
use crate::error::OciError;
use crate::image::{record, Verdict};

/// Which layer a stream is and the diff_id the config gives it.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    /// The layer's position in the manifest.
    pub index: usize,
    /// The layer blob's digest.
    pub digest: String,
    /// `sha256:<hex>` from the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

/// A layer blob, decompressed, hashed as it is read; at its end it fails with an error
/// (recorded in its verdict as [`OciError::DiffIdMismatch`]) unless the tar's digest is
/// the expected diff_id.
pub(crate) struct DiffIdReader {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    expected: Expected,
    verdict: Verdict,
    done: bool,
}

impl DiffIdReader {
    /// Wraps `blob` (compressed as `compression` says, or sniffed for
    /// [`Compression::Auto`]). It has no budgets of its own: the layer applier that
    /// reads it holds the stream to the image's.
    pub fn new<R: Read + Send + 'static>(
        blob: R,
        compression: Compression,
        expected: Expected,
    ) -> Result<Self, OciError> {
        let decoded = decompress(blob, compression).map_err(|source| OciError::Corrupt {
            after: String::new(),
            source,
        })?;
        Ok(Self {
            inner: decoded.reader,
            hasher: Sha256::new(),
            expected,
            verdict: Verdict::default(),
            done: false,
        })
    }

    /// Where a mismatch is recorded (the `io::Error` the stream returns reaches the
    /// caller only as the applier's "corrupt layer").
    pub fn verdict(&self) -> Verdict {
        self.verdict.clone()
    }

    fn fail(&self, err: OciError) -> io::Error {
        record(&self.verdict, err)
    }
}

impl Read for DiffIdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        self.done = true;
        let actual = sha256_digest(std::mem::take(&mut self.hasher));
        if actual != self.expected.diff_id {
            return Err(self.fail(OciError::DiffIdMismatch {
                index: self.expected.index,
                digest: self.expected.digest.clone(),
                expected: self.expected.diff_id.clone(),
                actual,
            }));
        }
        Ok(0)
    }
}

/// `sha256:<hex>` of what `hasher` saw (docker archives are checked with it too).
pub(crate) fn sha256_digest(hasher: Sha256) -> String {
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(data: &[u8]) -> Expected {
        Expected {
            index: 3,
            digest: "sha256:blob".to_owned(),
            diff_id: sha256_digest(Sha256::new_with_prefix(data)),
        }
    }

    #[test]
    fn the_right_tar_passes_and_a_wrong_one_fails_at_its_end_naming_the_layer() {
        let tar = b"not really a tar, but bytes all the same".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        for (blob, compression) in [
            (tar.clone(), Compression::None),
            (gz.clone(), Compression::Gzip),
            (gz, Compression::Auto),
        ] {
            let mut ok =
                DiffIdReader::new(io::Cursor::new(blob.clone()), compression, expected(&tar))
                    .unwrap();
            let mut out = Vec::new();
            ok.read_to_end(&mut out).unwrap();
            assert_eq!(out, tar);
            assert!(ok.verdict().lock().unwrap().is_none());

            let mut bad =
                DiffIdReader::new(io::Cursor::new(blob), compression, expected(b"other")).unwrap();
            assert!(bad.read_to_end(&mut Vec::new()).is_err());
            let err = bad.verdict().lock().unwrap().take().unwrap();
            assert!(
                matches!(&err, OciError::DiffIdMismatch { index: 3, digest, .. } if digest == "sha256:blob"),
                "{err}"
            );
        }
    }
}
