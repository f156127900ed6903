//! A streaming reader of layer tar archives: ustar, GNU and PAX, with sparse files.
//!
//! Layers are untrusted, so this reader is written for them rather than borrowed: every
//! byte of metadata it holds (headers, PAX records, GNU long names, sparse maps) counts
//! against one per-entry budget before it is buffered; names and link targets are bytes,
//! never text (Linux names are bytes, and tar carries them in all three formats, PAX with
//! `hdrcharset=BINARY` included); and a sparse file comes out as its map of data segments
//! plus the stored bytes, so an entry that announces a terabyte of holes costs nothing to
//! read. The sparse formats are GNU's old one (type `S`, map in the header and extension
//! blocks) and the three PAX ones GNU tar writes (0.0 and 0.1, map in PAX records; 1.0,
//! map at the start of the data), as Go's `archive/tar` reads them.
//!
//! A stream that ends cleanly at an entry boundary, without the two zero blocks that
//! should close it, is accepted as ended: umoci 0.4.7 writes such layers, and Go's reader
//! (which containerd and umoci use) accepts them. A truncated compressed stream still
//! fails in its decoder, and a stream that ends inside an entry fails here.

use std::io::{self, Read};

use crate::error::{LimitKind, OciError};

const BLOCK: usize = 512;
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Decimal digits of the longest number a sparse map line may hold (u64).
const MAX_DIGITS: usize = 20;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Hardlink,
    Symlink,
    Char,
    Block,
    Directory,
    Fifo,
}

/// The data segments of a sparse file: `(offset, length)` in the file, in order and not
/// overlapping; everything else is a hole. Their lengths add up to the stored data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sparse {
    /// The file's apparent size.
    pub real_size: u64,
    pub segments: Vec<(u64, u64)>,
}

/// One entry's header, every extension applied.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub kind: Kind,
    /// The path as the archive writes it (bytes).
    pub path: Vec<u8>,
    /// The target of a link (bytes); empty for other kinds.
    pub link: Vec<u8>,
    /// Stored data bytes that follow the header (a sparse map at their start excluded).
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes from `SCHILY.xattr.*` PAX records, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub sparse: Option<Sparse>,
}

impl Header {
    /// The entry's name for messages (lossy: never used to touch a file).
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// The file's apparent size (holes included).
    pub fn apparent_size(&self) -> u64 {
        self.sparse.as_ref().map_or(self.size, |s| s.real_size)
    }
}

/// Per-entry metadata budget and the name of the last entry, for errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReaderLimits {
    /// Bytes of metadata (header blocks, PAX records, long names, sparse maps) one entry
    /// may bring.
    pub max_header_bytes: u64,
}

/// Reads entries from a tar stream.
pub(crate) struct TarReader<R> {
    inner: R,
    limits: ReaderLimits,
    /// Stored bytes of the current entry not read yet.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// The previous entry's name, for errors.
    last: String,
    done: bool,
}

/// One PAX record: key and value, both bytes.
type Record = (Vec<u8>, Vec<u8>);

/// Extensions collected from the headers before an entry.
#[derive(Debug, Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Vec<Record>,
    /// Metadata bytes read so far for this entry.
    meta: u64,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: ReaderLimits) -> Self {
        Self {
            inner,
            limits,
            remaining: 0,
            padding: 0,
            last: String::new(),
            done: false,
        }
    }

    /// The name of the last entry handed out ("" before the first).
    pub fn last(&self) -> &str {
        &self.last
    }

    /// The stream, for reading what follows the end of the archive.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry, or `None` at the end of the archive. Data the caller did not read
    /// of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Header>, OciError> {
        if self.done {
            return Ok(None);
        }
        if !self.skip_rest()? {
            self.done = true;
            return Ok(None);
        }
        let mut pending = Pending::default();
        loop {
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block, true)? {
                self.done = true;
                return Ok(None);
            }
            self.count_meta(&mut pending, BLOCK as u64)?;
            if block.iter().all(|b| *b == 0) {
                // End of archive: a second zero block should follow; whatever does is
                // drained by the caller (for the digest) and never interpreted.
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block).map_err(|reason| self.bad_header(reason))?;
            let flag = block[156];
            let size = self.number(&block[124..136], "size")?;
            match flag {
                b'x' => {
                    let data = self.read_meta_data(size, &mut pending)?;
                    pending.pax = parse_pax(&data).map_err(|r| self.bad_header(r))?;
                }
                b'g' => {
                    // Global records describe the archive, not its files: Go's reader,
                    // umoci and containerd apply none of them either.
                    self.read_meta_data(size, &mut pending)?;
                }
                b'L' => {
                    let data = self.read_meta_data(size, &mut pending)?;
                    pending.long_name = Some(until_nul(&data).to_vec());
                }
                b'K' => {
                    let data = self.read_meta_data(size, &mut pending)?;
                    pending.long_link = Some(until_nul(&data).to_vec());
                }
                b'V' => {
                    // A GNU volume label names the archive, not a file.
                    self.skip_data(size)?;
                }
                _ => return self.entry(&block, flag, size, pending).map(Some),
            }
        }
    }

    /// Reads the current entry's stored data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer ends inside the entry's data",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    fn entry(
        &mut self,
        block: &[u8; BLOCK],
        flag: u8,
        size: u64,
        pending: Pending,
    ) -> Result<Header, OciError> {
        let gnu = &block[257..265] == b"ustar  \0";
        let ustar = &block[257..263] == b"ustar\0";
        let mut path = match pending.long_name {
            Some(name) => name,
            None if ustar && block[345] != 0 => {
                let mut p = until_nul(&block[345..500]).to_vec();
                p.push(b'/');
                p.extend_from_slice(until_nul(&block[0..100]));
                p
            }
            None => until_nul(&block[0..100]).to_vec(),
        };
        let mut link = pending
            .long_link
            .unwrap_or_else(|| until_nul(&block[157..257]).to_vec());
        let mut kind = match flag {
            b'0' | b'\0' | b'7' | b'S' => Kind::Regular,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            // GNU dumpdir: a directory whose data lists its contents (skipped).
            b'5' | b'D' => Kind::Directory,
            b'6' => Kind::Fifo,
            other => {
                return Err(OciError::UnsupportedEntry {
                    entry: String::from_utf8_lossy(&path).into_owned(),
                    kind: other,
                })
            }
        };
        // Pre-POSIX archives mark directories by a trailing slash only.
        if flag == b'\0' && path.ends_with(b"/") {
            kind = Kind::Directory;
        }
        let mut header = Header {
            kind,
            path: Vec::new(),
            link: Vec::new(),
            size,
            mode: (self.number(&block[100..108], "mode")? & 0o7777) as u32,
            uid: self.number(&block[108..116], "uid")?,
            gid: self.number(&block[116..124], "gid")?,
            mtime: (self.signed(&block[136..148], "mtime")?, 0),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            sparse: None,
        };
        if matches!(kind, Kind::Char | Kind::Block) {
            header.dev_major = self.device(&block[329..337], "device major")?;
            header.dev_minor = self.device(&block[337..345], "device minor")?;
        }
        let records = effective_records(&pending.pax);
        // Name first, so that every later error names the entry.
        if let Some((_, v)) = records.iter().rev().find(|(k, _)| k == b"path") {
            path = v.clone();
        }
        if let Some((_, v)) = records.iter().find(|(k, _)| k == b"GNU.sparse.name") {
            path = v.clone();
        }
        self.last = String::from_utf8_lossy(&path).into_owned();
        header.path = path;
        let mut pax_sparse = PaxSparse::default();
        for (key, value) in records {
            if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                header.xattrs.push((name.to_vec(), value.clone()));
                continue;
            }
            let text = || {
                std::str::from_utf8(value).map_err(|_| {
                    self.bad_header(match key.as_slice() {
                        b"uid" => "PAX uid",
                        b"gid" => "PAX gid",
                        b"mtime" => "PAX mtime",
                        b"size" => "PAX size",
                        _ => "PAX sparse record",
                    })
                })
            };
            let num = |what: &'static str| -> Result<u64, OciError> {
                text()?.parse().map_err(|_| self.bad_header(what))
            };
            match key.as_slice() {
                b"linkpath" => link = value.clone(),
                b"uid" => header.uid = num("PAX uid")?,
                b"gid" => header.gid = num("PAX gid")?,
                b"size" => header.size = num("PAX size")?,
                b"mtime" => {
                    header.mtime =
                        parse_pax_time(text()?).ok_or_else(|| self.bad_header("PAX mtime"))?
                }
                b"GNU.sparse.major" => pax_sparse.major = Some(num("GNU.sparse.major")?),
                b"GNU.sparse.minor" => pax_sparse.minor = Some(num("GNU.sparse.minor")?),
                b"GNU.sparse.size" | b"GNU.sparse.realsize" => {
                    pax_sparse.real_size = Some(num("GNU.sparse.size")?)
                }
                b"GNU.sparse.map" => {
                    pax_sparse.map = Some(parse_map_list(text()?).ok_or_else(|| {
                        self.bad_header("GNU.sparse.map is not a list of numbers")
                    })?)
                }
                b"GNU.sparse.offset" => pax_sparse.offsets.push(num("GNU.sparse.offset")?),
                b"GNU.sparse.numbytes" => pax_sparse.lengths.push(num("GNU.sparse.numbytes")?),
                // hdrcharset, atime, ctime, uname, gname and the rest change nothing
                // NanoBox keeps: names are bytes whatever the charset says.
                _ => {}
            }
        }
        header.link = if matches!(kind, Kind::Hardlink | Kind::Symlink) {
            link
        } else {
            Vec::new()
        };
        if kind != Kind::Regular && flag != b'D' {
            // Header-only types: no data follows, whatever the size field says (some
            // writers put a hardlink target's size there). POSIX says so, and Go's
            // reader, which umoci and containerd use, reads them that way.
            self.remaining = 0;
            self.padding = 0;
            header.size = 0;
            return Ok(header);
        }
        self.remaining = header.size;
        self.padding = padding(header.size);
        let mut meta = pending.meta;
        if flag == b'S' {
            header.sparse = Some(self.gnu_sparse(block, gnu, &mut meta)?);
        } else if pax_sparse.major == Some(1) && pax_sparse.minor == Some(0) {
            let real_size = pax_sparse
                .real_size
                .ok_or_else(|| self.bad_header("PAX sparse 1.0 without GNU.sparse.realsize"))?;
            let segments = self.map_in_data(&mut meta)?;
            header.size = self.remaining;
            header.sparse = Some(Sparse {
                real_size,
                segments,
            });
        } else if pax_sparse.map.is_some() || !pax_sparse.offsets.is_empty() {
            let real_size = pax_sparse
                .real_size
                .ok_or_else(|| self.bad_header("PAX sparse without GNU.sparse.size"))?;
            let segments = match pax_sparse.map {
                Some(map) => map,
                None => {
                    if pax_sparse.offsets.len() != pax_sparse.lengths.len() {
                        return Err(self.bad_header(
                            "GNU.sparse.offset and GNU.sparse.numbytes records do not pair up",
                        ));
                    }
                    pax_sparse
                        .offsets
                        .iter()
                        .copied()
                        .zip(pax_sparse.lengths.iter().copied())
                        .collect()
                }
            };
            header.sparse = Some(Sparse {
                real_size,
                segments,
            });
        }
        if let Some(sparse) = &header.sparse {
            if kind != Kind::Regular {
                return Err(self.bad_header("sparse map on an entry that is not a file"));
            }
            validate_sparse(sparse, header.size).map_err(|r| self.bad_header(r))?;
        }
        if kind == Kind::Directory {
            // A GNU dumpdir's listing is not applied.
            let rest = self.remaining;
            self.remaining = 0;
            self.padding = 0;
            self.skip_data(rest)?;
            self.skip_data(padding(rest))?;
            header.size = 0;
        }
        Ok(header)
    }

    /// The map of an old-GNU sparse entry: four slots in the header, 21 in each extension
    /// block that follows while the "extended" flag is set.
    fn gnu_sparse(
        &mut self,
        block: &[u8; BLOCK],
        gnu: bool,
        meta: &mut u64,
    ) -> Result<Sparse, OciError> {
        if !gnu {
            return Err(self.bad_header("sparse entry without a GNU header"));
        }
        let real_size = self.number(&block[483..495], "sparse real size")?;
        let mut segments = Vec::new();
        self.sparse_slots(&block[386..482], &mut segments)?;
        let mut extended = block[482] != 0;
        while extended {
            let mut ext = [0u8; BLOCK];
            if !self.read_block(&mut ext, false)? {
                return Err(self.truncated());
            }
            *meta += BLOCK as u64;
            if *meta > self.limits.max_header_bytes {
                return Err(self.meta_limit(*meta));
            }
            self.sparse_slots(&ext[..504], &mut segments)?;
            extended = ext[504] != 0;
        }
        Ok(Sparse {
            real_size,
            segments,
        })
    }

    fn sparse_slots(&self, slots: &[u8], out: &mut Vec<(u64, u64)>) -> Result<(), OciError> {
        for slot in slots.chunks_exact(24) {
            if slot[0] == 0 {
                break;
            }
            let offset = self.number(&slot[..12], "sparse offset")?;
            let length = self.number(&slot[12..], "sparse length")?;
            out.push((offset, length));
        }
        Ok(())
    }

    /// PAX sparse 1.0: the map is at the start of the data, as decimal lines (the count,
    /// then offset and length pairs), padded to a block.
    fn map_in_data(&mut self, meta: &mut u64) -> Result<Vec<(u64, u64)>, OciError> {
        let mut consumed = 0u64;
        let count = self.map_number(&mut consumed, meta)?;
        let mut segments = Vec::new();
        for _ in 0..count {
            let offset = self.map_number(&mut consumed, meta)?;
            let length = self.map_number(&mut consumed, meta)?;
            segments.push((offset, length));
        }
        let pad = padding(consumed);
        if pad > self.remaining {
            return Err(self.bad_header("PAX sparse map longer than the entry"));
        }
        let mut skip = [0u8; BLOCK];
        let pad = pad as usize;
        self.read_exact_data(&mut skip[..pad])?;
        Ok(segments)
    }

    fn map_number(&mut self, consumed: &mut u64, meta: &mut u64) -> Result<u64, OciError> {
        let mut digits = Vec::with_capacity(MAX_DIGITS);
        loop {
            let mut byte = [0u8; 1];
            self.read_exact_data(&mut byte)?;
            *consumed += 1;
            *meta += 1;
            if *meta > self.limits.max_header_bytes {
                return Err(self.meta_limit(*meta));
            }
            match byte[0] {
                b'\n' => break,
                d @ b'0'..=b'9' if digits.len() < MAX_DIGITS => digits.push(d),
                _ => return Err(self.bad_header("PAX sparse map is not decimal lines")),
            }
        }
        std::str::from_utf8(&digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.bad_header("PAX sparse map is not decimal lines"))
    }

    fn read_exact_data(&mut self, buf: &mut [u8]) -> Result<(), OciError> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.remaining == 0 {
                return Err(self.bad_header("PAX sparse map longer than the entry"));
            }
            let n = self
                .read_data(&mut buf[filled..])
                .map_err(|e| self.corrupt(e))?;
            filled += n;
        }
        Ok(())
    }

    /// Reads one block; `false` at a clean end of the stream when `eof_ok`.
    fn read_block(&mut self, block: &mut [u8; BLOCK], eof_ok: bool) -> Result<bool, OciError> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 && eof_ok => return Ok(false),
                Ok(0) => return Err(self.truncated()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.corrupt(e)),
            }
        }
        Ok(true)
    }

    /// Reads the data of a metadata entry (PAX records, long names), within the budget.
    fn read_meta_data(&mut self, size: u64, pending: &mut Pending) -> Result<Vec<u8>, OciError> {
        let padded = size.saturating_add(padding(size));
        self.count_meta(pending, padded)?;
        let len = usize::try_from(size).map_err(|_| self.meta_limit(size))?;
        let mut data = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match self.inner.read(&mut data[filled..]) {
                Ok(0) => return Err(self.truncated()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.corrupt(e)),
            }
        }
        self.skip_data(padding(size))?;
        Ok(data)
    }

    fn count_meta(&self, pending: &mut Pending, bytes: u64) -> Result<(), OciError> {
        pending.meta = pending.meta.saturating_add(bytes);
        if pending.meta > self.limits.max_header_bytes {
            return Err(self.meta_limit(pending.meta));
        }
        Ok(())
    }

    /// Skips the rest of the current entry (data and padding). Returns false when the
    /// stream ended cleanly inside the padding: umoci 0.4.7 ends its layers right after
    /// the last entry's data, and that is the end of the archive.
    fn skip_rest(&mut self) -> Result<bool, OciError> {
        let (data, mut pad) = (self.remaining, self.padding);
        self.remaining = 0;
        self.padding = 0;
        self.skip_data(data)?;
        let mut buf = [0u8; BLOCK];
        while pad > 0 {
            let want = buf.len().min(pad as usize);
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => pad -= n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.corrupt(e)),
            }
        }
        Ok(true)
    }

    fn skip_data(&mut self, mut bytes: u64) -> Result<(), OciError> {
        let mut buf = [0u8; 8192];
        while bytes > 0 {
            let want = buf.len().min(usize::try_from(bytes).unwrap_or(usize::MAX));
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(self.truncated()),
                Ok(n) => bytes -= n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.corrupt(e)),
            }
        }
        Ok(())
    }

    fn number(&self, field: &[u8], what: &'static str) -> Result<u64, OciError> {
        let value = parse_number(field).ok_or_else(|| self.bad_header(what))?;
        u64::try_from(value).map_err(|_| self.bad_header(what))
    }

    fn signed(&self, field: &[u8], what: &'static str) -> Result<i64, OciError> {
        let value = parse_number(field).ok_or_else(|| self.bad_header(what))?;
        i64::try_from(value).map_err(|_| self.bad_header(what))
    }

    fn device(&self, field: &[u8], what: &'static str) -> Result<u32, OciError> {
        if field.iter().all(|b| *b == 0 || *b == b' ') {
            return Ok(0);
        }
        u32::try_from(self.number(field, what)?).map_err(|_| self.bad_header(what))
    }

    fn bad_header(&self, reason: &str) -> OciError {
        OciError::BadHeader {
            entry: self.last.clone(),
            reason: reason.to_owned(),
        }
    }

    fn truncated(&self) -> OciError {
        self.corrupt(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the layer ends inside a tar header",
        ))
    }

    fn corrupt(&self, source: io::Error) -> OciError {
        OciError::Corrupt {
            after: self.last.clone(),
            source,
        }
    }

    fn meta_limit(&self, value: u64) -> OciError {
        OciError::LimitExceeded {
            entry: self.last.clone(),
            kind: LimitKind::HeaderSize,
            value,
            limit: self.limits.max_header_bytes,
        }
    }
}

/// PAX sparse records of one entry (formats 0.0, 0.1 and 1.0).
#[derive(Debug, Default)]
struct PaxSparse {
    major: Option<u64>,
    minor: Option<u64>,
    real_size: Option<u64>,
    map: Option<Vec<(u64, u64)>>,
    offsets: Vec<u64>,
    lengths: Vec<u64>,
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn until_nul(field: &[u8]) -> &[u8] {
    match field.iter().position(|b| *b == 0) {
        Some(end) => &field[..end],
        None => field,
    }
}

/// The header checksum: the sum of its bytes with the checksum field read as spaces,
/// unsigned (POSIX) or signed (some historic writers).
fn verify_checksum(block: &[u8; BLOCK]) -> Result<(), &'static str> {
    let stored = parse_number(&block[148..156]).ok_or("checksum")?;
    let mut unsigned: i128 = 0;
    let mut signed: i128 = 0;
    for (i, b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += i128::from(b);
        signed += i128::from(b as i8);
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err("header checksum mismatch")
    }
}

/// A numeric field: octal digits between optional spaces and NULs, or GNU's base-256
/// (high bit of the first byte set; 0xff starts a negative number).
fn parse_number(field: &[u8]) -> Option<i128> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => {
            let negative = first == 0xff;
            // Two's complement, big-endian: starting from -1 sign-extends a negative one.
            let mut value: i128 = if negative {
                -1
            } else {
                i128::from(first & 0x7f)
            };
            for &b in &field[1..] {
                value = value.checked_mul(256)?.checked_add(i128::from(b))?;
                if value.unsigned_abs() > u128::from(u64::MAX) {
                    return None;
                }
            }
            Some(value)
        }
        _ => {
            let text = field
                .iter()
                .copied()
                .skip_while(|b| *b == b' ' || *b == 0)
                .take_while(|b| *b != b' ' && *b != 0)
                .collect::<Vec<u8>>();
            if text.is_empty() {
                return Some(0);
            }
            let mut value: i128 = 0;
            for b in text {
                if !(b'0'..=b'7').contains(&b) {
                    return None;
                }
                value = value * 8 + i128::from(b - b'0');
            }
            Some(value)
        }
    }
}

/// PAX records: `<length> <key>=<value>\n`, the length counting the whole record.
fn parse_pax(mut data: &[u8]) -> Result<Vec<Record>, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|b| *b == 0) {
            break;
        }
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("PAX record length");
        }
        let record = &data[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("PAX record without '='")?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// The records that count, in order. POSIX pax: a record with an empty value deletes its
/// keyword (an xattr that is not there; a field back to the header's value), as Go's
/// reader, and so umoci and containerd, read it. One pass from the end, so that a header
/// of a million tiny records costs a million steps, not their square.
fn effective_records(records: &[Record]) -> Vec<&Record> {
    let mut deleted: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut kept: Vec<&Record> = Vec::with_capacity(records.len());
    for record in records.iter().rev() {
        let (key, value) = record;
        if value.is_empty() {
            deleted.insert(key.as_slice());
        } else if !deleted.contains(key.as_slice()) {
            kept.push(record);
        }
    }
    kept.reverse();
    kept
}

/// A PAX time, `seconds[.fraction]`, possibly negative.
fn parse_pax_time(text: &str) -> Option<(i64, u32)> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u32 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    for _ in digits.len()..9 {
        nanos *= 10;
    }
    if text.starts_with('-') && nanos > 0 {
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

/// `GNU.sparse.map`: `offset,length,offset,length,...`.
fn parse_map_list(text: &str) -> Option<Vec<(u64, u64)>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    let numbers: Vec<u64> = text
        .split(',')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    if !numbers.len().is_multiple_of(2) {
        return None;
    }
    Some(numbers.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

/// Segments in order, not overlapping, inside the file, and adding up to the stored
/// data.
fn validate_sparse(sparse: &Sparse, stored: u64) -> Result<(), &'static str> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, length) in &sparse.segments {
        if offset < end {
            return Err("sparse map out of order or overlapping");
        }
        end = offset
            .checked_add(length)
            .ok_or("sparse map past the end of the file")?;
        if end > sparse.real_size {
            return Err("sparse map past the end of the file");
        }
        total = total.checked_add(length).ok_or("sparse map too large")?;
    }
    if total != stored {
        return Err("sparse map does not match the stored data");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"  755 \0"), Some(0o755));
        assert_eq!(parse_number(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_number(b"12a\0"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 1;
        big[10] = 2;
        assert_eq!(parse_number(&big), Some(0x201));
        let neg = [0xffu8; 12];
        assert_eq!(parse_number(&neg), Some(-1));
    }

    #[test]
    fn pax_records() {
        let data = b"30 mtime=1700000000.123456789\n15 path=a\xe9/b\xff\xfe\n";
        let records = parse_pax(data).ok();
        assert_eq!(
            records,
            Some(vec![
                (b"mtime".to_vec(), b"1700000000.123456789".to_vec()),
                (b"path".to_vec(), b"a\xe9/b\xff\xfe".to_vec()),
            ])
        );
        assert!(parse_pax(b"99 path=x\n").is_err());
        // An empty value deletes the keyword's earlier records, not later ones.
        let rec = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
        let all = [
            rec("a", "1"),
            rec("b", "2"),
            rec("a", ""),
            rec("a", "3"),
            rec("c", ""),
        ];
        let kept: Vec<&Record> = effective_records(&all);
        assert_eq!(kept, [&rec("b", "2"), &rec("a", "3")]);
        assert!(parse_pax(b"5 a\n").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert!(parse_pax_time("x").is_none());
    }

    /// A ustar header block for `name` of type `flag` claiming `size` bytes.
    fn block(name: &str, flag: u8, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b[100..107].copy_from_slice(b"0000644");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[136..147].copy_from_slice(b"00000000000");
        b[156] = flag;
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|x| u32::from(*x)).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        b
    }

    #[test]
    fn header_only_types_carry_no_data_whatever_their_size_says() {
        let mut tar = block("link", b'1', 1000);
        tar[157..163].copy_from_slice(b"target");
        let sum: u32 = {
            let mut t = tar.clone();
            t[148..156].copy_from_slice(b"        ");
            t.iter().map(|x| u32::from(*x)).sum()
        };
        tar[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        tar.extend(block("dir/", b'5', 512));
        tar.extend(block("file", b'0', 3));
        tar.extend(b"abc");
        tar.extend(vec![0u8; BLOCK - 3 + 2 * BLOCK]);
        let limits = ReaderLimits {
            max_header_bytes: 1 << 20,
        };
        let mut reader = TarReader::new(&tar[..], limits);
        let mut seen = Vec::new();
        while let Some(h) = reader.next_entry().unwrap() {
            let mut data = vec![0u8; 16];
            let n = reader.read_data(&mut data).unwrap();
            seen.push((h.display_name(), h.kind, h.size, data[..n].to_vec()));
        }
        assert_eq!(
            seen,
            [
                ("link".to_owned(), Kind::Hardlink, 0, vec![]),
                ("dir/".to_owned(), Kind::Directory, 0, vec![]),
                ("file".to_owned(), Kind::Regular, 3, b"abc".to_vec()),
            ]
        );
    }

    #[test]
    fn sparse_maps_are_checked() {
        let ok = Sparse {
            real_size: 100,
            segments: vec![(0, 10), (50, 10), (100, 0)],
        };
        assert!(validate_sparse(&ok, 20).is_ok());
        assert!(validate_sparse(&ok, 21).is_err());
        let overlapping = Sparse {
            real_size: 100,
            segments: vec![(0, 10), (5, 10)],
        };
        assert!(validate_sparse(&overlapping, 20).is_err());
        let outside = Sparse {
            real_size: 10,
            segments: vec![(5, 10)],
        };
        assert!(validate_sparse(&outside, 10).is_err());
        assert_eq!(parse_map_list("0,10,50,10"), Some(vec![(0, 10), (50, 10)]));
        assert!(parse_map_list("0,10,50").is_none());
    }
}
