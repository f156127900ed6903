//! What a sandbox's network looks like to the VMM and to the guest.
//!
//! Every guest sees the same network from inside: address [`GUEST_ADDRESS`]/30 with
//! gateway and resolver [`GATEWAY_ADDRESS`], MAC [`GUEST_MAC`], the gateway at
//! [`TAP_MAC`], on a TAP called [`TAP_NAME`]. Only the sandbox's namespace knows the
//! routable subnet address it is NATed to. A snapshot taken on one node therefore
//! resumes on another (or after its address was given to someone else) with its
//! addresses, routes, ARP cache and resolv.conf still right: the new node only builds
//! a namespace around it with whatever routable address is free there.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use nanobox_core::NetworkMode;
use nanobox_guest_client::NetworkConfig;
use nanobox_vmm::{NetSpec, RateLimit, VmSpec};

/// The TAP device inside every sandbox namespace.
pub const TAP_NAME: &str = "tap0";
/// The sandbox namespace's end of the veth pair into the bridge.
pub const UPLINK_NAME: &str = "uplink";
/// The guest's address, the same in every sandbox.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
/// The TAP's address: the guest's gateway and resolver.
pub const GATEWAY_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// A /30: just the gateway and the guest.
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The guest's MAC (QEMU's locally administered prefix, "nb").
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6e, 0x62, 0x02];
/// The TAP's MAC, fixed so a restored guest's ARP entry for its gateway stays valid.
pub const TAP_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6e, 0x62, 0x01];
/// Ethernet MTU on the TAP, the veth and the bridge.
pub const MTU: u32 = 1500;

/// Who enforces a sandbox's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimiter {
    /// `tc` token buckets in the sandbox namespace (QEMU has no limiter).
    #[default]
    Tc,
    /// The VMM (Firecracker's rate limiter): the limit is handed over in [`NetSpec`].
    Vmm,
}

/// The network of one sandbox, as created by [`crate::NodeNetwork::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNetwork {
    pub id: String,
    pub mode: NetworkMode,
    /// The tenant scope it was created with: sandboxes of the same scope reach each
    /// other (internal and internet mode).
    pub tenant_scope: Option<String>,
    /// The namespace the VMM must run in (`VmSpec::netns`).
    pub netns: PathBuf,
    /// The guest's interface; `None` in isolated mode, which has no network device.
    pub interface: Option<SandboxInterface>,
}

/// The guest interface of a sandbox in internal or internet mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInterface {
    /// The TAP device in the sandbox namespace ([`TAP_NAME`]).
    pub tap: String,
    /// The guest's MAC, `52:54:00:...`.
    pub mac: String,
    pub guest_address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// What the guest puts in resolv.conf (the gateway, which forwards to the resolver).
    pub dns: Vec<Ipv4Addr>,
    /// The subnet address the guest is NATed to: what peers and the host see.
    pub routable_address: Ipv4Addr,
    /// The host-side end of the veth pair, on the bridge.
    pub host_veth: String,
    pub rate_limit: Option<RateLimit>,
    pub rate_limiter: RateLimiter,
}

impl SandboxNetwork {
    /// The VMM's network device, `None` in isolated mode. The rate limit is included only
    /// when the VMM enforces it.
    pub fn net_spec(&self) -> Option<NetSpec> {
        self.interface.as_ref().map(|i| NetSpec {
            tap: i.tap.clone(),
            mac: i.mac.clone(),
            rate_limit: match i.rate_limiter {
                RateLimiter::Vmm => i.rate_limit,
                RateLimiter::Tc => None,
            },
        })
    }

    /// What the guest agent's `configure` call should set on eth0; `None` in isolated
    /// mode.
    pub fn guest_config(&self) -> Option<NetworkConfig> {
        self.interface.as_ref().map(|i| NetworkConfig {
            address: format!("{}/{}", i.guest_address, i.prefix_len),
            gateway: i.gateway.to_string(),
            dns_servers: i.dns.iter().map(ToString::to_string).collect(),
            mtu: MTU,
        })
    }

    /// Points a VM spec at this network: its namespace and its device.
    pub fn apply_to(&self, spec: &mut VmSpec) {
        spec.netns = Some(self.netns.clone());
        spec.network = self.net_spec();
    }
}

/// `52:54:00:6e:62:02` from bytes.
pub(crate) fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The host-side veth name of the sandbox with routable address `addr`: unique because
/// addresses are, within the 15-byte limit whatever the id, and found again from the
/// lease after a crash.
pub(crate) fn host_veth_name(addr: Ipv4Addr) -> String {
    format!("nbx{:08x}", u32::from(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_guest_view() {
        assert_eq!(mac_text(GUEST_MAC), "52:54:00:6e:62:02");
        assert_eq!(host_veth_name(Ipv4Addr::new(10, 100, 0, 2)), "nbx0a640002");
        let net = SandboxNetwork {
            id: "s".into(),
            mode: NetworkMode::Internet,
            tenant_scope: None,
            netns: "/run/netns/nbx-s".into(),
            interface: Some(SandboxInterface {
                tap: TAP_NAME.into(),
                mac: mac_text(GUEST_MAC),
                guest_address: GUEST_ADDRESS,
                prefix_len: GUEST_PREFIX_LEN,
                gateway: GATEWAY_ADDRESS,
                dns: vec![GATEWAY_ADDRESS],
                routable_address: Ipv4Addr::new(10, 100, 0, 2),
                host_veth: "nbx0a640002".into(),
                rate_limit: Some(RateLimit {
                    rate_bytes_per_sec: 1,
                    burst_bytes: 2,
                }),
                rate_limiter: RateLimiter::Tc,
            }),
        };
        let cfg = net.guest_config().unwrap();
        assert_eq!(cfg.address, "169.254.0.2/30");
        assert_eq!(cfg.gateway, "169.254.0.1");
        assert_eq!(cfg.dns_servers, vec!["169.254.0.1".to_owned()]);
        // tc enforces the limit: the VMM must not apply it a second time.
        assert_eq!(net.net_spec().unwrap().rate_limit, None);
    }
}
