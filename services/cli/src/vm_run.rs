//! `nanobox vm run`: boot, configure, exec one command, tear down.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nanobox_guest_client::{
    AgentClient, ConfigureRequest, ErrorCode, ExecEvent, ExecRequest, ExitOutcome,
};
use nanobox_vmm::qemu::{QemuBackend, QemuConfig};
use nanobox_vmm::{connect_agent, AccelChoice, DriveSpec, Vm, VmBackend, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Exit status when NanoBox itself failed (the VM did not boot, the agent broke, ...),
/// as distinct from the command's own status. Same convention as `docker run`.
pub const EXIT_NANOBOX_ERROR: i32 = 125;
/// Exit status when the command ran past `--timeout` (as timeout(1) reports it).
pub const EXIT_TIMED_OUT: i32 = 124;
/// The command could not be executed / was not found: the shell's conventions.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
pub const EXIT_NOT_FOUND: i32 = 127;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Root filesystem (ext4 image) the guest boots from.
    #[arg(long)]
    rootfs: PathBuf,
    /// Guest kernel (uncompressed vmlinux). Default: $NANOBOX_KERNEL, else the cached
    /// build of guest/kernel/build.sh.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    memory_mb: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Accelerator: auto (KVM when it can boot the kernel, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: AccelChoice,
    /// Kill the command (and its children) after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Extra environment for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Guest hostname.
    #[arg(long, default_value = "nanobox")]
    hostname: String,
    /// Write changes through to the rootfs image (default: a throwaway overlay).
    #[arg(long)]
    persist: bool,
    /// Do not forward this process's stdin to the command.
    #[arg(long)]
    no_stdin: bool,
    /// Copy the guest's serial console to stderr.
    #[arg(long)]
    console: bool,
    /// Give up if the guest agent has not answered after this many seconds.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Print timings (boot, exec) to stderr as one JSON line.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

pub async fn run(args: RunArgs) -> i32 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nanobox: {e:#}");
            EXIT_NANOBOX_ERROR
        }
    }
}

async fn run_inner(args: RunArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(crate::paths::default_kernel);
    let backend = QemuBackend::new(QemuConfig {
        accel: args.accel,
        accel_cache: Some(crate::paths::cache_dir().join("accel-probe")),
        ..QemuConfig::default()
    });
    let id = format!("run-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let mut spec = VmSpec::new(
        id.clone(),
        kernel,
        DriveSpec {
            path: args.rootfs.clone(),
            read_only: false,
            ephemeral: !args.persist,
            format: nanobox_vmm::DiskFormat::Raw,
        },
        crate::paths::vm_run_dir(&id),
    );
    spec.vcpus = args.vcpus;
    spec.memory_mib = args.memory_mb;
    spec.console_to_stderr = args.console;
    spec.die_with_parent = true;

    let vm = backend.launch(spec).await.context("starting the VM")?;
    let result = session(&args, vm.as_ref(), started).await;
    teardown(
        vm.as_ref(),
        args.persist,
        result.as_ref().ok().map(|(agent, _)| agent),
    )
    .await;
    result.map(|(_, code)| code)
}

async fn session(
    args: &RunArgs,
    vm: &dyn Vm,
    started: Instant,
) -> anyhow::Result<(AgentClient, i32)> {
    let agent = connect_agent(vm, Duration::from_secs(args.boot_timeout))
        .await
        .context("booting the guest")?;
    let ready_at = started.elapsed();
    agent
        .configure(
            ConfigureRequest {
                hostname: args.hostname.clone(),
                entropy_seed: rand::random::<[u8; 64]>().to_vec(),
                unix_time_ns: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_nanos() as u64),
                ..ConfigureRequest::default()
            },
            Duration::from_secs(10),
        )
        .await
        .context("configuring the guest")?;

    let mut exec = agent
        .exec(ExecRequest {
            argv: args.command.clone(),
            env: args.env.clone(),
            cwd: args.cwd.clone(),
            timeout: args.timeout.map(Duration::from_secs),
            stdin: !args.no_stdin,
            ..ExecRequest::default()
        })
        .await
        .context("starting the command")?;

    let stdin_task = exec.take_stdin().map(|mut writer| {
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if writer.write(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = writer.close().await;
        })
    });

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = loop {
        let event = tokio::select! {
            ev = exec.next() => match ev {
                Ok(ev) => ev,
                Err(e) => match e.remote_code() {
                    // The guest could not start the command: report it the way a shell does.
                    Some(ErrorCode::NotFound) => {
                        eprintln!("nanobox: {e}");
                        return Ok((agent, EXIT_NOT_FOUND));
                    }
                    Some(ErrorCode::PermissionDenied) => {
                        eprintln!("nanobox: {e}");
                        return Ok((agent, EXIT_NOT_EXECUTABLE));
                    }
                    _ => return Err(anyhow::Error::new(e).context("running the command")),
                },
            },
            _ = tokio::signal::ctrl_c() => {
                // Forward the interrupt to the command, as a terminal would.
                let _ = exec.signal(2).await;
                continue;
            }
        };
        match event {
            Some(ExecEvent::Stdout(data)) => {
                stdout.write_all(&data).await.context("writing stdout")?;
            }
            Some(ExecEvent::Stderr(data)) => {
                stderr.write_all(&data).await.context("writing stderr")?;
            }
            Some(ExecEvent::Exit(status)) => break status,
            None => anyhow::bail!("the command ended without an exit status"),
        }
    };
    stdout.flush().await.context("writing stdout")?;
    if let Some(task) = stdin_task {
        task.abort();
    }
    let done_at = started.elapsed();
    if args.timings {
        eprintln!(
            "{{\"agent_ready_ms\":{:.3},\"exec_done_ms\":{:.3},\"exec_guest_ms\":{:.3}}}",
            ready_at.as_secs_f64() * 1e3,
            done_at.as_secs_f64() * 1e3,
            status.duration.as_secs_f64() * 1e3
        );
    }
    let code = if status.timed_out {
        eprintln!(
            "nanobox: command timed out after {}s and was killed",
            args.timeout.unwrap_or(0)
        );
        EXIT_TIMED_OUT
    } else {
        if let ExitOutcome::Signal(sig) = status.outcome {
            eprintln!("nanobox: command killed by signal {sig}");
        }
        status.shell_code()
    };
    Ok((agent, code))
}

/// Stops the VM. With `--persist` the guest first syncs and powers off so the image is
/// consistent; otherwise its writes are throwaway and the VMM is simply stopped.
async fn teardown(vm: &dyn Vm, persist: bool, agent: Option<&AgentClient>) {
    if persist {
        if let Some(agent) = agent {
            if agent.shutdown(Duration::from_secs(5)).await.is_ok()
                && tokio::time::timeout(Duration::from_secs(10), vm.wait())
                    .await
                    .is_ok()
            {
                return;
            }
        }
    }
    vm.kill();
    vm.wait().await;
}
