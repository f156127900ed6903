//! End-to-end tests of the QEMU backend with a real guest: the project's kernel, the test
//! rootfs and nanobox-init, booted under QEMU (TCG here, KVM where it works).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use nanobox_agent_protocol::pb::ErrorCode;
use nanobox_guest_client::{AgentClient, ConfigureRequest, ExecEvent, ExecRequest, ExitOutcome};
use nanobox_testkit::TestVm;
use nanobox_vmm::{connect_agent, VmState};

/// Guards against hangs; never a performance assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

async fn run(agent: &AgentClient, argv: &[&str]) -> nanobox_guest_client::ExecOutput {
    tokio::time::timeout(
        HANG_GUARD,
        agent.run(ExecRequest::new(argv.iter().copied()), 16 * MIB),
    )
    .await
    .expect("exec hung")
    .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_hello() {
    let t = TestVm::boot("echo").await;
    let out = run(&t.agent, &["echo", "hello"]).await;
    assert_eq!(text(&out.stdout), "hello\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.outcome, ExitOutcome::Code(0));
    assert!(!out.status.timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_stay_apart_and_exit_code_is_returned() {
    let t = TestVm::boot("streams").await;
    let out = run(&t.agent, &["sh", "-c", "echo out; echo err >&2; exit 3"]).await;
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.outcome, ExitOutcome::Code(3));

    // A program that does not exist is an error reply, and the agent carries on.
    let err = t
        .agent
        .run(ExecRequest::new(["no-such-program"]), MIB)
        .await
        .expect_err("missing program");
    assert_eq!(err.remote_code(), Some(ErrorCode::NotFound), "{err}");
    let out = run(&t.agent, &["true"]).await;
    assert_eq!(out.status.outcome, ExitOutcome::Code(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_cwd_identity_and_info_are_applied() {
    let t = TestVm::boot("env").await;
    let mut req = ExecRequest::new([
        "sh",
        "-c",
        "echo \"$FOO|$(pwd)|$NANOBOX_IMAGE|$(hostname)\"",
    ]);
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some("/tmp".into());
    let out = t.agent.run(req, MIB).await.expect("exec");
    assert_eq!(text(&out.stdout), "bar baz|/tmp|test-rootfs|testvm\n");

    // Configure sets environment for every later exec; a request's env wins over it.
    t.agent
        .configure(
            ConfigureRequest {
                hostname: "renamed".into(),
                env: vec![
                    ("FROM_HOST".into(), "1".into()),
                    ("FOO".into(), "host".into()),
                ],
                ..ConfigureRequest::default()
            },
            HANG_GUARD,
        )
        .await
        .expect("configure");
    let mut req = ExecRequest::new(["sh", "-c", "echo \"$FROM_HOST|$FOO|$(hostname)\""]);
    req.env = vec![("FOO".into(), "request".into())];
    let out = t.agent.run(req, MIB).await.expect("exec");
    assert_eq!(text(&out.stdout), "1|request|renamed\n");

    // uid/gid are applied.
    let mut req = ExecRequest::new(["id", "-u"]);
    req.uid = Some(65534);
    req.gid = Some(65534);
    let out = t.agent.run(req, MIB).await.expect("exec as nobody");
    assert_eq!(text(&out.stdout), "65534\n");

    let info = t.agent.info(HANG_GUARD).await.expect("info");
    assert!(info.kernel_release.starts_with("6.1."), "{info:?}");
    assert_eq!(info.cpus, 1);
    assert!(
        (100 * 1024..=128 * 1024).contains(&info.mem_total_kib),
        "128 MiB guest reports {} KiB",
        info.mem_total_kib
    );
    assert_eq!(info.hostname, "renamed");
    assert_eq!(info.boot_id, t.agent.ready().boot_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_reported() {
    let t = TestVm::boot("signals").await;
    let out = run(&t.agent, &["sh", "-c", "kill -9 $$"]).await;
    assert_eq!(out.status.outcome, ExitOutcome::Signal(9));
    assert_eq!(out.status.shell_code(), 137);

    // A signal sent from the host reaches the command.
    let mut exec = t
        .agent
        .exec(ExecRequest::new(["sleep", "300"]))
        .await
        .expect("exec");
    exec.signal(15).await.expect("signal");
    let status = loop {
        match tokio::time::timeout(HANG_GUARD, exec.next())
            .await
            .expect("hung")
        {
            Ok(Some(ExecEvent::Exit(s))) => break s,
            Ok(Some(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(status.outcome, ExitOutcome::Signal(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_process_group_and_the_guest_keeps_serving() {
    let t = TestVm::boot("timeout").await;
    let mut req = ExecRequest::new(["sh", "-c", "sleep 300 & sleep 301 & echo started; wait"]);
    req.timeout = Some(Duration::from_secs(1));
    let out = t.agent.run(req, MIB).await.expect("exec");
    assert!(out.status.timed_out, "{:?}", out.status);
    assert_eq!(out.status.outcome, ExitOutcome::Signal(9));
    assert_eq!(text(&out.stdout), "started\n");

    // Neither background sleep survived the deadline.
    let ps = run(&t.agent, &["ps", "-o", "args"]).await;
    let listing = text(&ps.stdout);
    assert!(
        !listing.contains("sleep 30"),
        "leftover processes:\n{listing}"
    );

    let out = run(&t.agent, &["echo", "still here"]).await;
    assert_eq!(text(&out.stdout), "still here\n");
}

/// Resident set of this process in bytes.
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss");
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_output_streams_with_bounded_host_memory() {
    let t = TestVm::boot("bigout").await;
    const TOTAL: usize = 64 * MIB;
    let baseline = rss_bytes();
    let mut exec = t
        .agent
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "dd if=/dev/zero bs=1M count=64 2>/dev/null",
        ]))
        .await
        .expect("exec");
    let mut received = 0usize;
    let mut peak = baseline;
    let mut nonzero = false;
    loop {
        match tokio::time::timeout(HANG_GUARD, exec.next())
            .await
            .expect("hung")
        {
            Ok(Some(ExecEvent::Stdout(data))) => {
                received += data.len();
                nonzero |= data.iter().any(|&b| b != 0);
                // Consume slowly now and then, so the guest must wait for credit.
                if received % (8 * MIB) < data.len() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                peak = peak.max(rss_bytes());
            }
            Ok(Some(ExecEvent::Stderr(e))) => panic!("stderr: {}", String::from_utf8_lossy(&e)),
            Ok(Some(ExecEvent::Exit(s))) => {
                assert_eq!(s.outcome, ExitOutcome::Code(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, TOTAL);
    assert!(!nonzero);
    let growth = peak.saturating_sub(baseline);
    eprintln!("64 MiB streamed; host RSS grew by {} KiB", growth / 1024);
    // The window keeps at most 512 KiB in flight per stream; allow for allocator slack,
    // but far below the 64 MiB an unbounded buffer would hold.
    assert!(growth < 16 * MIB, "host RSS grew by {} MiB", growth / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs_return_their_own_output() {
    let t = TestVm::boot("concurrent").await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let agent = t.agent.clone();
        tasks.push(tokio::spawn(async move {
            let script = format!("i=0; while [ $i -lt 3000 ]; do echo exec-{n}-line-$i; i=$((i+1)); done; echo done-{n} >&2");
            let out = run(&agent, &["sh", "-c", &script]).await;
            (n, out)
        }));
    }
    for task in tasks {
        let (n, out) = task.await.expect("task");
        let expected: String = (0..3000).map(|i| format!("exec-{n}-line-{i}\n")).collect();
        assert_eq!(text(&out.stdout), expected, "exec {n} output mixed or lost");
        assert_eq!(text(&out.stderr), format!("done-{n}\n"));
        assert_eq!(out.status.outcome, ExitOutcome::Code(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_round_trips_through_cat() {
    let t = TestVm::boot("stdin").await;
    let mut input = vec![0u8; MIB];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut input);
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = true;
    let mut exec = t.agent.exec(req).await.expect("exec");
    let mut stdin = exec.take_stdin().expect("stdin");
    let feeder = {
        let input = input.clone();
        tokio::spawn(async move {
            stdin.write(&input).await.expect("write stdin");
            stdin.close().await.expect("close stdin");
        })
    };
    let out = tokio::time::timeout(HANG_GUARD, exec.collect(4 * MIB))
        .await
        .expect("hung")
        .expect("cat");
    feeder.await.expect("feeder");
    assert_eq!(out.status.outcome, ExitOutcome::Code(0));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat returned different bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_and_bad_paths_are_errors() {
    let t = TestVm::boot("files").await;
    let mut data = vec![0u8; 32 * MIB];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    let written = tokio::time::timeout(
        HANG_GUARD,
        t.agent.write_file("/root/blob.bin", 0o600, &data[..]),
    )
    .await
    .expect("hung")
    .expect("write");
    assert_eq!(written, data.len() as u64);
    let mut back = Vec::new();
    let read = tokio::time::timeout(HANG_GUARD, t.agent.read_file("/root/blob.bin", &mut back))
        .await
        .expect("hung")
        .expect("read");
    assert_eq!(read, data.len() as u64);
    assert!(back == data, "file came back different");
    let out = run(&t.agent, &["stat", "-c", "%a %s", "/root/blob.bin"]).await;
    assert_eq!(text(&out.stdout), format!("600 {}\n", data.len()));

    let err = t
        .agent
        .read_file("/no/such/file", Vec::new())
        .await
        .expect_err("missing");
    assert_eq!(err.remote_code(), Some(ErrorCode::NotFound), "{err}");
    let err = t
        .agent
        .write_file("relative/path", 0o644, &b"x"[..])
        .await
        .expect_err("relative");
    assert_eq!(err.remote_code(), Some(ErrorCode::InvalidArgument), "{err}");
    let err = t
        .agent
        .read_file("/root", Vec::new())
        .await
        .expect_err("directory");
    assert_eq!(err.remote_code(), Some(ErrorCode::InvalidArgument), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_vm_mid_exec_fails_the_exec_and_cleans_up() {
    let t = TestVm::boot("killed").await;
    let pid = t.vm.pid().expect("pid");
    let run_dir = t.vm.run_dir().to_path_buf();
    assert!(run_dir.exists());
    // The control sockets are reachable by the VM's owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&run_dir)
        .expect("run dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "run dir mode {mode:o}");
    let mut exec = t
        .agent
        .exec(ExecRequest::new(["sleep", "300"]))
        .await
        .expect("exec");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let result = tokio::time::timeout(HANG_GUARD, exec.next())
        .await
        .expect("exec hung after VM death");
    let err = result.expect_err("exec must fail when the VM dies");
    assert!(
        matches!(err, nanobox_guest_client::AgentError::Disconnected(_)),
        "{err}"
    );

    let exit = tokio::time::timeout(HANG_GUARD, t.vm.wait())
        .await
        .expect("wait hung");
    assert_eq!(exit.signal, Some(9), "{exit}");
    assert_eq!(t.vm.state(), VmState::Exited);
    assert!(
        !run_dir.exists(),
        "run dir {} left behind",
        run_dir.display()
    );
    let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None);
    assert_eq!(
        gone,
        Err(nix::errno::Errno::ESRCH),
        "QEMU process still exists"
    );
    // New operations fail at once rather than hang.
    let err = t
        .agent
        .run(ExecRequest::new(["true"]), MIB)
        .await
        .expect_err("dead VM");
    assert!(
        matches!(err, nanobox_guest_client::AgentError::Disconnected(_)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_from_the_host_do_not_kill_init() {
    use nanobox_agent_protocol::codec::encode_into;
    use nanobox_agent_protocol::pb::{frame::Body, Frame, Hello};
    use nanobox_agent_protocol::{FrameCodec, MAGIC};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder as _;

    let t = TestVm::boot("malformed").await;
    let TestVm {
        vm,
        agent,
        backend: _backend,
    } = t;
    drop(agent); // the channel takes one host at a time

    let nanobox_vmm::AgentEndpoint::Unix(path) = vm.agent_endpoint() else {
        panic!("QEMU agent endpoint is a Unix socket");
    };
    let mut raw = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let mut junk = bytes::BytesMut::new();
    junk.extend_from_slice(b"this is not a frame at all");
    junk.extend_from_slice(&MAGIC);
    junk.extend_from_slice(&u32::MAX.to_le_bytes()); // an oversized length
    junk.extend_from_slice(&MAGIC);
    junk.extend_from_slice(&3u32.to_le_bytes());
    junk.extend_from_slice(&[0xff, 0xff, 0xff]); // a payload that is not protobuf
    encode_into(
        &Frame {
            stream_id: 9,
            body: None,
        },
        &mut junk,
    )
    .expect("encode");
    encode_into(
        &Frame {
            stream_id: 0,
            body: Some(Body::Hello(Hello {
                nonce: 77,
                protocol_version: 1,
            })),
        },
        &mut junk,
    )
    .expect("encode");
    raw.write_all(&junk).await.expect("write junk");

    // The agent answers the junk with error frames and the Hello with Ready.
    let mut codec = FrameCodec::new();
    let mut buf = bytes::BytesMut::new();
    let mut errors = 0;
    let ready = tokio::time::timeout(HANG_GUARD, async {
        loop {
            while let Some(item) = codec.decode(&mut buf).expect("decode") {
                match item {
                    Ok(Frame {
                        body: Some(Body::Ready(r)),
                        ..
                    }) if r.nonce == 77 => return r,
                    Ok(Frame {
                        body: Some(Body::Error(_)),
                        ..
                    }) => errors += 1,
                    _ => {}
                }
            }
            let n = raw.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "agent closed the channel");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no Ready after malformed input; console:\n{}",
            vm.console_tail()
        )
    });
    assert_eq!(ready.protocol_version, 1);
    assert!(
        errors >= 3,
        "expected error replies for the malformed frames, got {errors}"
    );
    drop(raw);

    // A well-behaved host is served as before.
    let agent = connect_agent(vm.as_ref(), HANG_GUARD)
        .await
        .expect("reconnect");
    let out = run(&agent, &["echo", "alive"]).await;
    assert_eq!(text(&out.stdout), "alive\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_orderly_shutdown() {
    let t = TestVm::boot("lifecycle").await;
    t.vm.pause().await.expect("pause");
    assert_eq!(t.vm.state(), VmState::Paused);
    // A paused guest does not answer; the exec completes once it runs again.
    let agent = t.agent.clone();
    let pending = tokio::spawn(async move { run(&agent, &["echo", "after resume"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a paused guest answered");
    t.vm.resume().await.expect("resume");
    assert_eq!(t.vm.state(), VmState::Running);
    let out = pending.await.expect("task");
    assert_eq!(text(&out.stdout), "after resume\n");

    t.agent.shutdown(HANG_GUARD).await.expect("shutdown");
    let exit = tokio::time::timeout(HANG_GUARD, t.vm.wait())
        .await
        .expect("VM did not power off");
    assert_eq!(exit.code, Some(0), "{exit}");
    assert!(!t.vm.run_dir().exists());
}

/// A sparse copy of the test rootfs that a VM may write to (and a snapshot may keep).
fn writable_rootfs(dir: &std::path::Path) -> std::path::PathBuf {
    let src = nanobox_testkit::GuestArtifacts::from_env().rootfs;
    let dst = dir.join("root.ext4");
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(&dst)
        .status()
        .expect("cp");
    assert!(status.success());
    dst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_keep_memory_disk_and_running_processes() {
    use nanobox_vmm::{DriveSpec, VmBackend};

    let work = tempfile::tempdir().expect("tempdir");
    let disk = writable_rootfs(work.path());
    let t = TestVm::boot_with("snap-src", |spec| {
        spec.rootfs = DriveSpec::writable(&disk);
    })
    .await;
    let setup = "echo in-memory > /tmp/ram-marker; echo on-disk > /root/disk-marker; sync; \
                 (i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done) \
                 >/dev/null 2>&1 &";
    let out = run(&t.agent, &["sh", "-c", setup]).await;
    assert_eq!(out.status.outcome, ExitOutcome::Code(0));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Snapshot: memory and device state from QEMU, the disk copied while the VM is paused.
    let snap = work.path().join("snap");
    let info = tokio::time::timeout(HANG_GUARD, t.vm.snapshot(&snap))
        .await
        .expect("snapshot hung")
        .expect("snapshot");
    assert_eq!(t.vm.state(), VmState::Paused);
    assert!(info.state_bytes > 0 && info.memory_mib == 128, "{info:?}");
    let saved_disk = snap.join("root.ext4");
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&disk)
        .arg(&saved_disk)
        .status()
        .expect("cp");
    assert!(status.success());
    let TestVm { vm, agent, backend } = t;
    drop(agent);
    vm.kill();
    vm.wait().await;

    // Restore into a new VM on the saved disk.
    let artifacts = nanobox_testkit::GuestArtifacts::from_env();
    let id = nanobox_testkit::vm_id("snap-dst");
    let spec = nanobox_vmm::VmSpec::new(
        id.clone(),
        artifacts.kernel,
        DriveSpec::writable(&saved_disk),
        std::env::temp_dir().join(format!("nanobox-test-{id}")),
    );
    let restored = tokio::time::timeout(HANG_GUARD, backend.restore(spec, &snap))
        .await
        .expect("restore hung")
        .expect("restore");
    assert_eq!(restored.state(), VmState::Running);
    let agent = connect_agent(restored.as_ref(), HANG_GUARD)
        .await
        .expect("agent after restore");
    agent
        .configure(
            ConfigureRequest {
                unix_time_ns: Some(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .expect("clock")
                        .as_nanos() as u64,
                ),
                entropy_seed: vec![42; 32],
                ..ConfigureRequest::default()
            },
            HANG_GUARD,
        )
        .await
        .expect("configure after restore");

    let out = run(&agent, &["cat", "/tmp/ram-marker", "/root/disk-marker"]).await;
    assert_eq!(text(&out.stdout), "in-memory\non-disk\n");
    // The background loop started before the snapshot is still counting.
    let first: u64 = text(&run(&agent, &["cat", "/tmp/counter"]).await.stdout)
        .trim()
        .parse()
        .expect("n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later: u64 = text(&run(&agent, &["cat", "/tmp/counter"]).await.stdout)
        .trim()
        .parse()
        .expect("n");
    assert!(
        later > first,
        "counter stuck at {first} -> {later} after restore"
    );

    // The snapshot refuses a machine of another size, and ephemeral disks.
    let mut other = nanobox_vmm::VmSpec::new(
        nanobox_testkit::vm_id("snap-bad"),
        nanobox_testkit::GuestArtifacts::from_env().kernel,
        DriveSpec::writable(&saved_disk),
        work.path().join("run-bad"),
    );
    other.memory_mib = 256;
    let err = backend
        .restore(other, &snap)
        .await
        .expect_err("size mismatch");
    assert!(err.to_string().contains("128 MiB"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_vms_refuse_snapshots() {
    let t = TestVm::boot("snap-ephemeral").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let err =
        t.vm.snapshot(&dir.path().join("s"))
            .await
            .expect_err("ephemeral");
    assert!(err.to_string().contains("ephemeral"), "{err}");
    // The refusal changed nothing: the guest still runs.
    assert_eq!(t.vm.state(), VmState::Running);
    let out = run(&t.agent, &["echo", "ok"]).await;
    assert_eq!(text(&out.stdout), "ok\n");
}

/// The hardened QEMU: under its seccomp filter, and running as an unprivileged user once
/// it has opened its devices; the guest works all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_unprivileged_under_seccomp() {
    use nanobox_vmm::qemu::{QemuBackend, QemuConfig};
    use nanobox_vmm::{DriveSpec, VmBackend, VmSpec};
    let artifacts = nanobox_testkit::GuestArtifacts::from_env();
    let backend = QemuBackend::new(QemuConfig {
        run_as: Some("nobody".into()),
        ..QemuConfig::default()
    });
    let id = nanobox_testkit::vm_id("hardened");
    let spec = VmSpec::new(
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
    let vm = backend.launch(spec).await.unwrap();
    let agent = connect_agent(vm.as_ref(), nanobox_testkit::BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", vm.console_tail()));
    let out = run(&agent, &["echo", "confined"]).await;
    assert_eq!(text(&out.stdout), "confined\n");

    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid().unwrap())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap()
    };
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let uids = field("Uid:");
    assert!(
        uids.iter().all(|u| *u == nobody.uid.to_string()),
        "every uid is nobody's: {uids:?}"
    );
    // Mode 2: a seccomp filter is installed.
    assert_eq!(field("Seccomp:"), ["2"]);
}
