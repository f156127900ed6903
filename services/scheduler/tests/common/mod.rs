//! A small cluster as real processes: a private Postgres holding a READY template
//! (published as the template-builder publishes it: content-addressed ext4 plus sidecar
//! in a local object store, then the row), node agents (each with its own state directory
//! and its own private "host" network namespace) and the scheduler, all sharing one
//! service token. Adapted from the node agent's test harness.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_proto::v1;
use nanobox_proto::v1::cluster_client::ClusterClient;
use nanobox_proto::v1::sandboxes_client::SandboxesClient;
use nanobox_store::metadata::TemplateRecord;
use nanobox_store::rootfs::{rootfs_keys, RootfsInfo};
use nanobox_store::{LocalFsStore, MetadataStore, ObjectStore};
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::GuestArtifacts;
use tonic::transport::Channel;

pub const TEMPLATE: &str = "busybox";
pub const TOKEN: &str = "test-service-token-0123456789";

/// A child process, killed on drop.
pub struct Process {
    child: Option<Child>,
    pub addr: String,
}

impl Process {
    fn spawn(mut command: Command, what: &str) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{what} did not start: {line:?}"))
            .to_owned();
        Self {
            child: Some(child),
            addr,
        }
    }

    /// SIGKILL: no chance to clean up or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Runs a command and insists it worked.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node's "host" namespace with a default route out through a veth to a simulated
/// internet namespace (the agent needs a host interface for NAT).
fn make_namespaces(prefix: &str) -> String {
    let host = format!("{prefix}host");
    let internet = format!("{prefix}inet");
    run(&["ip", "netns", "add", &host]);
    run(&["ip", "netns", "add", &internet]);
    for args in [
        vec!["ip", "-n", &host, "link", "set", "lo", "up"],
        vec!["ip", "-n", &internet, "link", "set", "lo", "up"],
        vec![
            "ip", "-n", &host, "link", "add", "wan0", "type", "veth", "peer", "name", "wan0",
            "netns", &internet,
        ],
        vec![
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            "10.254.0.1/24",
            "dev",
            "wan0",
        ],
        vec!["ip", "-n", &host, "link", "set", "wan0", "up"],
        vec![
            "ip",
            "-n",
            &internet,
            "addr",
            "add",
            "10.254.0.2/24",
            "dev",
            "wan0",
        ],
        vec!["ip", "-n", &internet, "link", "set", "wan0", "up"],
        vec![
            "ip",
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            "10.254.0.2",
        ],
    ] {
        run(&args);
    }
    host
}

/// The node agent binary: `NANOBOX_NODE_AGENT_BIN`, else the one cargo built beside this
/// test (`cargo build -p nanobox-node-agent` first).
fn node_agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NANOBOX_NODE_AGENT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("node-agent"))
        .unwrap();
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p nanobox-node-agent` first",
        bin.display()
    );
    bin
}

pub struct Agent {
    pub node_id: String,
    pub process: Process,
    pub dir: PathBuf,
    pub ns_prefix: String,
}

impl Agent {
    /// VMM processes of this agent (their command lines name its state directory).
    pub fn vmm_processes(&self) -> Vec<u32> {
        let needle = self.dir.join("state").display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains(&needle) && cmdline.contains("qemu") {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.terminate();
        // VMs outlive a killed agent by design: kill what is left, whatever the test did.
        for pid in self.vmm_processes() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.ns_prefix) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}

pub struct Cluster {
    pub agents: Vec<Agent>,
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
            r#"
[database]
url = "host={socket} user=postgres dbname={db}"

[object_store]
location = "file://{objects}"

[scheduler]
heartbeat_interval_ms = 300
node_lost_after_sec = 3

[auth]
service_token = "{TOKEN}"
"#,
            socket = self.pg.socket_dir().display(),
            db = self.db.get_dbname().unwrap(),
            objects = self.objects_dir().display(),
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
        let mut command = Command::new(env!("CARGO_BIN_EXE_scheduler"));
        command.arg("--config").arg(&config).env("RUST_LOG", "info");
        self.scheduler = Some(Process::spawn(command, "scheduler"));
    }

    pub fn scheduler_addr(&self) -> String {
        self.scheduler.as_ref().unwrap().addr.clone()
    }

    /// Starts a node agent `node_id` registering with the scheduler; `extra` is more
    /// `nanobox.toml` text (a pool).
    pub fn start_agent(&mut self, node_id: &str, extra: &str) {
        let dir = self.dir.path().join(node_id);
        std::fs::create_dir_all(&dir).unwrap();
        let ns_prefix = format!("nbs{:08x}-", rand::random::<u32>());
        let host_ns = make_namespaces(&ns_prefix);
        let guest = GuestArtifacts::from_env();
        let config = format!(
            r#"
[agent]
node_id = "{node_id}"
listen_addr = "127.0.0.1:0"
scheduler_addr = "{scheduler}"
state_dir = "{state}"
capacity_vcpus = 4
capacity_memory_mb = 1024
run_as_user = "nobody"

[qemu]
kernel = "{kernel}"

[network]
bridge_name = "nbxbr0"
subnet = "10.100.0.0/16"
host_iface = "wan0"
dns_server = "10.254.0.2"
host_netns = "{host_ns}"
netns_prefix = "{ns_prefix}s-"
{common}
{extra}
"#,
            scheduler = self.scheduler_addr(),
            state = dir.join("state").display(),
            kernel = guest.kernel.display(),
            common = self.common_config(),
        );
        let path = dir.join("nanobox.toml");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(node_agent_bin());
        command.arg("--config").arg(&path).env("RUST_LOG", "info");
        let process = Process::spawn(command, "node-agent");
        self.agents.push(Agent {
            node_id: node_id.to_owned(),
            process,
            dir,
            ns_prefix,
        });
    }

    pub fn agent(&mut self, node_id: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.node_id == node_id)
            .unwrap()
    }

    /// Publishes the test root filesystem as template `name`.
    pub async fn publish_template(&self, name: &str) {
        let rootfs = GuestArtifacts::from_env().rootfs;
        let objects = LocalFsStore::open(self.objects_dir()).unwrap();
        let digest = format!("sha256:{}", sha256_file(&rootfs));
        let keys = rootfs_keys(&digest, "test").unwrap();
        let meta = objects.put_file(&keys.ext4, &rootfs).await.unwrap();
        let info = RootfsInfo {
            manifest_digest: digest.clone(),
            init_version: "test".into(),
            size_bytes: meta.size,
            sha256: meta.sha256.clone().unwrap(),
            config: ImageConfig::default(),
        };
        objects
            .put_bytes(&keys.info, serde_json::to_vec(&info).unwrap().into())
            .await
            .unwrap();
        self.meta()
            .await
            .upsert_template(&TemplateRecord {
                name: TemplateName::new(name).unwrap(),
                image_ref: "test/busybox:latest".into(),
                manifest_digest: Some(digest),
                rootfs_key: Some(keys.ext4.to_string()),
                size_bytes: Some(meta.size),
                image_config: ImageConfig::default(),
                state: TemplateState::Ready,
            })
            .await
            .unwrap();
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
        let deadline = Instant::now() + limit;
        loop {
            let nodes = self.nodes().await;
            if cond(&nodes) {
                return nodes;
            }
            assert!(Instant::now() < deadline, "{what}: {nodes:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
        // Agents first (their orderly shutdown destroys their VMs), then the scheduler.
        self.agents.clear();
        self.scheduler.take();
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

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}
