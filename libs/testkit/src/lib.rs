//! Real parts for tests. No mocks: a test that needs a VM gets a real guest booted from
//! the project's kernel and test rootfs.
//!
//! The artefacts are built by `cargo xtask test` (or `cargo xtask setup`), which exports
//! their paths in `NANOBOX_TEST_KERNEL` and `NANOBOX_TEST_ROOTFS`.
//!
//! [`postgres::Postgres`] and [`s3::S3Server`] start private PostgreSQL and S3 (SeaweedFS)
//! servers for the storage tests; both are installed by `cargo xtask setup`.
//! [`registry::Registry`] starts a private OCI registry (Debian's `docker-registry`).
//!
//! For the services' tests and benchmarks: [`process`] runs NanoBox binaries as real
//! processes, [`netns`] gives a node agent private network namespaces, [`config`] writes
//! their configuration files, [`node_agent::NodeAgent`] runs a node agent in its
//! namespaces, and [`template::publish_template`] publishes the test rootfs as a READY
//! template.
//!
//! For the observability tests: [`otlp::OtlpReceiver`] receives the spans services export
//! over OTLP, and [`prometheus::scrape`] reads a service's `/metrics`.

#![forbid(unsafe_code)]

pub mod config;
pub mod images;
pub mod netns;
pub mod node_agent;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod registry;
pub mod s3;
pub mod template;

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nanobox_guest_client::{AgentClient, ConfigureRequest};
use nanobox_vmm::qemu::{QemuBackend, QemuConfig};
use nanobox_vmm::{connect_agent, DriveSpec, Vm, VmBackend, VmSpec};

/// How long a test waits for a guest to boot. Generous: under TCG on a loaded 2-core
/// machine with tests running in parallel a boot can take several seconds. This is a
/// hang guard, not a performance assertion.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The guest kernel and test rootfs.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

impl GuestArtifacts {
    /// Reads the artefact paths from the environment, panicking with what to run when they
    /// are missing: a test that cannot find its guest must fail, not pass vacuously.
    pub fn from_env() -> Self {
        Self {
            kernel: env_file("NANOBOX_TEST_KERNEL"),
            rootfs: env_file("NANOBOX_TEST_ROOTFS"),
        }
    }
}

/// The file the environment variable `var` names: one of the artefacts `cargo xtask test`
/// builds and exports (the guest kernel, init and test rootfs). Panics saying what to run
/// when it is missing.
pub fn env_file(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: run the tests with `cargo xtask test`, which builds the guest \
             kernel, init and test rootfs and exports their paths"
        )
    });
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    path
}

/// The guest init (`NANOBOX_INIT`, exported by `cargo xtask test`) that the template-builder
/// injects into the root filesystems it builds.
pub fn guest_init() -> PathBuf {
    env_file("NANOBOX_INIT")
}

/// Calls `probe` every `every` until `done` holds for what it returns, and returns that;
/// panics naming `what` with the last answer once `limit` has passed (a hang guard, not a
/// performance assertion).
pub async fn wait_until<T: Debug>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let answer = probe().await;
        if done(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{what}: {answer:#?}");
        tokio::time::sleep(every).await;
    }
}

/// A unique, valid VM id for a test.
pub fn vm_id(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!("{clean}-{:08x}", rand::random::<u32>())
}

/// A booted test guest with a connected agent. Dropping it kills the VM.
#[derive(Debug)]
pub struct TestVm {
    pub vm: Box<dyn Vm>,
    pub agent: AgentClient,
    pub backend: QemuBackend,
}

impl TestVm {
    /// Boots the test rootfs (ephemeral: the image is never modified) with 128 MiB, 1 vCPU.
    pub async fn boot(name: &str) -> Self {
        Self::boot_with(name, |_| {}).await
    }

    /// Boots with a chance to adjust the spec first.
    pub async fn boot_with(name: &str, adjust: impl FnOnce(&mut VmSpec)) -> Self {
        let artifacts = GuestArtifacts::from_env();
        let backend = QemuBackend::new(QemuConfig::default());
        let id = vm_id(name);
        let mut spec = VmSpec::new(
            id.clone(),
            artifacts.kernel,
            DriveSpec {
                path: artifacts.rootfs,
                read_only: false,
                ephemeral: true,
                format: nanobox_vmm::DiskFormat::Raw,
            },
            std::env::temp_dir().join(format!("nanobox-test-{id}")),
        );
        adjust(&mut spec);
        let vm = backend
            .launch(spec)
            .await
            .unwrap_or_else(|e| panic!("launching {id}: {e}"));
        let agent = match connect_agent(vm.as_ref(), BOOT_TIMEOUT).await {
            Ok(agent) => agent,
            Err(e) => panic!(
                "guest {id} did not come up: {e}\nconsole:\n{}",
                vm.console_tail()
            ),
        };
        agent
            .configure(
                ConfigureRequest {
                    hostname: "testvm".into(),
                    entropy_seed: rand::random::<[u8; 32]>().to_vec(),
                    ..ConfigureRequest::default()
                },
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|e| panic!("configuring {id}: {e}"));
        Self { vm, agent, backend }
    }
}
