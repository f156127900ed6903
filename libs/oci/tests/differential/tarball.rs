//! A layer tarball writer that picks the tar flavour per entry: GNU (long names and link
//! names through `././@LongLink`), ustar (long names through the prefix field), PAX
//! (`path`, `linkpath`, `uid`, `gid`, `mtime` and `SCHILY.xattr.*` records) and the
//! pre-POSIX V7 header (no magic, regular files typed `\0`).

use tar::{EntryType, Header};

/// The header format of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Gnu,
    Ustar,
    Pax,
    V7,
}

/// What an entry is.
#[derive(Debug, Clone)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
}

/// The metadata of one entry.
#[derive(Debug, Clone)]
pub struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// A PAX `mtime` record (fractions, negative times); PAX flavour only.
    pub pax_mtime: Option<String>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    pub fn new(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            pax_mtime: None,
            xattrs: Vec::new(),
        }
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    pub fn xattr(mut self, key: &str, value: &[u8]) -> Self {
        self.xattrs.push((key.to_owned(), value.to_vec()));
        self
    }
}

/// The largest id a 7-digit octal field holds.
const OCTAL_ID_MAX: u64 = 0o7_777_777;

/// One layer tarball being written.
pub struct Tarball {
    builder: tar::Builder<Vec<u8>>,
    pub entries: usize,
}

impl std::fmt::Debug for Tarball {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tarball")
            .field("entries", &self.entries)
            .finish()
    }
}

impl Default for Tarball {
    fn default() -> Self {
        Self::new()
    }
}

impl Tarball {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            entries: 0,
        }
    }

    /// Appends one entry; the flavour is upgraded where the requested one cannot carry
    /// the entry (xattrs need PAX, devices and long names cannot be V7).
    pub fn entry(&mut self, flavour: Flavour, path: &str, kind: &Kind, meta: &Meta) {
        let link = match kind {
            Kind::Symlink(t) | Kind::Hardlink(t) => Some(t.as_str()),
            _ => None,
        };
        let mut flavour = flavour;
        if flavour == Flavour::V7
            && (path.len() >= 100
                || link.is_some_and(|l| l.len() >= 100)
                || matches!(kind, Kind::Char(..) | Kind::Block(..) | Kind::Fifo)
                || meta.uid > OCTAL_ID_MAX
                || meta.gid > OCTAL_ID_MAX)
        {
            flavour = Flavour::Gnu;
        }
        if !meta.xattrs.is_empty() || meta.pax_mtime.is_some() {
            flavour = Flavour::Pax;
        }
        if flavour == Flavour::Ustar && (meta.uid > OCTAL_ID_MAX || meta.gid > OCTAL_ID_MAX) {
            flavour = Flavour::Gnu;
        }
        // Names tar-rs refuses to put in a header (absolute, `./`): written raw.
        let raw_name = path.starts_with('/') || path.starts_with("./") || path.contains("/./");
        if raw_name && flavour != Flavour::Pax && path.len() >= 100 {
            flavour = Flavour::Pax;
        }

        let mut h = match flavour {
            Flavour::Gnu => Header::new_gnu(),
            Flavour::Ustar | Flavour::Pax => Header::new_ustar(),
            Flavour::V7 => Header::new_old(),
        };
        let (etype, data): (EntryType, &[u8]) = match kind {
            Kind::File(d) if flavour == Flavour::V7 => (EntryType::new(0), d),
            Kind::File(d) => (EntryType::Regular, d),
            Kind::Dir => (EntryType::Directory, &[]),
            Kind::Symlink(_) => (EntryType::Symlink, &[]),
            Kind::Hardlink(_) => (EntryType::Link, &[]),
            Kind::Fifo => (EntryType::Fifo, &[]),
            Kind::Char(..) => (EntryType::Char, &[]),
            Kind::Block(..) => (EntryType::Block, &[]),
        };
        h.set_entry_type(etype);
        h.set_mode(meta.mode);
        h.set_mtime(meta.mtime);
        h.set_size(data.len() as u64);
        if let Kind::Char(major, minor) | Kind::Block(major, minor) = kind {
            h.set_device_major(*major).unwrap();
            h.set_device_minor(*minor).unwrap();
        }
        self.entries += 1;

        if flavour == Flavour::Pax {
            let mut records: Vec<(String, Vec<u8>)> = Vec::new();
            if path.len() >= 100 || raw_name {
                records.push(("path".into(), path.as_bytes().to_vec()));
            }
            if let Some(l) = link.filter(|l| l.len() >= 100) {
                records.push(("linkpath".into(), l.as_bytes().to_vec()));
            }
            if meta.uid > OCTAL_ID_MAX {
                records.push(("uid".into(), meta.uid.to_string().into_bytes()));
            }
            if meta.gid > OCTAL_ID_MAX {
                records.push(("gid".into(), meta.gid.to_string().into_bytes()));
            }
            if let Some(t) = &meta.pax_mtime {
                records.push(("mtime".into(), t.clone().into_bytes()));
            }
            for (k, v) in &meta.xattrs {
                records.push((format!("SCHILY.xattr.{k}"), v.clone()));
            }
            h.set_uid(meta.uid.min(OCTAL_ID_MAX));
            h.set_gid(meta.gid.min(OCTAL_ID_MAX));
            if !records.is_empty() {
                self.pax(&records);
            }
            // The header keeps what fits; the PAX records carry the rest.
            set_raw(
                &mut h.as_old_mut().name,
                &path.as_bytes()[..path.len().min(99)],
            );
            if let Some(l) = link {
                set_raw(
                    &mut h.as_old_mut().linkname,
                    &l.as_bytes()[..l.len().min(99)],
                );
            }
            h.set_cksum();
            self.builder.append(&h, data).unwrap();
            return;
        }

        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        if raw_name {
            set_raw(&mut h.as_old_mut().name, path.as_bytes());
            if let Some(l) = link {
                assert!(l.len() < 100, "raw names take short links only");
                set_raw(&mut h.as_old_mut().linkname, l.as_bytes());
            }
            h.set_cksum();
            self.builder.append(&h, data).unwrap();
            return;
        }
        match link {
            Some(l) => self.builder.append_link(&mut h, path, l).unwrap(),
            None => self.builder.append_data(&mut h, path, data).unwrap(),
        }
    }

    /// A PAX extended header for the next entry.
    fn pax(&mut self, records: &[(String, Vec<u8>)]) {
        let data = crate::common::pax_records(records.iter().map(|(k, v)| (k.as_str(), &v[..])));
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_path("PaxHeaders.0/entry").unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, &data[..]).unwrap();
    }

    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

fn set_raw(field: &mut [u8; 100], bytes: &[u8]) {
    *field = [0; 100];
    field[..bytes.len()].copy_from_slice(bytes);
}
