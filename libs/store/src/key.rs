//! Object keys: validated once, at construction, so every store sees only keys that are
//! safe to map onto a file system and portable across S3 implementations.

use std::fmt;

use crate::StoreError;

/// Longest key, in bytes (S3's own limit).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest `/`-separated segment, in bytes. File systems cap a name at 255 bytes and the
/// local store adds a two-byte suffix to every name; the same rule applies to every store
/// so that a key valid for one is valid for all.
pub const MAX_SEGMENT_LEN: usize = 250;

/// A validated object key: `/`-separated segments, each non-empty, not `.` or `..`, at
/// most [`MAX_SEGMENT_LEN`] bytes; printable characters only; no leading or trailing `/`;
/// at most [`MAX_KEY_LEN`] bytes in all.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Validates `key`.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        match check_key(&key) {
            Ok(()) => Ok(Self(key)),
            Err(reason) => Err(StoreError::InvalidKey { key, reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ObjectKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ObjectKey {
    type Error = StoreError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for ObjectKey {
    type Error = StoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

fn check_printable(s: &str) -> Result<(), &'static str> {
    if s.len() > MAX_KEY_LEN {
        return Err("longer than 1024 bytes");
    }
    if s.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    if s.contains('\\') {
        return Err("contains a backslash");
    }
    if s.starts_with('/') {
        return Err("starts with '/'");
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty");
    }
    check_printable(key)?;
    for segment in key.split('/') {
        check_segment(segment)?;
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), &'static str> {
    match segment {
        "" => Err("has an empty segment (leading, trailing or doubled '/')"),
        "." | ".." => Err("has a '.' or '..' segment"),
        s if s.len() > MAX_SEGMENT_LEN => Err("has a segment longer than 250 bytes"),
        _ => Ok(()),
    }
}

/// Validates a listing prefix: like a key, but it may be empty, end in `/` or stop in the
/// middle of a segment; complete segments must still be valid.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    let invalid = |reason| StoreError::InvalidKey {
        key: prefix.to_owned(),
        reason,
    };
    check_printable(prefix).map_err(invalid)?;
    let mut segments: Vec<&str> = prefix.split('/').collect();
    // The last piece is either empty (prefix ends in '/') or a partial segment.
    let last = segments.pop().unwrap_or_default();
    if last.len() > MAX_SEGMENT_LEN {
        return Err(invalid("has a segment longer than 250 bytes"));
    }
    for segment in segments {
        check_segment(segment).map_err(invalid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for key in [
            "a",
            "layers/sha256/abc",
            "templates/node:22-alpine/rootfs.ext4",
            "with space/ünïcode",
            "..a/b..",
            ".hidden",
        ] {
            assert!(ObjectKey::new(key).is_ok(), "{key}");
        }
        assert!(ObjectKey::new("x".repeat(250)).is_ok());
        let long = vec!["y".repeat(200); 5].join("/");
        assert_eq!(long.len(), 1004);
        assert!(ObjectKey::new(long).is_ok());
    }

    #[test]
    fn rejects_bad_keys() {
        for key in [
            "",
            "/abs",
            "a/",
            "a//b",
            "..",
            "a/../b",
            "./a",
            "a/.",
            "tab\there",
            "nl\n",
            "nul\0",
            "back\\slash",
        ] {
            match ObjectKey::new(key) {
                Err(StoreError::InvalidKey { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key:?}: {other:?}"),
            }
        }
        assert!(ObjectKey::new("x".repeat(251)).is_err());
        assert!(ObjectKey::new(vec!["y".repeat(200); 6].join("/")).is_err());
    }

    #[test]
    fn prefixes() {
        for ok in ["", "a", "a/", "a/b", "a/b/", "a/partial-seg"] {
            assert!(check_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["/a", "../", "a/../", "a//", "ctl\u{7}"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
