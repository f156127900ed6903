//! IPv4 prefixes (`10.100.0.0/16`): the node's sandbox subnet and the internal services
//! the `internal` mode may reach. Small on purpose: the crate needs containment, the n-th
//! host and a canonical text form, nothing an address crate would add.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::NetError;

/// An IPv4 prefix, stored in canonical form (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// A prefix; host bits in `addr` are refused rather than silently cleared, because a
    /// configured `10.100.0.1/16` usually means someone confused the subnet with the
    /// gateway.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, NetError> {
        if prefix_len > 32 {
            return Err(NetError::InvalidConfig(format!(
                "prefix length {prefix_len} is over 32"
            )));
        }
        let cidr = Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            prefix_len,
        };
        if cidr.network != addr {
            return Err(NetError::InvalidConfig(format!(
                "{addr}/{prefix_len} has host bits set (the prefix is {cidr})"
            )));
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` is inside the prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// Number of addresses in the prefix (2^(32 - len)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// The address `offset` places after the network address, if inside the prefix.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        if offset >= self.size() {
            return None;
        }
        let offset = u32::try_from(offset).ok()?;
        Some(Ipv4Addr::from(u32::from(self.network) + offset))
    }

    /// How far `addr` is from the network address, if inside the prefix.
    pub fn offset_of(&self, addr: Ipv4Addr) -> Option<u64> {
        self.contains(addr)
            .then(|| u64::from(u32::from(addr) - u32::from(self.network)))
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;

    /// `a.b.c.d/len`, or a bare address meaning `/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::InvalidConfig(format!("{s:?} is not an IPv4 prefix (a.b.c.d/len)"));
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, len.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        Self::new(addr.parse().map_err(|_| bad())?, len)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_contains_and_counts() {
        let net: Ipv4Cidr = "10.100.0.0/16".parse().unwrap();
        assert_eq!(net.to_string(), "10.100.0.0/16");
        assert!(net.contains("10.100.255.254".parse().unwrap()));
        assert!(!net.contains("10.101.0.1".parse().unwrap()));
        assert_eq!(net.size(), 65536);
        assert_eq!(net.nth(2), Some("10.100.0.2".parse().unwrap()));
        assert_eq!(net.nth(65536), None);
        assert_eq!(net.offset_of("10.100.1.0".parse().unwrap()), Some(256));
        let host: Ipv4Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(host.to_string(), "192.0.2.7/32");
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn refuses_host_bits_and_garbage() {
        for bad in [
            "10.100.0.1/16",
            "10.100.0.0/33",
            "10.100.0/16",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }
}
