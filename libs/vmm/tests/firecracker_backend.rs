//! The Firecracker backend driven against a fake Firecracker, on any machine.
//!
//! The fake is this test binary itself: the backend under test runs a small wrapper
//! script (named `firecracker`, or `jailer`) that records its arguments and execs this
//! binary with only `fake_firecracker_process` selected. That entry point serves
//! Firecracker's API on the socket it was told to create, answers as Firecracker does
//! (204, 200 with instance info, 400 with `{"fault_message": ...}`), records every request,
//! prints a console on stdout, writes to its log, binds the vsock socket, reads the root
//! disk through the path it was given, writes and loads snapshot files, and exits on
//! Ctrl-Alt-Del. The tests check what was sent (order and every body against
//! Firecracker's published schema) and how the backend handles the answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "firecracker_schema.rs"]
mod schema;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanobox_vmm::firecracker::{
    wait_for_agent, FirecrackerBackend, FirecrackerConfig, JailerConfig,
};
use nanobox_vmm::{
    AgentEndpoint, BackendKind, DiskFormat, DriveSpec, NetSpec, RateLimit, Vm, VmBackend, VmSpec,
    VmState, VmmError,
};
use serde_json::Value;

const FAKE_DIR: &str = "NANOBOX_FAKE_FC_DIR";
const FAKE_MODE: &str = "NANOBOX_FAKE_FC_MODE";
/// The first bytes of the test's root disk; the fake prints what it reads there.
const DISK_MAGIC: &[u8] = b"NBXROOT!";
/// Hang guard for waits in these tests, never a timing assertion.
const GUARD: Duration = Duration::from_secs(30);

/// The fake Firecracker's entry point when this binary is run by a wrapper script (see
/// the module docs); an ordinary test run passes through it doing nothing.
#[test]
fn fake_firecracker_process() {
    if let Some(dir) = std::env::var_os(FAKE_DIR) {
        fake::main(PathBuf::from(dir));
    }
}

// ---------------------------------------------------------------------------------------
// Test side
// ---------------------------------------------------------------------------------------

/// A fake Firecracker (and jailer) in its own directory, where it records what it saw.
struct Fake {
    dir: PathBuf,
    firecracker: PathBuf,
    jailer: PathBuf,
}

impl Fake {
    /// `mode`: comma-separated behaviours (see `fake::Mode`).
    fn new(base: &Path, name: &str, mode: &str) -> Self {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).expect("fake dir");
        let exe = std::env::current_exe().expect("test binary");
        let script = |file: &str, mode: &str| {
            let path = dir.join(file);
            let text = format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{dir}/args'\n\
                 exec env {FAKE_DIR}='{dir}' {FAKE_MODE}='{mode}' '{exe}' \
                 fake_firecracker_process --exact --nocapture --test-threads=1\n",
                dir = dir.display(),
                exe = exe.display(),
            );
            std::fs::write(&path, text).expect("write script");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            path
        };
        let firecracker = script("firecracker", mode);
        let jailer = script("jailer", &format!("jailer,{mode}"));
        Self {
            dir,
            firecracker,
            jailer,
        }
    }

    fn config(&self) -> FirecrackerConfig {
        FirecrackerConfig {
            binary: self.firecracker.clone(),
            api_socket_timeout: GUARD,
            ..FirecrackerConfig::default()
        }
    }

    fn backend(&self) -> FirecrackerBackend {
        FirecrackerBackend::new(self.config())
    }

    /// The arguments the fake (or its jailer) was started with.
    fn args(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("args"))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn started(&self) -> bool {
        self.dir.join("args").exists()
    }

    fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("pid")).expect("fake wrote its pid");
        text.trim().parse().expect("pid")
    }

    /// Every API request received, in order.
    fn requests(&self) -> Vec<Recorded> {
        let text = std::fs::read_to_string(self.dir.join("requests.jsonl")).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).expect("recorded request"))
            .collect()
    }

    fn calls(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }
}

#[derive(Debug, serde::Deserialize)]
struct Recorded {
    method: String,
    path: String,
    body: Value,
}

/// The schema definition a request to `path` must follow, from the API's paths (not
/// from the backend's own labels: this checks what went over the wire).
fn definition_for(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("PUT", "/machine-config") => "MachineConfiguration",
        ("PUT", "/boot-source") => "BootSource",
        ("PUT", p) if p.starts_with("/drives/") => "Drive",
        ("PUT", p) if p.starts_with("/network-interfaces/") => "NetworkInterface",
        ("PATCH", p) if p.starts_with("/network-interfaces/") => "PartialNetworkInterface",
        ("PUT", "/vsock") => "Vsock",
        ("PUT", "/entropy") => "EntropyDevice",
        ("PUT", "/actions") => "InstanceActionInfo",
        ("PATCH", "/vm") => "Vm",
        ("PUT", "/snapshot/create") => "SnapshotCreateParams",
        ("PUT", "/snapshot/load") => "SnapshotLoadParams",
        other => panic!("the backend sent an unexpected request {other:?}"),
    }
}

/// Checks every recorded body against the published schema.
fn assert_schema(requests: &[Recorded]) {
    let defs = schema::definitions();
    for r in requests.iter().filter(|r| r.method != "GET") {
        let name = definition_for(&r.method, &r.path);
        let errors = schema::validate(&defs, name, &r.body, name);
        assert!(
            errors.is_empty(),
            "{} {}: {}\n{}",
            r.method,
            r.path,
            r.body,
            errors.join("\n")
        );
    }
}

/// A kernel and root disk to name in specs (the fake reads the disk's first bytes).
fn guest_files(base: &Path) -> (PathBuf, PathBuf) {
    let kernel = base.join("vmlinux");
    let rootfs = base.join("rootfs.ext4");
    if !rootfs.exists() {
        std::fs::write(&kernel, b"not really a kernel").expect("kernel");
        let mut disk = DISK_MAGIC.to_vec();
        disk.resize(4096, 0);
        std::fs::write(&rootfs, disk).expect("disk");
    }
    (kernel, rootfs)
}

fn spec(base: &Path, id: &str) -> VmSpec {
    let (kernel, rootfs) = guest_files(base);
    VmSpec::new(
        id,
        kernel,
        DriveSpec::writable(rootfs),
        base.join(format!("run-{id}")),
    )
}

fn network(tap: &str) -> NetSpec {
    NetSpec {
        tap: tap.into(),
        mac: "52:54:00:12:34:56".into(),
        rate_limit: None,
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `done` until it holds, failing after the guard.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn console_shows(vm: &dyn Vm, text: &str) {
    eventually(&format!("console line {text:?}"), || {
        vm.console_tail().contains(text)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_applies_the_boot_plan_in_order_and_every_body_matches_the_schema() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "");
    let backend = fake.backend();
    assert_eq!(backend.kind(), BackendKind::Firecracker);
    let caps = backend.capabilities();
    assert!(caps.pause && caps.snapshot && caps.hardware_accel);

    let mut s = spec(base.path(), "fc-plan");
    s.vcpus = 2;
    s.memory_mib = 256;
    s.extra_kernel_args = vec!["nanobox.x=1".into()];
    s.network = Some(NetSpec {
        rate_limit: Some(RateLimit {
            rate_bytes_per_sec: 12_500_000,
            burst_bytes: 2_500_000,
        }),
        ..network("nbx-tap0")
    });
    let vm = backend.launch(s.clone()).await.expect("launch");

    let requests = fake.requests();
    assert_eq!(
        fake.calls(),
        [
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /entropy",
            "PUT /actions",
        ]
    );
    assert_schema(&requests);
    assert_eq!(requests[0].body["vcpu_count"], 2);
    assert_eq!(requests[0].body["mem_size_mib"], 256);
    assert_eq!(
        requests[1].body["kernel_image_path"],
        s.kernel.to_str().expect("utf-8")
    );
    let boot_args = requests[1].body["boot_args"].as_str().expect("boot args");
    assert!(
        boot_args.starts_with("console=ttyS0 reboot=k panic=1 pci=off")
            && boot_args.ends_with(" rw nanobox.x=1"),
        "{boot_args}"
    );
    assert_eq!(requests[2].body["path_on_host"], "/proc/self/fd/3");
    assert_eq!(requests[2].body["is_root_device"], true);
    // The rate limit, both directions: a 2.5 MB bucket refilled in 200 ms is 12.5 MB/s.
    let net = &requests[3].body;
    assert_eq!(net["host_dev_name"], "nbx-tap0");
    assert_eq!(net["guest_mac"], "52:54:00:12:34:56");
    for direction in ["rx_rate_limiter", "tx_rate_limiter"] {
        let bucket = &net[direction]["bandwidth"];
        assert_eq!(
            (bucket["size"].as_u64(), bucket["refill_time"].as_u64()),
            (Some(2_500_000), Some(200)),
            "{direction}: {net}"
        );
    }
    let vsock = s.run_dir.join("v.sock");
    assert_eq!(requests[4].body["uds_path"], vsock.to_str().expect("utf-8"));
    assert_eq!(requests[6].body["action_type"], "InstanceStart");

    // The fake opened the disk by the path it was given: the inherited descriptor is
    // the spec's disk.
    console_shows(vm.as_ref(), "rootfs begins NBXROOT!").await;
    assert_eq!(
        vm.agent_endpoint(),
        AgentEndpoint::FirecrackerVsock {
            uds: vsock.clone(),
            port: 1024
        }
    );
    assert!(vsock.exists(), "Firecracker binds the vsock socket");
    assert_eq!(vm.state(), VmState::Running);
    assert_eq!(vm.run_dir(), s.run_dir);
    assert_eq!(vm.pid(), Some(fake.pid()));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&s.run_dir)
            .expect("run dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "the run dir is private");
    }
    let args = fake.args();
    let api = s.run_dir.join("api.sock");
    let log = s.run_dir.join("firecracker.log");
    assert_eq!(
        args,
        [
            "--api-sock",
            api.to_str().expect("utf-8"),
            "--log-path",
            log.to_str().expect("utf-8"),
            "--level",
            "Warning",
            "--id",
            "fc-plan",
        ]
    );
    let exit = vm.stop(GUARD).await.expect("stop");
    assert_eq!(exit.code, Some(0), "{exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refusals_become_typed_errors_and_leave_nothing_behind() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "fault-drive");
    let s = spec(base.path(), "fc-fault");
    let err = fake.backend().launch(s.clone()).await.expect_err("refused");
    match &err {
        VmmError::FirecrackerApi {
            request,
            status,
            fault_message,
        } => {
            assert_eq!(request, "PUT /drives/rootfs");
            assert_eq!(*status, 400);
            assert!(
                fault_message.starts_with("Unable to open the block device"),
                "{fault_message}"
            );
        }
        other => panic!("expected a typed API error, got {other:?}"),
    }
    assert!(err.to_string().contains("Unable to open the block device"));
    // launch returned only once the VMM was gone and its directory removed.
    assert!(!alive(fake.pid()), "the refused VMM still runs");
    assert!(!s.run_dir.exists(), "the run dir is left behind");
    assert_eq!(
        fake.calls(),
        [
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_never_creates_its_api_socket_times_out() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "no-socket");
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        api_socket_timeout: Duration::from_millis(500),
        ..fake.config()
    });
    let s = spec(base.path(), "fc-nosock");
    let started = Instant::now();
    let err = backend.launch(s.clone()).await.expect_err("no socket");
    assert!(
        matches!(err, VmmError::Timeout(d, "the Firecracker API socket") if d == Duration::from_millis(500)),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("timed out after 500ms waiting for the Firecracker API socket"),
        "{err}"
    );
    assert!(started.elapsed() < GUARD);
    assert!(!alive(fake.pid()), "the hung VMM still runs");
    assert!(!s.run_dir.exists(), "the run dir is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_exits_at_once_is_reported_with_its_own_words() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "exit-at-once");
    let s = spec(base.path(), "fc-exit");
    let err = fake.backend().launch(s.clone()).await.expect_err("exits");
    let text = err.to_string();
    assert!(matches!(err, VmmError::Exited(_)), "{err:?}");
    assert!(
        text.contains("exit code 1") && text.contains("invalid configuration file"),
        "{text}"
    );
    assert!(!s.run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_vm_kills_the_vmm_and_removes_its_run_dir() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "");
    let s = spec(base.path(), "fc-drop");
    let vm = fake.backend().launch(s.clone()).await.expect("launch");
    let pid = vm.pid().expect("pid");
    assert!(alive(pid) && s.run_dir.exists());
    drop(vm);
    eventually("the VMM's death", || !alive(pid)).await;
    eventually("the run dir's removal", || !s.run_dir.exists()).await;
    // The disk is the caller's and stays.
    assert!(s.rootfs.path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_snapshot_and_restore_drive_the_api() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake_a = Fake::new(base.path(), "fc-a", "");
    let mut spec_a = spec(base.path(), "fc-a");
    spec_a.network = Some(network("tap-a"));
    let a = fake_a
        .backend()
        .launch(spec_a.clone())
        .await
        .expect("launch");

    a.pause().await.expect("pause");
    assert_eq!(a.state(), VmState::Paused);
    a.resume().await.expect("resume");
    assert_eq!(a.state(), VmState::Running);
    let snap = base.path().join("snap");
    let info = a.snapshot(&snap).await.expect("snapshot");
    assert_eq!(a.state(), VmState::Paused, "a snapshotted VM stays paused");

    let requests = fake_a.requests();
    assert_schema(&requests);
    let state_partial = snap.join("vmstate.partial");
    let memory_partial = snap.join("memory.partial");
    let after_boot: Vec<_> = requests[7..]
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str(), r.body.clone()))
        .collect();
    assert_eq!(
        after_boot,
        [
            ("PATCH", "/vm", serde_json::json!({"state": "Paused"})),
            ("PATCH", "/vm", serde_json::json!({"state": "Resumed"})),
            ("PATCH", "/vm", serde_json::json!({"state": "Paused"})),
            ("GET", "/", Value::Null),
            (
                "PUT",
                "/snapshot/create",
                serde_json::json!({
                    "snapshot_path": state_partial.to_str().expect("utf-8"),
                    "mem_file_path": memory_partial.to_str().expect("utf-8"),
                    "snapshot_type": "Full",
                })
            ),
        ]
    );
    // Written beside, then renamed into place; the manifest last.
    assert!(!state_partial.exists() && !memory_partial.exists());
    let size = |name: &str| std::fs::metadata(snap.join(name)).expect(name).len();
    assert_eq!(info.state_bytes, size("vmstate") + size("memory"));
    assert_eq!((info.memory_mib, info.vcpus), (128, 1));
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(snap.join("snapshot.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["backend"], "firecracker");
    assert_eq!(manifest["vmm_version"], "1.17.0-fake");
    assert_eq!(manifest["drive_path"], "/proc/self/fd/3");
    assert_eq!(
        manifest["vsock_uds"],
        spec_a.run_dir.join("v.sock").to_str().expect("utf-8")
    );
    assert_eq!(manifest["network"]["tap"], "tap-a");

    // Restore into a fresh Firecracker with another run dir and TAP, while A still holds
    // its vsock socket: the load must move the socket (Firecracker binds it on load).
    let fake_b = Fake::new(base.path(), "fc-b", "");
    let mut spec_b = spec(base.path(), "fc-b");
    spec_b.network = Some(network("tap-b"));
    let b = fake_b
        .backend()
        .restore(spec_b.clone(), &snap)
        .await
        .expect("restore");
    assert_eq!(b.state(), VmState::Running);
    let requests = fake_b.requests();
    assert_schema(&requests);
    assert_eq!(fake_b.calls(), ["PUT /snapshot/load"]);
    let load = &requests[0].body;
    assert_eq!(
        load["snapshot_path"],
        snap.join("vmstate").to_str().expect("utf-8")
    );
    assert_eq!(load["mem_backend"]["backend_type"], "File");
    assert_eq!(
        load["mem_backend"]["backend_path"],
        snap.join("memory").to_str().expect("utf-8")
    );
    assert_eq!(load["resume_vm"], true);
    assert_eq!(
        load["network_overrides"],
        serde_json::json!([{"iface_id": "eth0", "host_dev_name": "tap-b"}])
    );
    let vsock_b = spec_b.run_dir.join("v.sock");
    assert_eq!(
        load["vsock_override"]["uds_path"],
        vsock_b.to_str().expect("utf-8")
    );
    assert!(spec_a.run_dir.join("v.sock").exists() && vsock_b.exists());
    // The restored VM opened the restoring spec's disk through the same descriptor path.
    console_shows(b.as_ref(), "restored; rootfs begins NBXROOT!").await;

    // Snapshotting the restored VM over the snapshot it maps renames new files in; it
    // never writes the mapped memory file in place.
    let info_b = b.snapshot(&snap).await.expect("second snapshot");
    assert_eq!(info_b.dir, snap);
    assert!(snap.join("snapshot.json").exists());

    a.stop(GUARD).await.expect("stop a");
    b.stop(GUARD).await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_snapshot_load_ends_the_restore_cleanly() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake_a = Fake::new(base.path(), "fc-a", "");
    let a = fake_a
        .backend()
        .launch(spec(base.path(), "fc-a"))
        .await
        .expect("launch");
    let snap = base.path().join("snap");
    a.snapshot(&snap).await.expect("snapshot");
    drop(a);
    std::fs::write(snap.join("vmstate"), b"garbage").expect("corrupt");

    let fake_b = Fake::new(base.path(), "fc-b", "");
    let spec_b = spec(base.path(), "fc-b");
    let err = fake_b
        .backend()
        .restore(spec_b.clone(), &snap)
        .await
        .expect_err("corrupt snapshot");
    match &err {
        VmmError::FirecrackerApi {
            request,
            fault_message,
            ..
        } => {
            assert_eq!(request, "PUT /snapshot/load");
            assert!(
                fault_message.contains("Load snapshot error"),
                "{fault_message}"
            );
        }
        other => panic!("expected a typed API error, got {other:?}"),
    }
    assert!(!alive(fake_b.pid()));
    assert!(!spec_b.run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_snapshots_of_another_machine_before_starting_anything() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake_a = Fake::new(base.path(), "fc-a", "");
    let a = fake_a
        .backend()
        .launch(spec(base.path(), "fc-a"))
        .await
        .expect("launch");
    let snap = base.path().join("snap");
    a.snapshot(&snap).await.expect("snapshot");
    drop(a);

    let fake_b = Fake::new(base.path(), "fc-b", "");
    let mut bigger = spec(base.path(), "fc-b");
    bigger.memory_mib = 256;
    let err = fake_b
        .backend()
        .restore(bigger.clone(), &snap)
        .await
        .expect_err("other machine");
    assert!(err.to_string().contains("128 MiB / 1 vCPU"), "{err}");
    let mut with_net = spec(base.path(), "fc-b");
    with_net.network = Some(network("tap-x"));
    assert!(matches!(
        fake_b.backend().restore(with_net, &snap).await,
        Err(VmmError::InvalidSpec(_))
    ));
    // A QEMU snapshot is named for what it is.
    let qemu = base.path().join("qemu-snap");
    std::fs::create_dir(&qemu).expect("dir");
    std::fs::write(
        qemu.join("snapshot.json"),
        r#"{"backend":"qemu","format":1,"memory_mib":128,"vcpus":1}"#,
    )
    .expect("manifest");
    let err = fake_b
        .backend()
        .restore(spec(base.path(), "fc-b"), &qemu)
        .await
        .expect_err("qemu snapshot");
    assert!(err.to_string().contains("is a qemu snapshot"), "{err}");
    assert!(!fake_b.started(), "nothing was started");
    assert!(!bigger.run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sends_ctrl_alt_del_then_kills_after_the_grace() {
    let base = tempfile::tempdir().expect("tempdir");

    // A guest that reboots on Ctrl-Alt-Del: Firecracker exits by itself.
    let fake = Fake::new(base.path(), "fc-cad", "");
    let vm = fake
        .backend()
        .launch(spec(base.path(), "fc-cad"))
        .await
        .expect("launch");
    let exit = vm.stop(GUARD).await.expect("stop");
    assert_eq!((exit.code, exit.signal), (Some(0), None), "{exit}");
    let last = fake.requests().pop().expect("requests");
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), &last.body),
        (
            "PUT",
            "/actions",
            &serde_json::json!({"action_type": "SendCtrlAltDel"})
        )
    );
    assert_eq!(vm.state(), VmState::Exited);

    // A guest that ignores it: killed once the grace is over.
    let fake = Fake::new(base.path(), "fc-deaf", "ignore-ctrl-alt-del");
    let vm = fake
        .backend()
        .launch(spec(base.path(), "fc-deaf"))
        .await
        .expect("launch");
    let started = Instant::now();
    let exit = vm.stop(Duration::from_millis(300)).await.expect("stop");
    assert_eq!((exit.code, exit.signal), (None, Some(9)), "{exit}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A paused guest cannot act on it: killed at once, nothing sent.
    let fake = Fake::new(base.path(), "fc-paused", "");
    let vm = fake
        .backend()
        .launch(spec(base.path(), "fc-paused"))
        .await
        .expect("launch");
    vm.pause().await.expect("pause");
    let exit = vm.stop(GUARD).await.expect("stop");
    assert_eq!(exit.signal, Some(9), "{exit}");
    assert_eq!(
        fake.calls()[6..],
        ["PATCH /vm"],
        "only the pause after boot"
    );

    // kill and wait on an exited VM are harmless.
    vm.kill();
    assert_eq!(vm.wait().await.signal, Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_vmm_log_are_kept_apart_and_bounded() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "chatty");
    let mut s = spec(base.path(), "fc-chatty");
    s.console_limit = 1024;
    let vm = fake.backend().launch(s).await.expect("launch");
    console_shows(vm.as_ref(), "END OF CHATTER").await;
    let console = vm.console_tail();
    assert!(
        console.len() <= 1024,
        "console kept {} bytes",
        console.len()
    );
    assert!(
        !console.contains("fake firecracker log"),
        "Firecracker's log leaked into the console: {console}"
    );
    let exit = vm.stop(GUARD).await.expect("stop");
    assert!(
        exit.stderr_tail
            .contains("WARN fake firecracker log: instance started"),
        "{:?}",
        exit.stderr_tail
    );
    assert!(exit.stderr_tail.contains("fake firecracker stderr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_firecracker_cannot_use_are_refused_before_anything_starts() {
    let base = tempfile::tempdir().expect("tempdir");
    let fake = Fake::new(base.path(), "fc", "");
    let backend = fake.backend();
    let mut qcow2 = spec(base.path(), "fc-qcow2");
    qcow2.rootfs.format = DiskFormat::Qcow2;
    let err = backend.launch(qcow2.clone()).await.expect_err("qcow2");
    assert!(
        matches!(&err, VmmError::InvalidSpec(m) if m.contains("raw disk images only")),
        "{err:?}"
    );
    let mut ephemeral = spec(base.path(), "fc-eph");
    ephemeral.rootfs.ephemeral = true;
    assert!(matches!(
        backend.launch(ephemeral).await,
        Err(VmmError::InvalidSpec(_))
    ));
    let mut limit = spec(base.path(), "fc-rate");
    limit.network = Some(NetSpec {
        rate_limit: Some(RateLimit {
            rate_bytes_per_sec: 0,
            burst_bytes: 0,
        }),
        ..network("tap0")
    });
    assert!(matches!(
        backend.launch(limit).await,
        Err(VmmError::InvalidSpec(_))
    ));
    assert!(
        !fake.started(),
        "Firecracker was started for a refused spec"
    );
    assert!(!qcow2.run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_agent_retries_refusals_and_is_bounded() {
    let base = tempfile::tempdir().expect("tempdir");
    // The fake's vsock socket accepts and hangs up, as Firecracker does while no guest
    // listens on the port.
    let fake = Fake::new(base.path(), "fc", "");
    let vm = fake
        .backend()
        .launch(spec(base.path(), "fc-agent"))
        .await
        .expect("launch");
    let started = Instant::now();
    let err = wait_for_agent(vm.as_ref(), Duration::from_secs(1))
        .await
        .expect_err("no agent");
    assert!(
        matches!(err, VmmError::Timeout(_, "the guest agent")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        fake.dir.join("vsock-connections").exists(),
        "no CONNECT attempt reached the vsock socket"
    );

    // A VM that exits is reported as such, not waited on.
    let waiting = wait_for_agent(vm.as_ref(), GUARD);
    vm.kill();
    let err = waiting.await.expect_err("exited");
    assert!(matches!(err, VmmError::Exited(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vms_live_in_a_chroot_with_chroot_paths_and_leave_nothing_behind() {
    let base = tempfile::tempdir().expect("tempdir");
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let jails = base.path().join("jails");
    let fake_a = Fake::new(base.path(), "fc-a", "");
    let jailed = |fake: &Fake| {
        let mut jailer = JailerConfig::new(uid, gid);
        jailer.binary = fake.jailer.clone();
        jailer.chroot_base = jails.clone();
        jailer.cgroups = vec![("cpu.max".into(), "50000 100000".into())];
        FirecrackerBackend::new(FirecrackerConfig {
            jailer: Some(jailer),
            ..fake.config()
        })
    };
    let mut spec_a = spec(base.path(), "fc-jail-a");
    let netns = base.path().join("netns-a");
    spec_a.netns = Some(netns.clone());
    let a = jailed(&fake_a)
        .launch(spec_a.clone())
        .await
        .expect("launch");

    assert_eq!(
        fake_a.args(),
        [
            "--id",
            "fc-jail-a",
            "--exec-file",
            fake_a.firecracker.to_str().expect("utf-8"),
            "--uid",
            &uid.to_string(),
            "--gid",
            &gid.to_string(),
            "--chroot-base-dir",
            jails.to_str().expect("utf-8"),
            "--cgroup-version",
            "2",
            "--cgroup",
            "cpu.max=50000 100000",
            "--netns",
            netns.to_str().expect("utf-8"),
            "--",
            "--api-sock",
            "/api.sock",
            "--log-path",
            "/firecracker.log",
            "--level",
            "Warning",
        ]
    );
    let requests = fake_a.requests();
    assert_schema(&requests);
    assert_eq!(requests[1].body["kernel_image_path"], "/vmlinux");
    assert_eq!(requests[2].body["path_on_host"], "/rootfs.ext4");
    assert_eq!(requests[3].body["uds_path"], "/v.sock");
    let jail_a = jails.join("firecracker/fc-jail-a");
    let root_a = jail_a.join("root");
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(ino(&root_a.join("rootfs.ext4")), ino(&spec_a.rootfs.path));
        assert_eq!(std::fs::metadata(&root_a).expect("root").uid(), uid);
    }
    console_shows(a.as_ref(), "rootfs begins NBXROOT!").await;
    assert_eq!(
        a.agent_endpoint(),
        AgentEndpoint::FirecrackerVsock {
            uds: root_a.join("v.sock"),
            port: 1024
        }
    );

    // Snapshots are written inside the jail, then moved out.
    let snap = base.path().join("snap");
    a.snapshot(&snap).await.expect("snapshot");
    let create = fake_a.requests().pop().expect("create");
    assert_eq!(create.path, "/snapshot/create");
    assert_eq!(create.body["snapshot_path"], "/snapshot-0/vmstate");
    assert_eq!(create.body["mem_file_path"], "/snapshot-0/memory");
    assert!(snap.join("vmstate").exists() && snap.join("memory").exists());
    assert!(!root_a.join("snapshot-0").exists());

    // A jailed restore finds the snapshot's files in its own jail, at the same relative
    // vsock path as before (free: the jail is new), so nothing needs overriding.
    let fake_b = Fake::new(base.path(), "fc-b", "");
    let spec_b = spec(base.path(), "fc-jail-b");
    let b = jailed(&fake_b)
        .restore(spec_b.clone(), &snap)
        .await
        .expect("restore");
    let requests = fake_b.requests();
    assert_schema(&requests);
    assert_eq!(fake_b.calls(), ["PUT /snapshot/load"]);
    let load = &requests[0].body;
    assert_eq!(load["snapshot_path"], "/restore/vmstate");
    assert_eq!(load["mem_backend"]["backend_path"], "/restore/memory");
    assert!(load.get("vsock_override").is_none(), "{load}");
    assert!(load.get("network_overrides").is_none(), "{load}");
    let jail_b = jails.join("firecracker/fc-jail-b");
    assert!(jail_b.join("root/restore/memory").exists());
    console_shows(b.as_ref(), "restored; rootfs begins NBXROOT!").await;

    // Restoring a jailed snapshot without the jailer is refused: the disk path differs.
    let fake_c = Fake::new(base.path(), "fc-c", "");
    let err = fake_c
        .backend()
        .restore(spec(base.path(), "fc-c"), &snap)
        .await
        .expect_err("unjailed restore of a jailed snapshot");
    assert!(err.to_string().contains("jailer"), "{err}");

    drop(a);
    drop(b);
    eventually("the jails' removal", || {
        !jail_a.exists() && !jail_b.exists()
    })
    .await;
    eventually("the run dirs' removal", || {
        !spec_a.run_dir.exists() && !spec_b.run_dir.exists()
    })
    .await;
    assert_eq!(
        &std::fs::read(&spec_a.rootfs.path).expect("disk stays")[..8],
        DISK_MAGIC
    );
}

// ---------------------------------------------------------------------------------------
// The fake Firecracker
// ---------------------------------------------------------------------------------------

mod fake {
    //! Serves Firecracker's API the way Firecracker answers it, for the subset the backend
    //! uses. Runs in its own process (see the module docs above).

    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use serde_json::{json, Value};
    use tokio::sync::mpsc;

    /// Behaviours, from the comma-separated mode.
    #[derive(Debug, Default)]
    struct Mode {
        /// Started as the jailer: parse its arguments, resolve paths in the chroot.
        jailer: bool,
        no_socket: bool,
        exit_at_once: bool,
        fault_drive: bool,
        ignore_ctrl_alt_del: bool,
        chatty: bool,
    }

    #[derive(Debug, Default)]
    struct State {
        started: bool,
        paused: bool,
        drive: Option<String>,
        vsock: Option<String>,
        tap: Option<String>,
    }

    struct Fake {
        dir: PathBuf,
        root: Option<PathBuf>,
        id: String,
        mode: Mode,
        log: Option<PathBuf>,
        state: Mutex<State>,
        exit: mpsc::UnboundedSender<i32>,
    }

    /// Serves until told to exit; never returns.
    pub fn main(dir: PathBuf) -> ! {
        let spec = std::env::var(super::FAKE_MODE).unwrap_or_default();
        let flags: Vec<&str> = spec.split(',').collect();
        let mode = Mode {
            jailer: flags.contains(&"jailer"),
            no_socket: flags.contains(&"no-socket"),
            exit_at_once: flags.contains(&"exit-at-once"),
            fault_drive: flags.contains(&"fault-drive"),
            ignore_ctrl_alt_del: flags.contains(&"ignore-ctrl-alt-del"),
            chatty: flags.contains(&"chatty"),
        };
        std::fs::write(dir.join("pid"), std::process::id().to_string()).expect("pid");
        let args: Vec<String> = std::fs::read_to_string(dir.join("args"))
            .expect("args")
            .lines()
            .map(str::to_owned)
            .collect();
        let value = |args: &[String], flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let (root, fc_args, id) = if mode.jailer {
            // As the jailer would: the jail under <base>/<exec name>/<id>/root must be
            // there, and Firecracker's own arguments follow `--`.
            let id = value(&args, "--id").expect("--id");
            let exec = PathBuf::from(value(&args, "--exec-file").expect("--exec-file"));
            let base = PathBuf::from(value(&args, "--chroot-base-dir").expect("--chroot-base-dir"));
            let root = base
                .join(exec.file_name().expect("exec name"))
                .join(&id)
                .join("root");
            if !root.is_dir() {
                eprintln!("jailer: {} is not a directory", root.display());
                std::process::exit(3);
            }
            let split = args.iter().position(|a| a == "--").expect("--");
            (Some(root), args[split + 1..].to_vec(), id)
        } else {
            let id = value(&args, "--id").unwrap_or_else(|| "anonymous-instance".into());
            (None, args, id)
        };
        if mode.exit_at_once {
            eprintln!("fake firecracker stderr: invalid configuration file");
            std::process::exit(1);
        }
        let resolve = |p: &str| match &root {
            Some(root) => root.join(p.trim_start_matches('/')),
            None => PathBuf::from(p),
        };
        let api = resolve(&value(&fc_args, "--api-sock").expect("--api-sock"));
        let log = value(&fc_args, "--log-path").map(|p| resolve(&p));
        let (exit, mut exit_rx) = mpsc::unbounded_channel();
        let fake = Arc::new(Fake {
            dir,
            root,
            id,
            mode,
            log,
            state: Mutex::new(State::default()),
            exit,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let code = runtime.block_on(async move {
            eprintln!("fake firecracker stderr: starting");
            if fake.mode.no_socket {
                fake.log_line("WARN fake firecracker log: not creating the API socket");
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return 2;
            }
            let listener = tokio::net::UnixListener::bind(&api).expect("bind API socket");
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { return 4 };
                        tokio::spawn(serve(fake.clone(), stream));
                    }
                    code = exit_rx.recv() => return code.unwrap_or(0),
                }
            }
        });
        std::process::exit(code)
    }

    async fn serve(fake: Arc<Fake>, stream: tokio::net::UnixStream) {
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let fake = fake.clone();
                async move {
                    let method = req.method().to_string();
                    let path = req.uri().path().to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let body: Value = if body.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&body).unwrap_or(Value::Null)
                    };
                    fake.record(&method, &path, &body);
                    let (status, reply) = fake.handle(&method, &path, &body);
                    let reply = if reply.is_null() {
                        Bytes::new()
                    } else {
                        Bytes::from(reply.to_string())
                    };
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(reply))
                            .expect("response"),
                    )
                }
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    }

    fn fault(message: impl Into<String>) -> (u16, Value) {
        (400, json!({ "fault_message": message.into() }))
    }

    impl Fake {
        fn resolve(&self, path: &str) -> PathBuf {
            match &self.root {
                Some(root) => root.join(path.trim_start_matches('/')),
                None => PathBuf::from(path),
            }
        }

        fn record(&self, method: &str, path: &str, body: &Value) {
            let line = json!({ "method": method, "path": path, "body": body });
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("requests.jsonl"))
                .expect("record");
            writeln!(file, "{line}").expect("record");
        }

        fn log_line(&self, line: &str) {
            if let Some(log) = &self.log {
                if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(log) {
                    let _ = writeln!(f, "{line}");
                }
            }
        }

        fn console(&self, text: &str) {
            let mut out = std::io::stdout();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }

        fn exit_soon(&self, code: i32) {
            let exit = self.exit.clone();
            tokio::spawn(async move {
                // After the reply has gone out.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = exit.send(code);
            });
        }

        /// What the guest would see on its disk: the first bytes, through the path given.
        fn disk_begins(&self, path: &str) -> String {
            use std::io::Read;
            let mut buf = [0u8; 8];
            match std::fs::File::open(self.resolve(path)).and_then(|mut f| f.read_exact(&mut buf)) {
                Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
                Err(e) => format!("<unreadable: {e}>"),
            }
        }

        /// Binds the vsock socket as Firecracker does; connections are accepted and closed,
        /// as while no guest listens on the port.
        fn bind_vsock(&self, path: &str) -> Result<(), String> {
            let host = self.resolve(path);
            let listener = tokio::net::UnixListener::bind(&host).map_err(|e| e.to_string())?;
            let marker = self.dir.join("vsock-connections");
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = std::fs::write(&marker, b"1");
                    drop(stream);
                }
            });
            Ok(())
        }

        fn handle(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
            let mut state = self.state.lock().expect("state");
            let pre_boot = ["/machine-config", "/boot-source", "/vsock", "/entropy"]
                .contains(&path)
                || path.starts_with("/drives/")
                || path.starts_with("/network-interfaces/");
            match method {
                "GET" if path == "/" => {
                    let run_state = match (state.started, state.paused) {
                        (false, _) => "Not started",
                        (true, true) => "Paused",
                        (true, false) => "Running",
                    };
                    (
                        200,
                        json!({
                            "app_name": "Firecracker",
                            "id": self.id,
                            "state": run_state,
                            "vmm_version": "1.17.0-fake",
                        }),
                    )
                }
                "PUT" if pre_boot => {
                    if state.started {
                        return fault(
                            "The requested operation is not supported after starting the microVM.",
                        );
                    }
                    if path.starts_with("/drives/") {
                        if self.mode.fault_drive {
                            return fault("Unable to open the block device: No such file or directory (os error 2)");
                        }
                        state.drive = body["path_on_host"].as_str().map(str::to_owned);
                    }
                    if path == "/vsock" {
                        state.vsock = body["uds_path"].as_str().map(str::to_owned);
                    }
                    if path.starts_with("/network-interfaces/") {
                        state.tap = body["host_dev_name"].as_str().map(str::to_owned);
                    }
                    (204, Value::Null)
                }
                "PUT" if path == "/actions" => match body["action_type"].as_str() {
                    Some("InstanceStart") if !state.started => {
                        state.started = true;
                        let disk = state.drive.as_deref().map(|d| self.disk_begins(d));
                        if let Some(vsock) = state.vsock.clone() {
                            if let Err(e) = self.bind_vsock(&vsock) {
                                return fault(format!("Cannot create vsock device: {e}"));
                            }
                        }
                        self.console(&format!(
                            "fake console: booted; rootfs begins {}\n",
                            disk.unwrap_or_default()
                        ));
                        if self.mode.chatty {
                            self.console(&"x".repeat(10_000));
                            self.console("\nEND OF CHATTER\n");
                        }
                        self.log_line("WARN fake firecracker log: instance started");
                        (204, Value::Null)
                    }
                    Some("SendCtrlAltDel") if state.started => {
                        if !self.mode.ignore_ctrl_alt_del {
                            // The guest resets through the i8042; Firecracker exits cleanly.
                            self.exit_soon(0);
                        }
                        (204, Value::Null)
                    }
                    _ => fault("The requested action is not supported in this state."),
                },
                "PATCH" if path == "/vm" => {
                    if !state.started {
                        return fault("Operation not allowed pre-boot.");
                    }
                    match body["state"].as_str() {
                        Some("Paused") => state.paused = true,
                        Some("Resumed") => state.paused = false,
                        _ => return fault("Invalid VM state."),
                    }
                    (204, Value::Null)
                }
                "PUT" if path == "/snapshot/create" => {
                    if !state.paused {
                        return fault("Create snapshot error: the microVM is not paused.");
                    }
                    let saved = json!({
                        "drive": state.drive,
                        "vsock": state.vsock,
                        "tap": state.tap,
                    });
                    let (Some(snapshot), Some(memory)) = (
                        body["snapshot_path"].as_str(),
                        body["mem_file_path"].as_str(),
                    ) else {
                        return fault("Invalid snapshot paths.");
                    };
                    if let Err(e) = std::fs::write(self.resolve(snapshot), saved.to_string())
                        .and_then(|()| std::fs::write(self.resolve(memory), b"fake guest memory"))
                    {
                        return fault(format!("Create snapshot error: {e}"));
                    }
                    (204, Value::Null)
                }
                "PUT" if path == "/snapshot/load" => {
                    if state.started {
                        return fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.");
                    }
                    let loaded = self.load(&mut state, body);
                    if let Err(e) = loaded {
                        // Firecracker ends itself after a failed load.
                        self.exit_soon(1);
                        return fault(format!("Load snapshot error: {e}"));
                    }
                    (204, Value::Null)
                }
                _ => fault(format!(
                    "Invalid request method and/or path: {method} {path}."
                )),
            }
        }

        fn load(&self, state: &mut State, body: &Value) -> Result<(), String> {
            let snapshot = body["snapshot_path"].as_str().ok_or("no snapshot_path")?;
            let memory = body["mem_backend"]["backend_path"]
                .as_str()
                .ok_or("no mem_backend")?;
            let saved: Value = serde_json::from_slice(
                &std::fs::read(self.resolve(snapshot)).map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("corrupt microVM state: {e}"))?;
            std::fs::metadata(self.resolve(memory)).map_err(|e| format!("memory file: {e}"))?;
            let vsock = body["vsock_override"]["uds_path"]
                .as_str()
                .or(saved["vsock"].as_str())
                .map(str::to_owned);
            if let Some(vsock) = &vsock {
                self.bind_vsock(vsock).map_err(|e| {
                    format!("VsockUnixBackend: Error binding to host-side Unix socket: {e}")
                })?;
            }
            state.drive = saved["drive"].as_str().map(str::to_owned);
            state.vsock = vsock;
            state.tap = body["network_overrides"][0]["host_dev_name"]
                .as_str()
                .or(saved["tap"].as_str())
                .map(str::to_owned);
            state.started = true;
            state.paused = body["resume_vm"] != Value::Bool(true);
            let disk = state
                .drive
                .as_deref()
                .map(|d| self.disk_begins(d))
                .unwrap_or_default();
            self.console(&format!("fake console: restored; rootfs begins {disk}\n"));
            Ok(())
        }
    }
}
