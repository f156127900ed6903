//! Small request/response streams: info, configure (identity hand-over) and shutdown.

use std::sync::{Arc, PoisonError};

use nanobox_agent_protocol::pb::{self, frame::Body, ErrorCode};

use crate::agent::{Agent, StreamTx};
use crate::{boot, log, sys};

/// Seconds since boot from /proc/uptime, in milliseconds.
pub fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

fn meminfo_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub async fn info(agent: &Arc<Agent>, stream: &StreamTx) {
    let uname = nix::sys::utsname::uname().ok();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let response = pb::InfoResponse {
        kernel_release: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_ms: agent.uptime_ms(),
        mem_total_kib: meminfo_kib("MemTotal:"),
        mem_available_kib: meminfo_kib("MemAvailable:"),
        cpus,
        hostname: uname
            .as_ref()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: agent.boot_id.clone(),
    };
    let _ = stream.send(Body::InfoResponse(response)).await;
}

pub async fn configure(agent: &Arc<Agent>, req: pb::ConfigureRequest, stream: &StreamTx) {
    let mut errors = Vec::new();
    if let Err(e) = sys::add_entropy(&req.entropy_seed) {
        errors.push(format!("entropy: {e}"));
    }
    if let Err(e) = boot::set_clock(req.unix_time_ns) {
        errors.push(e);
    }
    if let Err(e) = boot::set_hostname(&req.hostname) {
        errors.push(e);
    }
    if let Some(net) = &req.network {
        if let Err(e) = boot::configure_eth0(&net.address, &net.gateway, &net.dns_servers, net.mtu)
        {
            errors.push(e);
        }
    }
    let mut env = Vec::with_capacity(req.env.len());
    for kv in &req.env {
        if kv.key.is_empty()
            || kv.key.contains('=')
            || kv.key.contains('\0')
            || kv.value.contains('\0')
        {
            errors.push(format!("invalid environment variable {:?}", kv.key));
        } else {
            env.push((kv.key.clone(), kv.value.clone()));
        }
    }
    *agent
        .extra_env
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = env;
    if req.start_sshd {
        boot::start_sshd(&agent.reaper).await;
    }
    if errors.is_empty() {
        let _ = stream.send(Body::Configured(pb::Configured {})).await;
    } else {
        let _ = stream
            .error(ErrorCode::InvalidArgument, errors.join("; "))
            .await;
    }
}

pub async fn shutdown(stream: &StreamTx) {
    let _ = stream
        .send(Body::ShutdownAccepted(pb::ShutdownAccepted {}))
        .await;
    // Give the writer a moment to put the acknowledgement on the wire before the machine
    // goes away; the host treats the VMM exiting as completion either way.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    power_off();
}

/// Stops every process, syncs and resets the machine (VMMs exit on reset). Never returns.
pub fn power_off() -> ! {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    log!("shutting down");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let _ = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    loop {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
