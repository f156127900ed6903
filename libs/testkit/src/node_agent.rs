//! A node agent as a real process, in namespaces of its own, cleaned up after whatever the
//! test did.

use std::path::{Path, PathBuf};

use crate::config::AgentConfig;
use crate::netns::NodeNet;
use crate::process::{kill_qemu_processes, qemu_processes, service_command, Process};

/// How long a dropped agent may take to stop in order (destroying its VMs).
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A running node agent. Dropping it stops it in order (SIGTERM: it destroys its VMs;
/// SIGKILL after [`STOP_GRACE`]), kills any VMM still running from its state directory
/// (VMs outlive a killed agent by design), and then removes its namespaces.
#[derive(Debug)]
pub struct NodeAgent {
    /// Its `[agent] node_id`.
    pub node_id: String,
    pub process: Process,
    state_dir: PathBuf,
    // Last: removed once the agent and its VMs are gone.
    pub net: NodeNet,
}

impl NodeAgent {
    /// Writes `config` for the namespaces `net` to `file` and starts the node agent binary
    /// `bin` with it; returns once it serves.
    pub fn start(bin: &Path, file: &Path, config: &AgentConfig<'_>, net: NodeNet) -> Self {
        Self::start_with_env(bin, file, config, net, &[])
    }

    /// [`NodeAgent::start`] with further environment variables for the process (such as
    /// `NANOBOX__AGENT__METRICS_ADDR` overrides of keys the config does not write).
    pub fn start_with_env(
        bin: &Path,
        file: &Path,
        config: &AgentConfig<'_>,
        net: NodeNet,
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::write(file, config.to_toml(&net))
            .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
        let mut command = service_command(bin, file);
        command.envs(env.iter().copied());
        let process = Process::spawn("node-agent", &mut command);
        Self {
            node_id: config.node_id.to_owned(),
            process,
            state_dir: config.state_dir.to_owned(),
            net,
        }
    }

    /// Its `[agent] state_dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Pids of its VMMs (their command lines name its state directory).
    pub fn vmm_processes(&self) -> Vec<u32> {
        qemu_processes(&self.state_dir)
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.process.stop(STOP_GRACE);
        kill_qemu_processes(&self.state_dir);
    }
}
