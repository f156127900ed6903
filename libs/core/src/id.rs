//! Sandbox ids: `sb-` followed by a lowercase ULID, so ids sort by creation time and are
//! safe in paths, host names and TAP device suffixes.

use std::fmt;
use std::str::FromStr;

use crate::CoreError;

const PREFIX: &str = "sb-";
/// Crockford base32, lowercase (no i, l, o, u).
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const ENCODED_LEN: usize = 26;

/// The id of a sandbox, `sb-` and 26 lowercase Crockford base32 characters (128 bits,
/// a UUIDv7 rendered as a ULID: 48 bits of milliseconds, then random bits).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SandboxId(String);

impl SandboxId {
    /// A new id for the current time.
    pub fn new() -> Self {
        Self::from_u128(uuid::Uuid::now_v7().as_u128())
    }

    /// The id that renders these 128 bits.
    pub fn from_u128(bits: u128) -> Self {
        let mut s = String::with_capacity(PREFIX.len() + ENCODED_LEN);
        s.push_str(PREFIX);
        for i in (0..ENCODED_LEN).rev() {
            // The index is masked to five bits, so it is always in the alphabet.
            let index = ((bits >> (5 * i)) & 0x1f) as usize;
            s.push(char::from(ALPHABET[index]));
        }
        Self(s)
    }

    /// Parses and validates an id.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        Self::decode(s).map(|_| Self(s.to_owned()))
    }

    /// The 128 bits the id renders.
    pub fn as_u128(&self) -> u128 {
        // Validated at construction.
        Self::decode(&self.0).unwrap_or_default()
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn decode(s: &str) -> Result<u128, CoreError> {
        let invalid = |reason: &str| CoreError::invalid("id", reason);
        let body = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| invalid("sandbox ids start with \"sb-\""))?;
        if body.len() != ENCODED_LEN {
            return Err(invalid("a sandbox id has 26 characters after \"sb-\""));
        }
        let mut bits: u128 = 0;
        for (i, c) in body.bytes().enumerate() {
            let value = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(|| invalid("sandbox ids use lowercase Crockford base32"))?;
            // 26 characters hold 130 bits; the first may only carry the top 3 of 128.
            if i == 0 && value > 7 {
                return Err(invalid("sandbox id out of range"));
            }
            bits = (bits << 5) | value as u128;
        }
        Ok(bits)
    }
}

impl Default for SandboxId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SandboxId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for SandboxId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_parse_back_and_sort_by_time() {
        let a = SandboxId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SandboxId::new();
        assert!(a < b, "{a} < {b}");
        assert_eq!(SandboxId::parse(a.as_str()), Ok(a.clone()));
        assert_eq!(a.as_str().len(), 29);
        assert!(a.as_str().starts_with("sb-0"));
    }

    #[test]
    fn bits_round_trip() {
        for bits in [0, 1, u128::MAX, 0x0192_3456_789a_bcde_f012_3456_789a_bcde] {
            let id = SandboxId::from_u128(bits);
            assert_eq!(id.as_u128(), bits);
            assert_eq!(id.as_str().parse::<SandboxId>(), Ok(id.clone()));
        }
        assert_eq!(
            SandboxId::from_u128(0).as_str(),
            "sb-00000000000000000000000000"
        );
        assert_eq!(
            SandboxId::from_u128(u128::MAX).as_str(),
            "sb-7zzzzzzzzzzzzzzzzzzzzzzzzz"
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "sb-",
            "01jq0000000000000000000000",
            "sb-01JQ0000000000000000000000",
            "sb-01jq000000000000000000000",
            "sb-01jq00000000000000000000000",
            "sb-01jq00000000000000000000ol",
            "sb-80000000000000000000000000",
            "vm-01jq0000000000000000000000",
        ] {
            let err = SandboxId::parse(bad).expect_err(bad);
            assert_eq!(err.field(), Some("id"), "{bad}");
        }
    }
}
