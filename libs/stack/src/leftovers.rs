//! What a `nanobox up` that was killed (`kill -9`, a power cut of the terminal) leaves
//! behind, found and removed by the next start of the same data directory: services still
//! running (by their pid files, checked against the process start time so that a reused
//! pid is never signalled) and VMMs still running from the node agent's state directory.
//! Namespaces are [`crate::network`]'s, and a running PostgreSQL [`crate::postgres`]'s.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::service::start_time;

/// How long a leftover service gets to stop after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(20);

/// Stops every process a pid file in `run_dir` names and that still runs; removes the
/// files. Returns the names of the services stopped.
pub(crate) async fn stop_services(run_dir: &Path) -> Vec<String> {
    let mut stopped = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return stopped;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let record = std::fs::read_to_string(&path).unwrap_or_default();
        let mut fields = record.split_whitespace();
        let pid = fields.next().and_then(|p| p.parse::<u32>().ok());
        let started = fields.next().and_then(|t| t.parse::<u64>().ok());
        if let (Some(pid), Some(started)) = (pid, started) {
            if start_time(pid) == Some(started) {
                terminate(pid).await;
                stopped.push(
                    path.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    stopped
}

/// Kills (SIGKILL) every VMM (QEMU or Firecracker) whose command line names `state_dir`:
/// each VMM's run directory lies there. Returns how many there were.
pub(crate) fn kill_vmms(state_dir: &Path) -> usize {
    let pids = vmm_processes(state_dir);
    for pid in &pids {
        if let Ok(pid) = i32::try_from(*pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    pids.len()
}

/// The VMM processes of [`kill_vmms`].
pub fn vmm_processes(state_dir: &Path) -> Vec<u32> {
    let needle = state_dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let is_vmm = contains(&cmdline, b"qemu") || contains(&cmdline, b"firecracker");
                is_vmm && contains(&cmdline, needle)
            })
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// SIGTERM, then SIGKILL after [`GRACE`].
async fn terminate(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let target = Pid::from_raw(raw);
    if kill(target, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + GRACE;
    // Not our child: poll for it to go (kill with no signal fails once it has).
    while Instant::now() < deadline {
        if kill(target, None).is_err() || is_zombie(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = kill(target, Signal::SIGKILL);
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}
