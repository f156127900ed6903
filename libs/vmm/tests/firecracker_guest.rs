//! End-to-end tests of the Firecracker backend with a real guest: the project's kernel,
//! the test rootfs and nanobox-init, reached over Firecracker's vsock.
//!
//! They need a `firecracker` binary (`FIRECRACKER_BIN`, or on PATH) and a /dev/kvm that
//! runs normal guests (checked with a probe boot: a nested PVM host has /dev/kvm but
//! cannot). Where either is missing each test says why on stderr and passes without
//! running; the fake-Firecracker tests (firecracker_backend.rs) run everywhere. The jailer
//! test further needs a `jailer` binary (`JAILER_BIN`, or on PATH) and root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nanobox_guest_client::{AgentClient, ConfigureRequest, ExecRequest, ExitOutcome};
use nanobox_vmm::firecracker::{
    check_available, check_kvm, find_binary, wait_for_agent, FirecrackerBackend, FirecrackerConfig,
    JailerConfig,
};
use nanobox_vmm::{DriveSpec, Vm, VmBackend, VmSpec, VmState};

/// Guards against hangs; never a performance assertion.
const GUARD: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

/// What a test needs to boot guests, or `None` (after saying why) where it cannot run.
struct Env {
    cfg: FirecrackerConfig,
    kernel: PathBuf,
    rootfs: PathBuf,
    work: tempfile::TempDir,
}

fn skip(test: &str, reason: impl std::fmt::Display) -> Option<Env> {
    eprintln!("skipping {test}: {reason}");
    None
}

async fn env(test: &str) -> Option<Env> {
    let binary = std::env::var_os("FIRECRACKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "firecracker".into());
    if find_binary(&binary).is_none() {
        return skip(
            test,
            format!(
                "no firecracker binary ({} not found; set FIRECRACKER_BIN or put it on PATH)",
                binary.display()
            ),
        );
    }
    if let Err(why) = check_kvm() {
        return skip(test, format!("/dev/kvm not usable: {why}"));
    }
    // From here on the host can run Firecracker: missing guest artefacts are a failure.
    let (kernel, rootfs) = guest_artifacts();
    let cfg = FirecrackerConfig {
        binary,
        ..FirecrackerConfig::default()
    };
    if let Err(why) = check_available(&cfg, Some(&kernel)).await {
        return skip(test, why);
    }
    Some(Env {
        cfg,
        kernel,
        rootfs,
        work: tempfile::tempdir().expect("tempdir"),
    })
}

/// The kernel and test rootfs: from `cargo xtask test`'s variables, else the newest in
/// the cache (`NANOBOX_CACHE_DIR`, default ~/.cache/nanobox).
fn guest_artifacts() -> (PathBuf, PathBuf) {
    if let (Some(k), Some(r)) = (
        std::env::var_os("NANOBOX_TEST_KERNEL"),
        std::env::var_os("NANOBOX_TEST_ROOTFS"),
    ) {
        return (k.into(), r.into());
    }
    let cache = std::env::var_os("NANOBOX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/nanobox")))
        .expect("NANOBOX_CACHE_DIR or HOME");
    let kernel = cache.join("vmlinux");
    let rootfs = std::fs::read_dir(cache.join("rootfs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("test-"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path());
    match (kernel.is_file(), rootfs) {
        (true, Some(rootfs)) => (kernel, rootfs),
        _ => panic!(
            "Firecracker can run here but the guest kernel and test rootfs are missing: \
             run the tests with `cargo xtask test` (or `cargo xtask setup`)"
        ),
    }
}

impl Env {
    /// A private sparse copy of the test rootfs: Firecracker writes the disk it is given.
    fn disk(&self, name: &str) -> PathBuf {
        let dst = self.work.path().join(name);
        let status = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&self.rootfs)
            .arg(&dst)
            .status()
            .expect("cp");
        assert!(status.success());
        dst
    }

    fn spec(&self, id: &str, disk: &Path) -> VmSpec {
        let id = nanobox_testkit::vm_id(id);
        VmSpec::new(
            id.clone(),
            &self.kernel,
            DriveSpec::writable(disk),
            self.work.path().join(format!("run-{id}")),
        )
    }
}

async fn agent(vm: &dyn Vm) -> AgentClient {
    match wait_for_agent(vm, GUARD).await {
        Ok(agent) => agent,
        Err(e) => panic!(
            "guest agent over vsock: {e}\nconsole:\n{}",
            vm.console_tail()
        ),
    }
}

async fn configure(agent: &AgentClient) {
    agent
        .configure(
            ConfigureRequest {
                hostname: "fcvm".into(),
                unix_time_ns: Some(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .expect("clock")
                        .as_nanos() as u64,
                ),
                entropy_seed: rand::random::<[u8; 32]>().to_vec(),
                ..ConfigureRequest::default()
            },
            GUARD,
        )
        .await
        .expect("configure");
}

async fn sh(agent: &AgentClient, script: &str) -> String {
    let out = tokio::time::timeout(
        GUARD,
        agent.run(ExecRequest::new(["sh", "-c", script]), 16 * MIB),
    )
    .await
    .expect("exec hung")
    .unwrap_or_else(|e| panic!("{script:?}: {e}"));
    assert_eq!(out.status.outcome, ExitOutcome::Code(0), "{script:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_boots_the_guest_runs_commands_pauses_and_shuts_down() {
    let Some(env) = env("firecracker_boots_the_guest_runs_commands_pauses_and_shuts_down").await
    else {
        return;
    };
    let backend = FirecrackerBackend::new(env.cfg.clone());
    let disk = env.disk("boot.ext4");
    let mut spec = env.spec("fc-boot", &disk);
    spec.vcpus = 2;
    let vm = backend.launch(spec).await.expect("launch");
    let agent = agent(vm.as_ref()).await;
    configure(&agent).await;
    assert_eq!(sh(&agent, "echo hello; hostname").await, "hello\nfcvm\n");
    let info = agent.info(GUARD).await.expect("info");
    assert_eq!(info.cpus, 2);

    vm.pause().await.expect("pause");
    assert_eq!(vm.state(), VmState::Paused);
    let pending = {
        let agent = agent.clone();
        tokio::spawn(async move { sh(&agent, "echo after resume").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a paused guest answered");
    vm.resume().await.expect("resume");
    assert_eq!(pending.await.expect("task"), "after resume\n");

    // The guest resets on Shutdown and Firecracker exits cleanly.
    agent.shutdown(GUARD).await.expect("shutdown");
    let exit = tokio::time::timeout(GUARD, vm.wait())
        .await
        .expect("VM did not exit");
    assert_eq!(exit.code, Some(0), "{exit}");
    assert!(!vm.run_dir().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_snapshot_restores_memory_disk_and_processes_into_a_new_vm() {
    let Some(env) =
        env("firecracker_snapshot_restores_memory_disk_and_processes_into_a_new_vm").await
    else {
        return;
    };
    let backend = FirecrackerBackend::new(env.cfg.clone());
    let disk = env.disk("snap.ext4");
    let a = backend
        .launch(env.spec("fc-snap-a", &disk))
        .await
        .expect("launch");
    let agent_a = agent(a.as_ref()).await;
    configure(&agent_a).await;
    sh(
        &agent_a,
        "echo in-memory > /tmp/ram-marker; echo on-disk > /root/disk-marker; sync; \
         (i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done) \
         >/dev/null 2>&1 &",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let snap = env.work.path().join("snap");
    let info = tokio::time::timeout(GUARD, a.snapshot(&snap))
        .await
        .expect("snapshot hung")
        .expect("snapshot");
    assert_eq!(a.state(), VmState::Paused);
    assert!(info.state_bytes >= 128 * 1024 * 1024, "{info:?}");
    // The source never runs again (one VM per snapshot state, as Firecracker advises).
    drop(agent_a);
    a.kill();
    a.wait().await;

    // A new VM on the same disk, with its own run dir and vsock socket.
    let b = tokio::time::timeout(GUARD, backend.restore(env.spec("fc-snap-b", &disk), &snap))
        .await
        .expect("restore hung")
        .expect("restore");
    assert_eq!(b.state(), VmState::Running);
    // Firecracker reset the vsock transport at the snapshot: the agent is reached anew.
    let agent_b = agent(b.as_ref()).await;
    configure(&agent_b).await;
    assert_eq!(
        sh(&agent_b, "cat /tmp/ram-marker /root/disk-marker").await,
        "in-memory\non-disk\n"
    );
    let count = |s: String| s.trim().parse::<u64>().expect("counter");
    let first = count(sh(&agent_b, "cat /tmp/counter").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = count(sh(&agent_b, "cat /tmp/counter").await);
    assert!(later > first, "counter stuck at {first} -> {later}");
    b.kill();
    b.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_under_the_jailer_boots_the_guest() {
    let test = "firecracker_under_the_jailer_boots_the_guest";
    let Some(env) = env(test).await else {
        return;
    };
    let jailer = std::env::var_os("JAILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "jailer".into());
    if find_binary(&jailer).is_none() {
        skip(test, "no jailer binary (set JAILER_BIN or put it on PATH)");
        return;
    }
    if !nix::unistd::getuid().is_root() {
        skip(test, "the jailer needs root");
        return;
    }
    // The jail hard-links the disk: the chroot base is on the disk's file system.
    let mut jail = JailerConfig::new(65534, 65534);
    jail.binary = jailer;
    jail.chroot_base = env.work.path().join("jails");
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        jailer: Some(jail),
        ..env.cfg.clone()
    });
    let disk = env.disk("jailed.ext4");
    let vm = backend
        .launch(env.spec("fc-jail", &disk))
        .await
        .expect("launch");
    let agent = agent(vm.as_ref()).await;
    assert_eq!(sh(&agent, "echo jailed; id -u").await, "jailed\n0\n");
    vm.kill();
    vm.wait().await;
    // The jail is gone; only the per-binary directory the jailer files jails under stays.
    for binary_dir in std::fs::read_dir(env.work.path().join("jails")).expect("jails") {
        let binary_dir = binary_dir.expect("entry").path();
        let left: Vec<_> = std::fs::read_dir(&binary_dir).expect("dir").collect();
        assert!(
            left.is_empty(),
            "{} still holds {left:?}",
            binary_dir.display()
        );
    }
}
