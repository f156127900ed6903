//! Sandbox networking: one network namespace per sandbox, holding the TAP its VMM opens,
//! joined to a per-node bridge, with the sandbox's network mode enforced by nftables and
//! its rate limit by `tc` (or by the VMM).
//!
//! # Shape
//!
//! ```text
//!   host namespace (root in production)             sandbox namespace /run/netns/nbx-<id>
//!  ┌─────────────────────────────────────┐         ┌───────────────────────────────────┐
//!  │ host_iface ◄─ masquerade ─┐         │         │ uplink 10.100.x.y/16 ◄─ 1:1 NAT ─┐│
//!  │                 nanobox-br0 10.100.0.1/16 ◄──────── veth ─┘   nft: mode policy  ││
//!  │ nft: table ip nanobox     │  nbx<hex addr>  │         │ tap0 169.254.0.1/30 ◄─────┘│
//!  └───────────────────────────┘                 │         └──────┬────────────────────┘
//!                                                                 │ virtio-net
//!                                                         guest eth0 169.254.0.2/30
//! ```
//!
//! * **Same inside address everywhere.** Every guest is `169.254.0.2/30` behind gateway
//!   and resolver `169.254.0.1`, with fixed MACs; its namespace NATs it 1:1 to the
//!   routable address leased from the subnet. A snapshot restored on another node keeps
//!   a working network without touching the guest: only the namespace around it differs.
//!   (Routing the subnet address straight to the guest would tie it to its node.)
//! * **Policy in the sandbox namespace.** Peers talk across the bridge at layer 2, out of
//!   sight of host IP rules, so each namespace filters its own guest's traffic; those
//!   rules die with the namespace. The host namespace holds one table: NAT out of the
//!   host interface, the resolver and internal services, and the `internet` set of
//!   sandbox addresses allowed out (the only per-sandbox host state).
//! * **Modes.** `isolated`: a namespace with no device in it (only loopback) and no
//!   address; the VM gets no network device, its agent channel is virtio-serial. The
//!   namespace still confines the VMM process itself. `internal`: the resolver, the
//!   configured internal services, and its peers (below); the node itself may connect
//!   in; nothing else. `internet`: the resolver, internal services and anything beyond
//!   the host interface through NAT, and its peers if it has a tenant scope, but no
//!   other sandbox and nothing on the node; nobody but its peers may connect in. In
//!   every mode link-local destinations (cloud metadata) are dropped.
//! * **Tenant scopes.** Sandboxes (internal or internet) with the same tenant scope are
//!   each other's peers; different scopes never are. Unscoped internal sandboxes are
//!   peers of each other, as all internal sandboxes of a node were before scopes (a
//!   caller that sets no scope keeps today's behaviour; pooled VMs, which are booted
//!   before anyone asks, have no scope), and never of a scoped sandbox. Unscoped
//!   internet sandboxes have no peers. "Same scope" is a prefix: the subnet's lower half
//!   is the unscoped range, its upper half is cut into equal blocks, and a scope leases
//!   every address from one block, taken by its first sandbox and released with its
//!   last (module `scope`; `/25`s of a `/16`, so 256 scopes of up to 128 sandboxes per
//!   node). Each namespace then allows its guest to and from one prefix, written once
//!   at create and never touched again, and the sender's and the receiver's namespace
//!   both check it. The alternative, a set of peer addresses in every namespace, would
//!   have to be rewritten in each of a scope's namespaces whenever a peer comes or goes
//!   (one `nsenter` per peer, per create and destroy), kept consistent across crashes,
//!   and any element left behind would let the next holder of that address in; blocks
//!   cost a fixed partition of the subnet instead, and a create that finds its scope's
//!   block (or every block) full fails as exhausted. The scope and block of every lease
//!   are in the lease file, so restarts and orphan cleanup need nothing else.
//! * **DNS.** The guest's resolver is its gateway; the namespace forwards port 53 there
//!   to the configured `dns_server`, so a resolver change on a node never needs the
//!   guest's resolv.conf to change.
//! * **Rate limit.** `tc` token buckets on the TAP and the uplink (module `shaping`), or
//!   handed to the VMM in [`nanobox_vmm::NetSpec`] when it has a limiter.
//! * **Addresses** (and scope blocks) are leased from a lock-protected, atomically
//!   replaced JSON file under the state directory; module `registry`.
//!
//! # Tools
//!
//! Links, addresses and routes go through `rtnetlink`, in any namespace (a socket created
//! from a thread inside it). Namespaces are made with `unshare(2)` and a bind mount, as
//! `ip netns` does, without a fork (module [`netns`]). The TAP is an ioctl (module `tap`): netlink
//! cannot create one. Firewall rules are `nft -f -` (atomic transactions) and rate
//! limits `tc`; both run in a sandbox's namespace through `nsenter --net`.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `nft`, `tc` and `nsenter`. Setup turns
//! on IPv4 forwarding in the host namespace (`net.ipv4.ip_forward`, global in the root
//! namespace). Sandbox namespaces have IPv6 turned off: the policy is IPv4. On a host
//! whose iptables `FORWARD` policy drops (Docker sets that), forwarded sandbox traffic
//! also needs accepting there; this crate touches no table but its own.

mod cidr;
mod command;
mod error;
mod firewall;
mod netlink;
pub mod netns;
mod node;
mod registry;
mod sandbox;
mod scope;
mod shaping;
mod tap;

pub use cidr::Ipv4Cidr;
pub use error::NetError;
pub use firewall::TABLE;
pub use node::{NodeNetwork, NodeNetworkConfig};
pub use sandbox::{
    RateLimiter, SandboxInterface, SandboxNetwork, GATEWAY_ADDRESS, GUEST_ADDRESS, GUEST_MAC,
    GUEST_PREFIX_LEN, MTU, TAP_MAC, TAP_NAME, UPLINK_NAME,
};
