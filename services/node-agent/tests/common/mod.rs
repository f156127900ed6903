//! A node agent as a real process with its real dependencies: a private Postgres holding
//! a READY template (the test root filesystem, published the way the template-builder
//! publishes: content-addressed ext4 plus sidecar in the object store, then the row), a
//! local-filesystem object store, a state directory, and a gRPC client.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use nanobox_proto::node::v1::node_agent_client::NodeAgentClient;
use nanobox_proto::node::v1::{self as node};
use nanobox_proto::v1;
use nanobox_store::{LocalFsStore, MetadataStore};
use nanobox_testkit::config::{storage_sections, AgentConfig};
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{kill_qemu_processes, qemu_processes, service_command, Process};
use nanobox_testkit::template::publish_template;
use nanobox_testkit::{wait_until, GuestArtifacts};
use tonic::transport::Channel;

/// The template every test creates sandboxes from.
pub const TEMPLATE: &str = "busybox";

pub struct Stack {
    pub pg: Postgres,
    pub db: tokio_postgres::Config,
    pub dir: tempfile::TempDir,
    /// The running node agent (killed with SIGKILL when dropped on its own).
    pub agent: Option<Process>,
    /// Extra `nanobox.toml` text (sections the test needs, such as pools).
    pub extra_config: String,
    /// The test's namespaces: the node's "host" namespace (bridge, NAT) and a simulated
    /// internet joined to it by a veth pair (`wan0`, 10.254.0.1 <-> 10.254.0.2); every
    /// namespace under their prefix, the sandboxes' included, is removed on drop.
    pub net: NodeNet,
    /// Environment overrides for the agent (`NANOBOX__SECTION__KEY`).
    pub env: Vec<(String, String)>,
}

impl Stack {
    /// Postgres, the object store with the READY template, and an agent started with
    /// `args` on top of the defaults.
    pub async fn start(extra_config: &str) -> Self {
        Self::start_with(extra_config, &[]).await
    }

    pub async fn start_with(extra_config: &str, env: &[(&str, &str)]) -> Self {
        let mut stack = Self::prepare(extra_config, env).await;
        stack.publish_template(TEMPLATE).await;
        stack.start_agent();
        stack
    }

    /// Postgres with an empty database (no schema yet), the namespaces, and no agent.
    pub async fn prepare(extra_config: &str, env: &[(&str, &str)]) -> Self {
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        Self {
            pg,
            db,
            dir,
            agent: None,
            extra_config: extra_config.to_owned(),
            net: NodeNet::with_internet("nbt"),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.dir.path().join("objects")
    }

    pub async fn meta(&self) -> MetadataStore {
        MetadataStore::open(self.db.clone(), Default::default())
            .await
            .unwrap()
    }

    /// Publishes the test root filesystem as template `name`.
    pub async fn publish_template(&self, name: &str) {
        let objects = LocalFsStore::open(self.objects_dir()).unwrap();
        let rootfs = GuestArtifacts::from_env().rootfs;
        publish_template(&self.meta().await, &objects, name, &rootfs).await;
    }

    /// The agent's `nanobox.toml`.
    pub fn config_text(&self) -> String {
        let rest = format!(
            "{}\n{}",
            storage_sections(&self.pg, &self.db, &self.objects_dir()),
            self.extra_config
        );
        AgentConfig {
            node_id: "node-test",
            scheduler_addr: None,
            state_dir: &self.state_dir(),
            capacity_vcpus: 64,
            capacity_memory_mb: 16384,
            // Every VMM drops to an unprivileged user once its devices are open.
            run_as_user: Some("nobody"),
            kernel: &GuestArtifacts::from_env().kernel,
            rest: &rest,
        }
        .to_toml(&self.net)
    }

    pub fn start_agent(&mut self) {
        let config = self.dir.path().join("nanobox.toml");
        std::fs::write(&config, self.config_text()).unwrap();
        self.agent = Some(Process::spawn(
            "node-agent",
            service_command(env!("CARGO_BIN_EXE_nanobox-node-agent"), &config)
                .envs(self.env.iter().map(|(k, v)| (k, v))),
        ));
    }

    pub async fn client(&self) -> NodeAgentClient<Channel> {
        let addr = &self.agent.as_ref().unwrap().addr;
        NodeAgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    pub async fn create(&self, request: node::CreateSandboxRequest) -> node::CreateSandboxResponse {
        self.client()
            .await
            .create_sandbox(request)
            .await
            .unwrap_or_else(|e| panic!("create: {e:?}"))
            .into_inner()
    }

    /// Runs `sh -c script` and returns stdout, stderr and the exit code.
    pub async fn sh(&self, id: &str, script: &str) -> (String, String, i32) {
        let mut stream = self
            .client()
            .await
            .exec(v1::ExecRequest {
                id: id.into(),
                command: "sh".into(),
                args: vec!["-c".into(), script.into()],
                timeout_ms: 120_000,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}"))
            .into_inner();
        let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
        while let Some(event) = stream.message().await.unwrap() {
            match event.event.unwrap() {
                v1::exec_event::Event::Stdout(d) => out.extend(d),
                v1::exec_event::Event::Stderr(d) => err.extend(d),
                v1::exec_event::Event::Exit(x) => code = Some(x.exit_code),
            }
        }
        (
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
            code.expect("an exit event"),
        )
    }

    pub async fn status(&self) -> node::NodeStatus {
        self.client()
            .await
            .get_node_status(node::GetNodeStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
    }

    /// Polls `cond` on the node status until it holds (hang guard: `limit`).
    pub async fn wait_status(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&node::NodeStatus) -> bool,
    ) -> node::NodeStatus {
        let every = Duration::from_millis(100);
        wait_until(what, limit, every, async || self.status().await, cond).await
    }

    /// Entries left in a state subdirectory.
    pub fn leftovers(&self, sub: &str) -> Vec<String> {
        match std::fs::read_dir(self.state_dir().join(sub)) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// VMM processes of this stack's agent.
    pub fn vmm_processes(&self) -> Vec<u32> {
        qemu_processes(&self.state_dir())
    }

    /// Namespaces of this stack's sandboxes (those the agent made).
    pub fn sandbox_namespaces(&self) -> Vec<String> {
        self.net.sandbox_namespaces()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The orderly shutdown destroys every sandbox; VMs outlive a killed agent by
        // design, so anything left after it is killed here, whatever the test did. The
        // namespaces go after this, with `net`.
        if let Some(mut agent) = self.agent.take() {
            agent.terminate();
        }
        kill_qemu_processes(&self.state_dir());
    }
}

pub fn create_request(template: &str) -> node::CreateSandboxRequest {
    node::CreateSandboxRequest {
        template: template.into(),
        resources: Some(v1::Resources {
            vcpu: 1,
            memory_mb: 128,
            disk_mb: 0,
        }),
        ..Default::default()
    }
}
