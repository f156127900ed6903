//! A node agent as a real process with its real dependencies: a private Postgres holding
//! a READY template (the test root filesystem, published the way the template-builder
//! publishes: content-addressed ext4 plus sidecar in the object store, then the row), a
//! local-filesystem object store, a state directory, and a gRPC client.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_proto::node::v1::node_agent_client::NodeAgentClient;
use nanobox_proto::node::v1::{self as node};
use nanobox_proto::v1;
use nanobox_store::metadata::TemplateRecord;
use nanobox_store::rootfs::{rootfs_keys, RootfsInfo};
use nanobox_store::{LocalFsStore, MetadataStore, ObjectStore};
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::GuestArtifacts;
use tonic::transport::Channel;

/// The template every test creates sandboxes from.
pub const TEMPLATE: &str = "busybox";

/// A running node agent; killed on drop.
pub struct AgentProcess {
    child: Child,
    pub addr: String,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait: the orderly shutdown.
    pub fn terminate(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

pub struct Stack {
    pub pg: Postgres,
    pub db: tokio_postgres::Config,
    pub dir: tempfile::TempDir,
    pub agent: Option<AgentProcess>,
    /// Extra `nanobox.toml` text (sections the test needs, such as pools).
    pub extra_config: String,
    /// The test's namespaces: the node's "host" namespace (bridge, NAT) and a simulated
    /// internet joined to it by a veth pair (`wan0`, 10.254.0.1 <-> 10.254.0.2).
    pub host_ns: String,
    pub internet_ns: String,
    /// Prefix of every namespace this stack makes (removed on drop).
    pub ns_prefix: String,
    /// Environment overrides for the agent (`NANOBOX__SECTION__KEY`).
    pub env: Vec<(String, String)>,
}

/// Runs a command and insists it worked.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_namespaces(prefix: &str) -> (String, String) {
    let host = format!("{prefix}host");
    let internet = format!("{prefix}inet");
    run(&["ip", "netns", "add", &host]);
    run(&["ip", "netns", "add", &internet]);
    for args in [
        vec!["ip", "-n", &host, "link", "set", "lo", "up"],
        vec!["ip", "-n", &internet, "link", "set", "lo", "up"],
        // Made inside the host namespace: no name ever appears in the root one.
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
    (host, internet)
}

impl Stack {
    /// Postgres, the object store with the READY template, and an agent started with
    /// `args` on top of the defaults.
    pub async fn start(extra_config: &str) -> Self {
        Self::start_with(extra_config, &[]).await
    }

    pub async fn start_with(extra_config: &str, env: &[(&str, &str)]) -> Self {
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let ns_prefix = format!("nbt{:08x}-", rand::random::<u32>());
        let (host_ns, internet_ns) = make_namespaces(&ns_prefix);
        let mut stack = Self {
            pg,
            db,
            dir,
            agent: None,
            extra_config: extra_config.to_owned(),
            host_ns,
            internet_ns,
            ns_prefix,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        stack.publish_template(TEMPLATE).await;
        stack.start_agent();
        stack
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

    /// The agent's `nanobox.toml`.
    pub fn config_text(&self) -> String {
        let guest = GuestArtifacts::from_env();
        format!(
            r#"
[agent]
node_id = "node-test"
listen_addr = "127.0.0.1:0"
state_dir = "{state}"
capacity_vcpus = 64
capacity_memory_mb = 16384
# Every VMM drops to an unprivileged user once its devices are open.
run_as_user = "nobody"

[qemu]
kernel = "{kernel}"

[network]
bridge_name = "nbxbr0"
subnet = "10.100.0.0/16"
host_iface = "wan0"
dns_server = "10.254.0.2"
host_netns = "{host_ns}"
netns_prefix = "{prefix}s-"

[database]
url = "host={socket} user=postgres dbname={db}"

[object_store]
location = "file://{objects}"

{extra}
"#,
            state = self.state_dir().display(),
            kernel = guest.kernel.display(),
            host_ns = self.host_ns,
            prefix = self.ns_prefix,
            socket = self.pg.socket_dir().display(),
            db = self.db.get_dbname().unwrap(),
            objects = self.objects_dir().display(),
            extra = self.extra_config,
        )
    }

    pub fn start_agent(&mut self) {
        let config = self.dir.path().join("nanobox.toml");
        std::fs::write(&config, self.config_text()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .arg("--config")
            .arg(&config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("node-agent did not start: {line:?}"))
            .to_owned();
        self.agent = Some(AgentProcess { child, addr });
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
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status().await;
            if cond(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: {status:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

    /// VMM processes whose command line mentions this stack's state directory.
    pub fn vmm_processes(&self) -> Vec<u32> {
        let needle = self.state_dir().display().to_string();
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

impl Drop for Stack {
    fn drop(&mut self) {
        // The orderly shutdown destroys every sandbox; VMs outlive a killed agent by
        // design, so anything left after it is killed here, whatever the test did.
        if let Some(agent) = self.agent.take() {
            agent.terminate();
        }
        for pid in self.vmm_processes() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // Every namespace of this stack, the sandboxes' included.
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

impl Stack {
    /// Namespaces of this stack's sandboxes (those the agent made).
    pub fn sandbox_namespaces(&self) -> Vec<String> {
        let prefix = format!("{}s-", self.ns_prefix);
        std::fs::read_dir("/run/netns")
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
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

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}
