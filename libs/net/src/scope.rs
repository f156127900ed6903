//! Tenant scopes as address blocks: how the subnet is divided so that "same scope" is a
//! prefix match.
//!
//! The subnet's lower half is the **unscoped range**: the gateway, and every sandbox
//! created without a tenant scope (pooled VMs among them). The upper half is cut into
//! equal, aligned **scope blocks**; the first sandbox of a scope takes a free block, every
//! later one of that scope gets an address inside it, and the block goes back when the
//! scope's last addressed sandbox is gone. A sandbox namespace's rules therefore name one
//! prefix for its peers (its block, or the unscoped range) and never change while the
//! sandbox lives, whoever joins or leaves its scope.
//!
//! The block size is derived from the subnet: half of the upper half's host bits,
//! rounded down, so the default `/16` gives 256 blocks of 128 addresses (`/25`), a `/24`
//! 16 blocks of 8 (`/29`), the smallest allowed subnet (`/29`) 2 blocks of 2. Those are
//! the limits: scopes per node and sandboxes per scope per node, with an
//! [`NetError::Exhausted`](crate::NetError::Exhausted) beyond them (the node is full for
//! that request, not broken).

use std::net::Ipv4Addr;

use crate::Ipv4Cidr;

/// Whether `scope` is a tenant scope as `nanobox_core::NetworkSpec` accepts it: 1-63 of
/// `[A-Za-z0-9._-]`.
pub(crate) fn valid_scope(scope: &str) -> bool {
    (1..=63).contains(&scope.len())
        && scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The division of one subnet into the unscoped range and scope blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddressPlan {
    subnet: Ipv4Cidr,
    unscoped: Ipv4Cidr,
    /// Host bits of a scope block.
    block_bits: u32,
}

impl AddressPlan {
    /// The plan of `subnet`, which has at least 2 host bits (the lease file refuses
    /// smaller ones).
    pub fn new(subnet: Ipv4Cidr) -> Self {
        let len = subnet.prefix_len().min(30);
        let host_bits = 32 - u32::from(len);
        let unscoped = Ipv4Cidr::new(subnet.network(), len + 1).unwrap_or(subnet);
        Self {
            subnet,
            unscoped,
            block_bits: (host_bits - 1) / 2,
        }
    }

    /// Where unscoped sandboxes get their addresses (the gateway is in it too).
    pub fn unscoped(&self) -> Ipv4Cidr {
        self.unscoped
    }

    /// How many scope blocks the subnet has.
    pub fn block_count(&self) -> u64 {
        (self.subnet.size() / 2) >> self.block_bits
    }

    /// Scope block `index` (0 to [`Self::block_count`]).
    pub fn block(&self, index: u64) -> Option<Ipv4Cidr> {
        if index >= self.block_count() {
            return None;
        }
        let start = self
            .subnet
            .nth(self.subnet.size() / 2 + (index << self.block_bits))?;
        let len = u8::try_from(32 - self.block_bits).ok()?;
        Ipv4Cidr::new(start, len).ok()
    }

    /// Whether `addr` may be leased at all: a host address of the subnet (not its
    /// network or broadcast address).
    pub fn is_host(&self, addr: Ipv4Addr) -> bool {
        match self.subnet.offset_of(addr) {
            Some(offset) => offset != 0 && offset != self.subnet.size() - 1,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(subnet: &str) -> AddressPlan {
        AddressPlan::new(subnet.parse().unwrap())
    }

    #[test]
    fn the_subnet_splits_into_an_unscoped_half_and_scope_blocks() {
        let p = plan("10.100.0.0/16");
        assert_eq!(p.unscoped().to_string(), "10.100.0.0/17");
        assert_eq!(p.block_count(), 256);
        assert_eq!(p.block(0).unwrap().to_string(), "10.100.128.0/25");
        assert_eq!(p.block(1).unwrap().to_string(), "10.100.128.128/25");
        assert_eq!(p.block(255).unwrap().to_string(), "10.100.255.128/25");
        assert_eq!(p.block(256), None);

        let p = plan("10.100.0.0/24");
        assert_eq!(p.unscoped().to_string(), "10.100.0.0/25");
        assert_eq!(p.block_count(), 16);
        assert_eq!(p.block(15).unwrap().to_string(), "10.100.0.248/29");

        let p = plan("10.100.0.0/29");
        assert_eq!(p.unscoped().to_string(), "10.100.0.0/30");
        assert_eq!(p.block_count(), 2);
        assert_eq!(p.block(0).unwrap().to_string(), "10.100.0.4/31");
        assert_eq!(p.block(1).unwrap().to_string(), "10.100.0.6/31");
        assert!(p.is_host("10.100.0.6".parse().unwrap()));
        assert!(!p.is_host("10.100.0.7".parse().unwrap()));
        assert!(!p.is_host("10.100.0.0".parse().unwrap()));

        // Blocks never overlap the unscoped range or each other, and tile the upper half.
        let p = plan("10.100.0.0/20");
        let blocks: Vec<Ipv4Cidr> = (0..p.block_count()).map(|i| p.block(i).unwrap()).collect();
        let total: u64 = blocks.iter().map(Ipv4Cidr::size).sum();
        assert_eq!(total, 2048);
        for b in &blocks {
            assert!(!p.unscoped().contains(b.network()), "{b}");
        }
    }

    #[test]
    fn scopes_are_checked_like_the_api_does() {
        assert!(valid_scope("team-a.prod_1"));
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(64)] {
            assert!(!valid_scope(bad), "{bad:?}");
        }
    }
}
