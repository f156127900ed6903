//! From a backend-neutral [`VmSpec`] to the Firecracker requests that boot it, in order,
//! and the requests that snapshot and restore it. Pure functions: every body is checked
//! against Firecracker's schema in the tests without starting anything.

use serde_json::Value;

use super::api::{
    self, ActionType, ApiRequest, BootSource, Drive, EntropyDevice, InstanceActionInfo,
    MachineConfiguration, MemoryBackend, MemoryBackendType, Method, NetworkInterface,
    NetworkOverride, RateLimiter, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    TokenBucket, VmRunState, VmStateRequest, Vsock, VsockOverride,
};
use crate::{RateLimit, VmSpec, VmmError};

/// Guest port the agent listens on (AF_VSOCK); the host sends `CONNECT <port>`.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest's vsock CID. Every microVM has its own vsock device and host socket, so one
/// fixed CID serves all of them (3 is the first CID a guest may use).
pub const GUEST_CID: u32 = 3;
/// The root drive's id in the API (and in snapshots).
pub const ROOT_DRIVE_ID: &str = "rootfs";
/// The network interface's id in the API (and in snapshots); the guest sees `eth0`.
pub const NET_IFACE_ID: &str = "eth0";

/// One API call: method, path and JSON body, with the schema definition it follows.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    pub method: Method,
    pub path: String,
    pub definition: &'static str,
    pub body: Value,
}

impl PlannedRequest {
    pub fn new<R: ApiRequest>(request: &R) -> Result<Self, VmmError> {
        Ok(Self {
            method: request.method(),
            path: request.path(),
            definition: R::DEFINITION,
            body: serde_json::to_value(request)
                .map_err(|e| VmmError::Control(format!("encoding {}: {e}", R::DEFINITION)))?,
        })
    }
}

/// Where Firecracker finds a VM's files, as Firecracker sees them: host paths when it runs
/// directly, paths inside its chroot under the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmPaths {
    pub kernel: String,
    pub rootfs: String,
    /// The host end of the guest's vsock device (Firecracker creates it).
    pub vsock_uds: String,
}

/// The kernel command line: `boot_args`, the root device mode, then the spec's extras.
pub fn kernel_cmdline(boot_args: &[String], spec: &VmSpec) -> String {
    let mut args: Vec<&str> = boot_args.iter().map(String::as_str).collect();
    // Firecracker adds `root=/dev/vda` for a root drive; ro/rw is ours to say.
    args.push(if spec.rootfs.read_only { "ro" } else { "rw" });
    args.extend(spec.extra_kernel_args.iter().map(String::as_str));
    args.join(" ")
}

/// A token bucket for a [`RateLimit`]: Firecracker's bucket holds `size` bytes and refills
/// from empty to full in `refill_time` ms, so the rate is `size / refill_time`.
///
/// The bucket is the requested burst, but at least 100 ms worth of the rate: with a
/// refill time of 100 ms or more, rounding it to whole milliseconds keeps the rate
/// within 0.5% of what was asked.
pub fn token_bucket(limit: &RateLimit) -> Result<TokenBucket, VmmError> {
    let rate = u128::from(limit.rate_bytes_per_sec);
    if rate == 0 {
        return Err(VmmError::InvalidSpec(
            "a rate limit of 0 bytes/s would stop all traffic".into(),
        ));
    }
    let size = u128::from(limit.burst_bytes).max(rate.div_ceil(10));
    let refill_ms = (size * 1000 + rate / 2) / rate;
    Ok(TokenBucket {
        size: u64::try_from(size).unwrap_or(u64::MAX),
        refill_time: u64::try_from(refill_ms).unwrap_or(u64::MAX),
        one_time_burst: None,
    })
}

/// The bandwidth limiter for one direction of a network interface.
pub fn rate_limiter(limit: &RateLimit) -> Result<RateLimiter, VmmError> {
    Ok(RateLimiter {
        bandwidth: Some(token_bucket(limit)?),
        ops: None,
    })
}

/// The requests that configure `spec` and start it: machine, kernel, root drive, network
/// interface (with the spec's rate limit on both directions), vsock for the agent, an
/// entropy device, then InstanceStart.
pub fn boot_requests(
    spec: &VmSpec,
    boot_args: &[String],
    paths: &VmmPaths,
) -> Result<Vec<PlannedRequest>, VmmError> {
    check_disk(spec)?;
    let mut plan = vec![
        PlannedRequest::new(&MachineConfiguration {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
            smt: Some(false),
            track_dirty_pages: None,
            huge_pages: None,
        })?,
        PlannedRequest::new(&BootSource {
            kernel_image_path: paths.kernel.clone(),
            boot_args: Some(kernel_cmdline(boot_args, spec)),
            initrd_path: None,
        })?,
        PlannedRequest::new(&Drive {
            drive_id: ROOT_DRIVE_ID.into(),
            is_root_device: true,
            is_read_only: spec.rootfs.read_only,
            path_on_host: paths.rootfs.clone(),
            cache_type: Some(api::CacheType::Unsafe),
            io_engine: None,
            rate_limiter: None,
        })?,
    ];
    if let Some(net) = &spec.network {
        let limiter = net.rate_limit.as_ref().map(rate_limiter).transpose()?;
        plan.push(PlannedRequest::new(&NetworkInterface {
            iface_id: NET_IFACE_ID.into(),
            host_dev_name: net.tap.clone(),
            guest_mac: Some(net.mac.clone()),
            mtu: None,
            rx_rate_limiter: limiter,
            tx_rate_limiter: limiter,
        })?);
    }
    plan.push(PlannedRequest::new(&Vsock {
        guest_cid: GUEST_CID,
        uds_path: paths.vsock_uds.clone(),
    })?);
    plan.push(PlannedRequest::new(&EntropyDevice::default())?);
    plan.push(PlannedRequest::new(&InstanceActionInfo {
        action_type: ActionType::InstanceStart,
    })?);
    Ok(plan)
}

/// Refuses disks Firecracker cannot use, before anything starts.
pub fn check_disk(spec: &VmSpec) -> Result<(), VmmError> {
    if spec.rootfs.ephemeral {
        // Firecracker has no throwaway overlay: the caller gives each VM its own clone.
        return Err(VmmError::InvalidSpec(
            "Firecracker drives cannot be ephemeral; give the VM its own copy-on-write clone"
                .into(),
        ));
    }
    if spec.rootfs.format != crate::DiskFormat::Raw {
        return Err(VmmError::InvalidSpec(format!(
            "Firecracker supports raw disk images only, not {:?} ({}); use a raw clone \
             (reflink or copy) of the template",
            spec.rootfs.format,
            spec.rootfs.path.display()
        )));
    }
    Ok(())
}

/// `PATCH /vm`: stop or continue the vCPUs.
pub fn vm_state(state: VmRunState) -> Result<PlannedRequest, VmmError> {
    PlannedRequest::new(&VmStateRequest { state })
}

/// `PUT /actions SendCtrlAltDel`: the guest's keyboard controller gets Ctrl-Alt-Del.
pub fn ctrl_alt_del() -> Result<PlannedRequest, VmmError> {
    PlannedRequest::new(&InstanceActionInfo {
        action_type: ActionType::SendCtrlAltDel,
    })
}

/// `PUT /snapshot/create`: a full snapshot (the VM must be paused).
pub fn snapshot_create(state: &str, memory: &str) -> Result<PlannedRequest, VmmError> {
    PlannedRequest::new(&SnapshotCreateParams {
        snapshot_path: state.to_owned(),
        mem_file_path: memory.to_owned(),
        snapshot_type: Some(SnapshotType::Full),
    })
}

/// What a restored VM changes against its snapshot: the TAP device its interface uses and
/// the host socket of its vsock device (`None`: as saved).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOverrides {
    pub tap: Option<String>,
    pub vsock_uds: Option<String>,
}

/// `PUT /snapshot/load` on a fresh Firecracker, resuming the VM once loaded. The memory
/// file is mapped copy-on-write and must stay unchanged for the VM's whole life.
pub fn snapshot_load(
    state: &str,
    memory: &str,
    overrides: &RestoreOverrides,
) -> Result<PlannedRequest, VmmError> {
    PlannedRequest::new(&SnapshotLoadParams {
        snapshot_path: state.to_owned(),
        mem_backend: MemoryBackend {
            backend_type: MemoryBackendType::File,
            backend_path: memory.to_owned(),
        },
        resume_vm: Some(true),
        track_dirty_pages: None,
        network_overrides: overrides
            .tap
            .iter()
            .map(|tap| NetworkOverride {
                iface_id: NET_IFACE_ID.into(),
                host_dev_name: tap.clone(),
            })
            .collect(),
        vsock_override: overrides.vsock_uds.as_ref().map(|uds_path| VsockOverride {
            uds_path: uds_path.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DriveSpec, NetSpec};

    fn spec() -> VmSpec {
        let mut s = VmSpec::new(
            "fc1",
            "/k/vmlinux",
            DriveSpec::writable("/v/root.ext4"),
            "/run/fc1",
        );
        s.vcpus = 2;
        s.memory_mib = 512;
        s
    }

    fn paths() -> VmmPaths {
        VmmPaths {
            kernel: "/k/vmlinux".into(),
            rootfs: "/proc/self/fd/3".into(),
            vsock_uds: "/run/fc1/v.sock".into(),
        }
    }

    fn default_args() -> Vec<String> {
        super::super::DEFAULT_BOOT_ARGS
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }

    #[test]
    fn boot_plan_configures_then_starts() {
        let plan = boot_requests(&spec(), &default_args(), &paths()).expect("plan");
        let paths: Vec<_> = plan.iter().map(|r| (r.method, r.path.as_str())).collect();
        assert_eq!(
            paths,
            vec![
                (Method::Put, "/machine-config"),
                (Method::Put, "/boot-source"),
                (Method::Put, "/drives/rootfs"),
                (Method::Put, "/vsock"),
                (Method::Put, "/entropy"),
                (Method::Put, "/actions"),
            ]
        );
        assert_eq!(plan[0].body["vcpu_count"], 2);
        assert_eq!(plan[0].body["mem_size_mib"], 512);
        assert_eq!(plan[2].body["path_on_host"], "/proc/self/fd/3");
        assert_eq!(plan[3].body["guest_cid"], 3);
        assert_eq!(plan[3].body["uds_path"], "/run/fc1/v.sock");
        assert_eq!(plan[5].body["action_type"], "InstanceStart");
        let args = plan[1].body["boot_args"].as_str().expect("boot args");
        assert!(
            args.starts_with("console=ttyS0 reboot=k panic=1 pci=off")
                && args.contains("init=/sbin/nanobox-init")
                && args.ends_with(" rw"),
            "{args}"
        );
    }

    #[test]
    fn the_network_interface_carries_the_rate_limit_both_ways() {
        let mut s = spec();
        s.network = Some(NetSpec {
            tap: "nbx-tap0".into(),
            mac: "52:54:00:12:34:56".into(),
            rate_limit: Some(RateLimit {
                rate_bytes_per_sec: 10_000_000,
                burst_bytes: 5_000_000,
            }),
        });
        let plan = boot_requests(&s, &default_args(), &paths()).expect("plan");
        let net = plan
            .iter()
            .find(|r| r.path == "/network-interfaces/eth0")
            .expect("interface");
        assert_eq!(net.body["host_dev_name"], "nbx-tap0");
        assert_eq!(net.body["guest_mac"], "52:54:00:12:34:56");
        for dir in ["rx_rate_limiter", "tx_rate_limiter"] {
            assert_eq!(net.body[dir]["bandwidth"]["size"], 5_000_000, "{dir}");
            assert_eq!(net.body[dir]["bandwidth"]["refill_time"], 500, "{dir}");
            assert!(net.body[dir].get("ops").is_none());
        }
    }

    #[test]
    fn token_buckets_keep_the_rate_and_the_burst() {
        let b = token_bucket(&RateLimit {
            rate_bytes_per_sec: 1_000_000,
            burst_bytes: 250_000,
        })
        .expect("bucket");
        assert_eq!((b.size, b.refill_time), (250_000, 250));
        // A burst below 100 ms of traffic is raised so the rate survives rounding.
        let b = token_bucket(&RateLimit {
            rate_bytes_per_sec: 125_000_000,
            burst_bytes: 1500,
        })
        .expect("bucket");
        assert_eq!((b.size, b.refill_time), (12_500_000, 100));
        let b = token_bucket(&RateLimit {
            rate_bytes_per_sec: 3,
            burst_bytes: 0,
        })
        .expect("bucket");
        assert_eq!((b.size, b.refill_time), (1, 333));
        assert!(token_bucket(&RateLimit {
            rate_bytes_per_sec: 0,
            burst_bytes: 1,
        })
        .is_err());
    }

    #[test]
    fn ephemeral_and_qcow2_drives_are_refused() {
        let mut s = spec();
        s.rootfs.ephemeral = true;
        assert!(boot_requests(&s, &default_args(), &paths()).is_err());
        let mut s = spec();
        s.rootfs.format = crate::DiskFormat::Qcow2;
        let err = boot_requests(&s, &default_args(), &paths()).expect_err("qcow2");
        assert!(err.to_string().contains("raw disk images only"), "{err}");
    }

    #[test]
    fn restores_override_only_what_changed() {
        let plain =
            snapshot_load("/s/vmstate", "/s/memory", &RestoreOverrides::default()).expect("load");
        assert_eq!(plain.body["resume_vm"], true);
        assert_eq!(plain.body["mem_backend"]["backend_type"], "File");
        assert!(plain.body.get("network_overrides").is_none());
        assert!(plain.body.get("vsock_override").is_none());
        let moved = snapshot_load(
            "/s/vmstate",
            "/s/memory",
            &RestoreOverrides {
                tap: Some("tap9".into()),
                vsock_uds: Some("/run/b/v.sock".into()),
            },
        )
        .expect("load");
        assert_eq!(moved.body["network_overrides"][0]["host_dev_name"], "tap9");
        assert_eq!(moved.body["vsock_override"]["uds_path"], "/run/b/v.sock");
    }
}
