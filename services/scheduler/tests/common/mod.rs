//! A small cluster as real processes: a private Postgres holding a READY template
//! (published as the template-builder publishes it: content-addressed ext4 plus sidecar
//! in a local object store, then the row), node agents (each with its own state directory
//! and its own private "host" network namespace) and the scheduler, all sharing one
//! service token. Adapted from the node agent's test harness.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use nanobox_proto::v1;
use nanobox_proto::v1::cluster_client::ClusterClient;
use nanobox_proto::v1::sandboxes_client::SandboxesClient;
use nanobox_store::{LocalFsStore, MetadataStore};
use nanobox_testkit::config::{cluster_sections, storage_sections, AgentConfig};
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::node_agent::NodeAgent;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, workspace_bin, Process};
use nanobox_testkit::template::publish_template;
use nanobox_testkit::{wait_until, GuestArtifacts};
use tonic::transport::Channel;

pub const TEMPLATE: &str = "busybox";
pub const TOKEN: &str = "test-service-token-0123456789";

/// The node agent binary: `NANOBOX_NODE_AGENT_BIN`, else the one cargo built beside this
/// test (`cargo build -p nanobox-node-agent` first).
fn node_agent_bin() -> PathBuf {
    std::env::var_os("NANOBOX_NODE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_bin("nanobox-node-agent", "nanobox-node-agent"))
}

pub struct Cluster {
    pub agents: Vec<NodeAgent>,
    pub scheduler: Option<Process>,
    pub pg: Postgres,
    pub db: tokio_postgres::Config,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Postgres with the READY template and the scheduler (no agents yet).
    pub async fn start() -> Self {
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Self {
            agents: Vec::new(),
            scheduler: None,
            pg,
            db,
            dir,
        };
        cluster.publish_template(TEMPLATE).await;
        cluster.start_scheduler();
        cluster
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.dir.path().join("objects")
    }

    pub async fn meta(&self) -> MetadataStore {
        MetadataStore::open(self.db.clone(), Default::default())
            .await
            .unwrap()
    }

    fn common_config(&self) -> String {
        format!(
            "{}\n{}",
            storage_sections(&self.pg, &self.db, &self.objects_dir()),
            cluster_sections(TOKEN, 3)
        )
    }

    pub fn start_scheduler(&mut self) {
        let config = self.dir.path().join("scheduler.toml");
        std::fs::write(
            &config,
            format!(
                "[api]\ngrpc_addr = \"127.0.0.1:0\"\n{}",
                self.common_config()
            ),
        )
        .unwrap();
        self.scheduler = Some(Process::spawn(
            "scheduler",
            &mut service_command(env!("CARGO_BIN_EXE_nanobox-scheduler"), &config),
        ));
    }

    pub fn scheduler_addr(&self) -> String {
        self.scheduler.as_ref().unwrap().addr.clone()
    }

    /// Starts a node agent `node_id` registering with the scheduler, in namespaces of its
    /// own; `extra` is more `nanobox.toml` text (a pool).
    pub fn start_agent(&mut self, node_id: &str, extra: &str) {
        self.start_agent_with(node_id, 1024, true, extra);
    }

    /// Like [`Self::start_agent`], with `memory_mb` of capacity, registering with the
    /// scheduler only if `register`.
    pub fn start_agent_with(&mut self, node_id: &str, memory_mb: u64, register: bool, extra: &str) {
        let dir = self.dir.path().join(node_id);
        std::fs::create_dir_all(&dir).unwrap();
        let scheduler = self.scheduler_addr();
        let config = AgentConfig {
            node_id,
            scheduler_addr: register.then_some(scheduler.as_str()),
            state_dir: &dir.join("state"),
            capacity_vcpus: 4,
            capacity_memory_mb: memory_mb,
            run_as_user: Some("nobody"),
            kernel: &GuestArtifacts::from_env().kernel,
            rest: &format!("{}\n{extra}", self.common_config()),
        };
        self.agents.push(NodeAgent::start(
            &node_agent_bin(),
            &dir.join("nanobox.toml"),
            &config,
            NodeNet::with_internet("nbs"),
        ));
    }

    pub fn agent(&mut self, node_id: &str) -> &mut NodeAgent {
        self.agents
            .iter_mut()
            .find(|a| a.node_id == node_id)
            .unwrap()
    }

    /// Publishes the test root filesystem as template `name`.
    pub async fn publish_template(&self, name: &str) {
        let objects = LocalFsStore::open(self.objects_dir()).unwrap();
        let rootfs = GuestArtifacts::from_env().rootfs;
        publish_template(&self.meta().await, &objects, name, &rootfs).await;
    }

    pub async fn sandboxes(&self) -> SandboxesClient<Channel> {
        SandboxesClient::connect(format!("http://{}", self.scheduler_addr()))
            .await
            .unwrap()
    }

    pub async fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::connect(format!("http://{}", self.scheduler_addr()))
            .await
            .unwrap()
    }

    pub async fn nodes(&self) -> Vec<v1::Node> {
        self.cluster()
            .await
            .list_nodes(v1::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
    }

    /// Polls the node list until `cond` holds (hang guard: `limit`).
    pub async fn wait_nodes(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&[v1::Node]) -> bool,
    ) -> Vec<v1::Node> {
        let every = Duration::from_millis(200);
        wait_until(what, limit, every, async || self.nodes().await, |n| cond(n)).await
    }

    /// Runs `sh -c script` through the scheduler: stdout, stderr, exit code.
    pub async fn sh(&self, id: &str, script: &str) -> Result<(String, String, i32), tonic::Status> {
        let mut stream = self
            .sandboxes()
            .await
            .exec(v1::ExecRequest {
                id: id.into(),
                command: "sh".into(),
                args: vec!["-c".into(), script.into()],
                timeout_ms: 120_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
        while let Some(event) = stream.message().await? {
            match event.event.unwrap() {
                v1::exec_event::Event::Stdout(d) => out.extend(d),
                v1::exec_event::Event::Stderr(d) => err.extend(d),
                v1::exec_event::Event::Exit(x) => code = Some(x.exit_code),
            }
        }
        Ok((
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
            code.expect("an exit event"),
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (their orderly shutdown destroys their VMs), then the scheduler,
        // given the same chance to stop in order.
        self.agents.clear();
        if let Some(mut scheduler) = self.scheduler.take() {
            scheduler.terminate();
        }
    }
}

pub fn small(template: &str) -> v1::CreateSandboxRequest {
    v1::CreateSandboxRequest {
        template: template.into(),
        resources: Some(v1::Resources {
            vcpu: 1,
            memory_mb: 128,
            disk_mb: 0,
        }),
        ..Default::default()
    }
}
