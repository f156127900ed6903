//! Value types of the configuration that are not plain numbers, strings or paths: secrets,
//! IP networks and the enumerated choices (`vmm`, `accel`, `cow`). Each parses from and
//! prints to the string form used in `nanobox.toml`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret string (API key, service token, database URL): `Debug` and serialisation print
/// `<redacted>`, so a logged or dumped configuration never shows it. [`Secret::expose`]
/// gives the value.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Secret(String);

impl Secret {
    /// The text `Debug` and serialisation print instead of the value.
    pub const REDACTED: &'static str = "<redacted>";

    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", Self::REDACTED)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

/// An IPv4 network in CIDR notation (`10.100.0.0/16`), with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `10.100.0.0/16`, the default sandbox subnet.
    pub const DEFAULT_SUBNET: Self = Self {
        network: Ipv4Addr::new(10, 100, 0, 0),
        prefix: 16,
    };

    /// A network; `None` if the prefix is over 32 or `network` has host bits set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32 && u32::from(network) & !v4_mask(prefix) == 0)
            .then_some(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Addresses in the network, including the network and broadcast addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Addresses usable for hosts: all but the network and broadcast addresses.
    pub fn host_count(&self) -> u64 {
        self.size().saturating_sub(2)
    }

    /// The first host address (the bridge's address, by convention), if there is one.
    pub fn first_host(&self) -> Option<Ipv4Addr> {
        (self.host_count() > 0).then(|| Ipv4Addr::from(u32::from(self.network) + 1))
    }

    /// `addr` is inside the network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & v4_mask(self.prefix) == u32::from(self.network)
    }
}

fn v4_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

fn v6_mask(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p.min(128))),
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || format!("{s:?} is not an IPv4 network like 10.100.0.0/16");
        let (addr, prefix) = s.split_once('/').ok_or_else(expected)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| expected())?;
        let prefix: u8 = prefix.parse().map_err(|_| expected())?;
        if prefix > 32 {
            return Err(expected());
        }
        Self::new(addr, prefix).ok_or_else(|| {
            let network = Ipv4Addr::from(u32::from(addr) & v4_mask(prefix));
            format!("{s} has host bits set; the network is {network}/{prefix}")
        })
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ParseVisitor::new(
            "an IP network in CIDR notation",
            str::parse,
        ))
    }
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `fd00::/8`) or a single address (`10.0.0.5`,
/// taken as `/32` or `/128`), with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCidr {
    network: IpAddr,
    prefix: u8,
}

impl IpCidr {
    /// A network; `None` if the prefix is too long for the family or host bits are set.
    pub fn new(network: IpAddr, prefix: u8) -> Option<Self> {
        let valid = match network {
            IpAddr::V4(a) => prefix <= 32 && u32::from(a) & !v4_mask(prefix) == 0,
            IpAddr::V6(a) => prefix <= 128 && u128::from(a) & !v6_mask(prefix) == 0,
        };
        valid.then_some(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// `addr` is inside the network (always false across families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.network, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & v4_mask(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & v6_mask(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for IpCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected =
            || format!("{s:?} is not an IP address or network like 10.0.0.5 or 10.0.0.0/8");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| expected())?;
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| expected())?,
            None => full,
        };
        if prefix > full {
            return Err(expected());
        }
        Self::new(addr, prefix).ok_or_else(|| {
            let network = match addr {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & v4_mask(prefix))),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & v6_mask(prefix))),
            };
            format!("{s} has host bits set; the network is {network}/{prefix}")
        })
    }
}

impl Serialize for IpCidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpCidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ParseVisitor::new(
            "an IP network in CIDR notation",
            str::parse,
        ))
    }
}

/// Deserialises a string through a parse function, failing inside the deserializer so the
/// error carries the value's position (an item of a list, not the whole list).
pub(crate) struct ParseVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> ParseVisitor<T> {
    pub(crate) fn new(expecting: &'static str, parse: fn(&str) -> Result<T, String>) -> Self {
        Self { expecting, parse }
    }
}

impl<T> serde::de::Visitor<'_> for ParseVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// Which VMM the node agent uses (`[agent] vmm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vmm {
    /// Firecracker when `/dev/kvm` works and the Firecracker binary is there, else QEMU.
    #[default]
    Auto,
    /// QEMU `-M microvm` (KVM or TCG).
    Qemu,
    /// Firecracker (needs KVM).
    Firecracker,
}

/// The QEMU accelerator (`[qemu] accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot under KVM works, else TCG.
    #[default]
    Auto,
    /// KVM only.
    Kvm,
    /// Software emulation only.
    Tcg,
}

/// How the node agent gives each sandbox its own copy of a template's disk
/// (`[agent] cow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CowMode {
    /// A reflink where the filesystem supports it, else a qcow2 overlay.
    #[default]
    Auto,
    /// A reflink (`FICLONE`) of the template file; fails where unsupported.
    Reflink,
    /// A qcow2 overlay backed by the template file.
    Qcow2,
    /// A full copy (slow; for filesystems with neither).
    Copy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_cidr() {
        let net: Ipv4Cidr = "10.100.0.0/16".parse().unwrap();
        assert_eq!(net.prefix(), 16);
        assert_eq!(net.host_count(), 65_534);
        assert_eq!(net.first_host(), Some(Ipv4Addr::new(10, 100, 0, 1)));
        assert!(net.contains(Ipv4Addr::new(10, 100, 255, 1)));
        assert!(!net.contains(Ipv4Addr::new(10, 101, 0, 1)));
        assert_eq!(net.to_string(), "10.100.0.0/16");
        let err = "10.100.0.1/16".parse::<Ipv4Cidr>().unwrap_err();
        assert!(err.contains("the network is 10.100.0.0/16"), "{err}");
        for bad in [
            "10.100.0.0",
            "10.100.0.0/33",
            "fd00::/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(all.size(), 1 << 32);
        let one: Ipv4Cidr = "10.0.0.7/32".parse().unwrap();
        assert_eq!(one.first_host(), None);
    }

    #[test]
    fn ip_cidr() {
        let one: IpCidr = "10.0.0.5".parse().unwrap();
        assert_eq!(one.to_string(), "10.0.0.5/32");
        let v6: IpCidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("fd00::1/8".parse::<IpCidr>().is_err());
        assert!("10.0.0.0/40".parse::<IpCidr>().is_err());
        assert!("nope".parse::<IpCidr>().is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2hunter2hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.expose(), "hunter2hunter2hunter2");
    }
}
