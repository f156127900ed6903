//! nanobox-init: PID 1 and guest agent of every NanoBox microVM.
//!
//! As PID 1 it mounts the pseudo filesystems, brings up loopback, reaps orphans and never
//! exits. As the agent it serves the protocol in `proto/nanobox/guest/v1/agent.proto` on a
//! virtio-serial port (QEMU) or AF_VSOCK (Firecracker). The host trusts nothing this
//! binary says, but this binary trusts its host: the guest belongs to the host.
//!
//! A failing exec, a crashing child or a malformed frame is an error reply on its stream,
//! never the end of the init: the kernel panics when PID 1 exits.

pub mod agent;
pub mod boot;
pub mod control;
pub mod exec;
pub mod files;
pub mod image;
pub mod reaper;
mod sys;
pub mod transport;

/// Writes one line to the console (stderr of PID 1 is /dev/console).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "nanobox-init: {}", format_args!($($arg)*));
    }};
}

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanobox_agent_protocol::{READY_MARKER, VIRTIO_PORT_NAME, VSOCK_PORT};

use crate::agent::Agent;
use crate::image::{ImageConfig, IMAGE_CONFIG_PATH};
use crate::reaper::Reaper;

/// Virtio device ids as found in /sys/bus/virtio/devices/*/device.
const VIRTIO_ID_CONSOLE: u32 = 3;
const VIRTIO_ID_VSOCK: u32 = 19;

/// How long to wait for the host to name the agent's virtio-serial port after boot.
const PORT_NAME_WAIT: Duration = Duration::from_secs(10);
/// While no host is attached to the virtio port, check again this often.
const RECONNECT_POLL: Duration = Duration::from_millis(20);

fn build_agent() -> std::io::Result<Arc<Agent>> {
    let reaper = Reaper::start()?;
    let image = crate::image::load(Path::new(IMAGE_CONFIG_PATH)).unwrap_or_else(|e| {
        log!("ignoring image config: {e}");
        ImageConfig::default()
    });
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Ok(Arc::new(Agent {
        reaper,
        image,
        extra_env: Mutex::new(Vec::new()),
        boot_id,
        started: Instant::now(),
    }))
}

fn virtio_device_ids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("device")).ok())
        .filter_map(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .collect()
}

/// Runs the agent as PID 1 (or as a plain process for tests). Never returns.
pub async fn run_init() -> ! {
    let agent = loop {
        match build_agent() {
            Ok(agent) => break agent,
            Err(e) => {
                log!("starting agent: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        let devices = virtio_device_ids();
        if devices.contains(&VIRTIO_ID_VSOCK) {
            match transport::VsockListener::bind(VSOCK_PORT) {
                Ok(listener) => serve_vsock(agent.clone(), listener).await,
                Err(e) => log!("vsock listen on port {VSOCK_PORT}: {e}"),
            }
        } else if devices.contains(&VIRTIO_ID_CONSOLE) {
            match transport::find_virtio_port(VIRTIO_PORT_NAME, PORT_NAME_WAIT).await {
                Some(path) => serve_port(agent.clone(), &path).await,
                None => log!("no virtio-serial port named {VIRTIO_PORT_NAME}"),
            }
        } else {
            log!("no agent channel: the VM has neither a vsock nor a virtio-serial device");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn announce_ready() {
    use std::io::Write as _;
    // One write so the marker is never interleaved with kernel output.
    let _ = std::io::stdout().write_all(format!("{READY_MARKER}\n").as_bytes());
    let _ = std::io::stdout().flush();
}

async fn serve_port(agent: Arc<Agent>, path: &Path) {
    let stream = match transport::open_port(path) {
        Ok(s) => s,
        Err(e) => {
            log!("opening {}: {e}", path.display());
            return;
        }
    };
    announce_ready();
    loop {
        if !transport::port_host_connected(&stream) {
            tokio::time::sleep(RECONNECT_POLL).await;
            continue;
        }
        agent::serve(agent.clone(), stream.clone(), stream.clone(), true).await;
    }
}

async fn serve_vsock(agent: Arc<Agent>, listener: transport::VsockListener) {
    announce_ready();
    loop {
        match listener.accept().await {
            Ok(conn) => {
                let agent = agent.clone();
                tokio::spawn(async move { agent::serve(agent, conn.clone(), conn, true).await });
            }
            Err(e) => {
                log!("vsock accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection on stdin/stdout and returns when it closes: lets host-side tests
/// exercise the agent without a VM.
pub async fn run_stdio() -> std::io::Result<()> {
    let agent = build_agent()?;
    agent::serve(agent, tokio::io::stdin(), tokio::io::stdout(), true).await;
    Ok(())
}
