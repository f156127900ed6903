//! Connecting to a VM's guest agent, racing the VM's exit so a guest that dies during
//! boot is reported at once instead of after the timeout.

use std::time::Duration;

use nanobox_guest_client::{connect_firecracker_vsock, AgentClient};
use tokio::net::UnixStream;

use crate::{AgentEndpoint, Vm, VmmError};

/// One vsock connection attempt's bound.
const VSOCK_ATTEMPT: Duration = Duration::from_secs(2);
/// Pause between vsock connection attempts while the guest boots.
const VSOCK_RETRY: Duration = Duration::from_millis(20);

/// Waits until the guest agent of `vm` answers, at most `timeout`.
pub async fn connect_agent(vm: &dyn Vm, timeout: Duration) -> Result<AgentClient, VmmError> {
    let attempt = async {
        let stream = match vm.agent_endpoint() {
            AgentEndpoint::Unix(path) => UnixStream::connect(&path)
                .await
                .map_err(|e| VmmError::io(format!("connecting to {}", path.display()), e))?,
            // Firecracker's vsock socket refuses connections (or the guest port does)
            // until the guest's agent listens: retry until it does; the timeout and the
            // VM's exit below bound the loop.
            AgentEndpoint::FirecrackerVsock { uds, port } => loop {
                match connect_firecracker_vsock(&uds, port, VSOCK_ATTEMPT).await {
                    Ok(stream) => break stream,
                    Err(e) => {
                        tracing::trace!(vm = vm.id(), error = %e, "guest agent not listening yet");
                        tokio::time::sleep(VSOCK_RETRY).await;
                    }
                }
            },
        };
        Ok::<_, VmmError>(AgentClient::connect(stream, timeout).await?)
    };
    tokio::select! {
        result = tokio::time::timeout(timeout, attempt) => match result {
            Ok(r) => r,
            Err(_) => Err(VmmError::Timeout(timeout, "the guest agent")),
        },
        exit = vm.wait() => Err(VmmError::Exited(format!(
            "{exit} before the guest agent answered; console:\n{}",
            last_lines(&vm.console_tail(), 20)
        ))),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
