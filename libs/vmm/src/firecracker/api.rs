//! Typed request bodies of the Firecracker API (the subset NanoBox uses).
//!
//! Each type mirrors a definition of Firecracker's published swagger schema
//! (`src/firecracker/swagger/firecracker.yaml`); optional fields are omitted when unset,
//! because Firecracker rejects unknown fields and treats absent ones as defaults. The
//! tests check every body against a copy of the schema's definitions
//! (`tests/data/firecracker-definitions.json`).

use serde::{Deserialize, Serialize};

/// HTTP method of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
        }
    }
}

/// A request body and where it goes.
pub trait ApiRequest: Serialize {
    /// The schema definition this body follows (for the conformance tests).
    const DEFINITION: &'static str;
    fn method(&self) -> Method;
    fn path(&self) -> String;
}

/// `PUT /machine-config`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    TwoMiB,
}

impl ApiRequest for MachineConfiguration {
    const DEFINITION: &'static str = "MachineConfiguration";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/machine-config".into()
    }
}

/// `PUT /boot-source`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl ApiRequest for BootSource {
    const DEFINITION: &'static str = "BootSource";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/boot-source".into()
    }
}

/// A token bucket: `size` tokens, refilled over `refill_time` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

impl TokenBucket {
    /// A bucket that sustains `bytes_per_sec`, refilled every 100 ms (Firecracker's
    /// token buckets refill continuously; the size bounds the burst).
    pub fn bytes_per_second(bytes_per_sec: u64) -> Self {
        Self {
            size: (bytes_per_sec / 10).max(1),
            refill_time: 100,
            one_time_burst: None,
        }
    }
}

/// Independent bandwidth (bytes) and operations limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    pub path_on_host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl ApiRequest for Drive {
    const DEFINITION: &'static str = "Drive";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        format!("/drives/{}", self.drive_id)
    }
}

/// `PUT /network-interfaces/{iface_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl ApiRequest for NetworkInterface {
    const DEFINITION: &'static str = "NetworkInterface";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        format!("/network-interfaces/{}", self.iface_id)
    }
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limits on a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl ApiRequest for PartialNetworkInterface {
    const DEFINITION: &'static str = "PartialNetworkInterface";
    fn method(&self) -> Method {
        Method::Patch
    }
    fn path(&self) -> String {
        format!("/network-interfaces/{}", self.iface_id)
    }
}

/// `PUT /vsock`: the guest's AF_VSOCK device, proxied to a Unix socket on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

impl ApiRequest for Vsock {
    const DEFINITION: &'static str = "Vsock";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/vsock".into()
    }
}

/// `PUT /entropy`: a virtio-rng device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EntropyDevice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl ApiRequest for EntropyDevice {
    const DEFINITION: &'static str = "EntropyDevice";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/entropy".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

impl ApiRequest for InstanceActionInfo {
    const DEFINITION: &'static str = "InstanceActionInfo";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/actions".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmRunState {
    Paused,
    Resumed,
}

/// `PATCH /vm`: pause or resume the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmStateRequest {
    pub state: VmRunState,
}

impl ApiRequest for VmStateRequest {
    const DEFINITION: &'static str = "Vm";
    fn method(&self) -> Method {
        Method::Patch
    }
    fn path(&self) -> String {
        "/vm".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create` (the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

impl ApiRequest for SnapshotCreateParams {
    const DEFINITION: &'static str = "SnapshotCreateParams";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/snapshot/create".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: String,
}

/// Points a restored network interface at this node's TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /snapshot/load` (on a fresh Firecracker process, before any configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

impl ApiRequest for SnapshotLoadParams {
    const DEFINITION: &'static str = "SnapshotLoadParams";
    fn method(&self) -> Method {
        Method::Put
    }
    fn path(&self) -> String {
        "/snapshot/load".into()
    }
}

/// The body of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub fault_message: String,
}

/// `GET /`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: String,
    pub vmm_version: String,
}
