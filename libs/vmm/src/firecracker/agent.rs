//! Reaching the guest agent of a booting Firecracker VM.
//!
//! Over Firecracker's hybrid vsock a `CONNECT` is refused (the connection closed) until
//! the guest's listener exists, so one attempt during boot fails where QEMU's
//! virtio-serial socket would simply wait. This retries until the agent answers, the
//! deadline passes or the VM exits.

use std::time::{Duration, Instant};

use nanobox_guest_client::AgentClient;

use crate::{connect_agent, Vm, VmState, VmmError};

/// How long one attempt (connect, `CONNECT`, handshake) may take.
const ATTEMPT: Duration = Duration::from_secs(5);
/// Pause between refused attempts.
const RETRY: Duration = Duration::from_millis(50);

/// Waits until the guest agent of `vm` answers, at most `timeout`; works for every
/// backend, retrying refused connections as a booting Firecracker guest needs.
pub async fn wait_for_agent(vm: &dyn Vm, timeout: Duration) -> Result<AgentClient, VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        if vm.state() == VmState::Exited {
            return Err(VmmError::Exited(format!(
                "{} before the guest agent answered",
                vm.wait().await
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmmError::Timeout(timeout, "the guest agent"));
        }
        match connect_agent(vm, left.min(ATTEMPT)).await {
            Ok(agent) => return Ok(agent),
            // The VM is gone: no retry will reach it (the error carries its console).
            Err(e @ VmmError::Exited(_)) => return Err(e),
            Err(e) => {
                tracing::trace!(vm = vm.id(), error = %e, "guest agent not answering yet");
                tokio::time::sleep(RETRY.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
    }
}
