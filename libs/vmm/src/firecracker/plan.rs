//! From a backend-neutral [`VmSpec`] to the Firecracker requests that boot it, in order.

use std::path::Path;

use serde_json::Value;

use super::api::{
    self, ActionType, ApiRequest, BootSource, Drive, EntropyDevice, InstanceActionInfo,
    MachineConfiguration, Method, Vsock,
};
use crate::{VmSpec, VmmError};

/// Guest port the agent listens on (AF_VSOCK); the host sends `CONNECT <port>`.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest's vsock CID. Every microVM has its own vsock device and host socket, so one
/// fixed CID serves all of them (3 is the first CID a guest may use).
pub const GUEST_CID: u32 = 3;

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

/// The kernel command line for Firecracker.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut args = vec![
        "console=ttyS0",
        // Firecracker's only way out of the guest is the i8042 reset.
        "reboot=k",
        "panic=1",
        "pci=off",
        "root=/dev/vda",
        if spec.rootfs.read_only { "ro" } else { "rw" },
        "quiet",
        "init=/sbin/nanobox-init",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    args.extend(spec.extra_kernel_args.iter().cloned());
    args.join(" ")
}

fn path_str<'a>(what: &str, path: &'a Path) -> Result<&'a str, VmmError> {
    path.to_str().ok_or_else(|| {
        VmmError::InvalidSpec(format!("{what} path {} is not UTF-8", path.display()))
    })
}

/// The requests that configure `spec` and start it: machine, kernel, root drive, vsock for
/// the agent (socket at `vsock_uds`), an entropy device, then InstanceStart.
pub fn boot_requests(spec: &VmSpec, vsock_uds: &Path) -> Result<Vec<PlannedRequest>, VmmError> {
    if spec.rootfs.ephemeral {
        // Firecracker has no throwaway overlay: the caller gives each VM its own clone.
        return Err(VmmError::InvalidSpec(
            "Firecracker drives cannot be ephemeral; give the VM its own copy-on-write clone"
                .into(),
        ));
    }
    Ok(vec![
        PlannedRequest::new(&MachineConfiguration {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
            smt: Some(false),
            track_dirty_pages: None,
            huge_pages: None,
        })?,
        PlannedRequest::new(&BootSource {
            kernel_image_path: path_str("kernel", &spec.kernel)?.to_owned(),
            boot_args: Some(kernel_cmdline(spec)),
            initrd_path: None,
        })?,
        PlannedRequest::new(&Drive {
            drive_id: "rootfs".into(),
            is_root_device: true,
            is_read_only: spec.rootfs.read_only,
            path_on_host: path_str("rootfs", &spec.rootfs.path)?.to_owned(),
            cache_type: Some(api::CacheType::Unsafe),
            io_engine: None,
            rate_limiter: None,
        })?,
        PlannedRequest::new(&Vsock {
            guest_cid: GUEST_CID,
            uds_path: path_str("vsock socket", vsock_uds)?.to_owned(),
        })?,
        PlannedRequest::new(&EntropyDevice::default())?,
        PlannedRequest::new(&InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        })?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriveSpec;

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

    #[test]
    fn boot_plan_configures_then_starts() {
        let plan = boot_requests(&spec(), Path::new("/run/fc1/v.sock")).expect("plan");
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
        assert_eq!(plan[2].body["path_on_host"], "/v/root.ext4");
        assert_eq!(plan[3].body["guest_cid"], 3);
        assert_eq!(plan[5].body["action_type"], "InstanceStart");
        let args = plan[1].body["boot_args"].as_str().expect("boot args");
        assert!(
            args.contains("reboot=k") && args.contains("init=/sbin/nanobox-init"),
            "{args}"
        );
    }

    #[test]
    fn ephemeral_drives_are_refused() {
        let mut s = spec();
        s.rootfs.ephemeral = true;
        assert!(boot_requests(&s, Path::new("/v.sock")).is_err());
    }
}
