//! Measurements for `cargo xtask bench boot` that need the library in a release build.
//!
//! `boot_bench bare <kernel> <rootfs>`: start QEMU with exactly the command line the QEMU
//! backend uses (same kernel, rootfs, devices, flags, pre-opened sockets) and print the
//! milliseconds from spawn to the init's READY marker on the console.
//!
//! `boot_bench agent <kernel> <rootfs> <iterations> <stream-mib>`: boot one guest, time
//! `true` `iterations` times, then stream `stream-mib` MiB of stdout; print JSON.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nanobox_guest_client::{ExecEvent, ExecRequest};
use nanobox_vmm::qemu::{PassedFds, QemuBackend, QemuConfig};
use nanobox_vmm::{connect_agent, DriveSpec, VmBackend, VmSpec};
use tokio::io::{AsyncBufReadExt, BufReader};

fn spec(kernel: &str, rootfs: &str, tag: &str) -> VmSpec {
    let id = format!("bench-{tag}-{}", std::process::id());
    VmSpec::new(
        id.clone(),
        kernel,
        DriveSpec {
            path: rootfs.into(),
            read_only: false,
            ephemeral: true,
            format: nanobox_vmm::DiskFormat::Raw,
        },
        std::env::temp_dir().join(format!("nanobox-{id}")),
    )
}

fn backend() -> QemuBackend {
    let cache = std::env::var_os("NANOBOX_CACHE_DIR")
        .map(|d| std::path::PathBuf::from(d).join("accel-probe"));
    QemuBackend::new(QemuConfig {
        accel_cache: cache,
        ..QemuConfig::default()
    })
}

async fn bare(kernel: &str, rootfs: &str) -> anyhow::Result<()> {
    let backend = backend();
    let spec = spec(kernel, rootfs, "bare");
    // Resolve the accelerator (and its probe) before the clock starts, as the CLI's
    // probe result is cached too.
    let args = backend
        .command_line(
            &spec,
            PassedFds {
                agent_listener: 3,
                qmp_listener: 4,
            },
        )
        .await;
    std::fs::create_dir(&spec.run_dir)?;
    let listeners: Vec<OwnedFd> = ["agent.sock", "qmp.sock"]
        .iter()
        .map(|name| {
            std::os::unix::net::UnixListener::bind(spec.run_dir.join(name)).map(OwnedFd::from)
        })
        .collect::<Result<_, _>>()?;
    let mut cmd = tokio::process::Command::new(&backend.config().binary);
    command_fds::CommandFdExt::fd_mappings(
        &mut cmd,
        listeners
            .into_iter()
            .zip([3, 4])
            .map(|(parent_fd, child_fd)| command_fds::FdMapping {
                parent_fd,
                child_fd,
            })
            .collect(),
    )?;
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(nanobox_agent_protocol::READY_MARKER) {
                return Ok::<_, std::io::Error>(Some(started.elapsed()));
            }
        }
        Ok(None)
    })
    .await;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&spec.run_dir);
    match ready {
        Ok(Ok(Some(t))) => {
            println!("{:.3}", t.as_secs_f64() * 1e3);
            Ok(())
        }
        _ => anyhow::bail!("QEMU did not print the READY marker"),
    }
}

async fn agent(
    kernel: &str,
    rootfs: &str,
    iterations: usize,
    stream_mib: usize,
) -> anyhow::Result<()> {
    let backend = backend();
    let vm = backend.launch(spec(kernel, rootfs, "agent")).await?;
    let agent = connect_agent(vm.as_ref(), Duration::from_secs(60)).await?;
    // Warm up the guest's page cache and the host's connection before timing.
    for _ in 0..5 {
        agent.run(ExecRequest::new(["true"]), 1024).await?;
    }
    let mut rtts = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let out = agent.run(ExecRequest::new(["true"]), 1024).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(out.status.success(), "true failed: {:?}", out.status);
    }
    let bytes = stream_mib * 1024 * 1024;
    let t = Instant::now();
    // dd writes 1 MiB per call, so the producer is not what is measured (busybox `head`
    // writes 4 KiB at a time and is slower than the channel under emulation).
    let script = format!("dd if=/dev/zero bs=1M count={stream_mib} 2>/dev/null");
    let mut exec = agent.exec(ExecRequest::new(["sh", "-c", &script])).await?;
    let mut got = 0usize;
    while let Some(ev) = exec.next().await? {
        match ev {
            ExecEvent::Stdout(d) => got += d.len(),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(s) => anyhow::ensure!(s.success(), "dd failed: {s:?}"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(got == bytes, "streamed {got} of {bytes} bytes");
    vm.kill();
    vm.wait().await;
    let rtts = rtts
        .iter()
        .map(|v| format!("{v:.4}"))
        .collect::<Vec<_>>()
        .join(",");
    println!("{{\"exec_rtt_ms\":[{rtts}],\"stream_bytes\":{got},\"stream_s\":{secs:.6}}}");
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["bare", kernel, rootfs] => bare(kernel, rootfs).await,
        ["agent", kernel, rootfs, iterations, mib] => agent(kernel, rootfs, iterations.parse()?, mib.parse()?).await,
        _ => anyhow::bail!("usage: boot_bench bare <kernel> <rootfs> | agent <kernel> <rootfs> <iterations> <stream-mib>"),
    }
}
