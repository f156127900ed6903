//! The guest agent over AF_VSOCK, the transport Firecracker uses, exercised for real under
//! QEMU: a vhost-user-vsock device served by `vhost-device-vsock` speaks the same host
//! protocol as Firecracker's hybrid vsock (connect to a Unix socket, send
//! `CONNECT <port>`), so the guest's vsock listener and the host's CONNECT handshake run
//! exactly as they will on a Firecracker host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nanobox_guest_client::{connect_firecracker_vsock, AgentClient, ExecRequest, ExitOutcome};
use nanobox_testkit::GuestArtifacts;
use nanobox_vmm::firecracker::plan::AGENT_VSOCK_PORT;

/// Hang guard (generous: a loaded 2-core machine boots TCG guests slowly), never a timing check.
const GUARD: Duration = Duration::from_secs(240);

fn find_tool(name: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")));
    candidates
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: `cargo xtask test` installs it"))
}

async fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects to the guest agent through the vsock proxy, retrying while the guest boots
/// (until its listener exists the proxy refuses the CONNECT).
async fn connect(uds: &Path) -> AgentClient {
    let deadline = Instant::now() + GUARD;
    loop {
        match connect_firecracker_vsock(uds, AGENT_VSOCK_PORT, Duration::from_secs(5)).await {
            Ok(stream) => match AgentClient::connect(stream, Duration::from_secs(10)).await {
                Ok(agent) => return agent,
                Err(e) if Instant::now() < deadline => eprintln!("handshake: {e}; retrying"),
                Err(e) => panic!("agent over vsock: {e}"),
            },
            // Refused until the guest's listener exists.
            Err(_) if Instant::now() < deadline => {}
            Err(e) => panic!("vsock CONNECT never succeeded: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_over_vsock_with_the_firecracker_connect_protocol() {
    let guest = GuestArtifacts::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let vhost_sock = dir.path().join("vhost.sock");
    let uds = dir.path().join("v.sock");

    let mut device = tokio::process::Command::new(find_tool("vhost-device-vsock"))
        .arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(&vhost_sock)
        .arg("--uds-path")
        .arg(&uds)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("vhost-device-vsock");
    wait_for_path(&vhost_sock).await;

    // vhost-user needs guest RAM in a shared memory file.
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-accel", "tcg,tb-size=16", "-cpu", "max", "-m", "128M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
        .args(["-M", "microvm,acpi=off,memory-backend=mem"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .args([
            "-append",
            "console=ttyS0 root=/dev/vda rw quiet acpi=off reboot=t panic=-1 init=/sbin/nanobox-init",
        ])
        .args(["-serial", "null", "-device", "virtio-blk-device,drive=root"])
        .arg("-drive")
        .arg(format!("id=root,if=none,format=raw,snapshot=on,file={}", guest.rootfs.display()))
        .arg("-chardev")
        .arg(format!("socket,id=vv,path={}", vhost_sock.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vv"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu");

    wait_for_path(&uds).await;
    let agent = tokio::time::timeout(GUARD, connect(&uds))
        .await
        .expect("boot hung");
    let out = agent
        .run(
            ExecRequest::new(["sh", "-c", "echo over vsock; exit 4"]),
            1 << 20,
        )
        .await
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over vsock\n");
    assert_eq!(out.status.outcome, ExitOutcome::Code(4));

    // Each vsock connection is its own agent session; a second one works alongside.
    let second = tokio::time::timeout(GUARD, connect(&uds))
        .await
        .expect("second connection");
    let (a, b) = tokio::join!(
        agent.run(ExecRequest::new(["echo", "first"]), 1 << 20),
        second.run(ExecRequest::new(["echo", "second"]), 1 << 20),
    );
    assert_eq!(
        String::from_utf8_lossy(&a.expect("first").stdout),
        "first\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&b.expect("second").stdout),
        "second\n"
    );

    // A CONNECT to a port nobody listens on is refused, not hung.
    let refused = connect_firecracker_vsock(&uds, 4444, Duration::from_secs(10)).await;
    assert!(refused.is_err(), "CONNECT to a closed port succeeded");

    let _ = qemu.kill().await;
    let _ = device.kill().await;
}
