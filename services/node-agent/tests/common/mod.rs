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
    pub args: Vec<String>,
}

impl Stack {
    /// Postgres, the object store with the READY template, and an agent started with
    /// `args` on top of the defaults.
    pub async fn start(args: &[&str]) -> Self {
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let mut stack = Self {
            pg,
            db,
            dir,
            agent: None,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
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

    pub fn start_agent(&mut self) {
        let guest = GuestArtifacts::from_env();
        let db = format!(
            "host={} user=postgres dbname={}",
            self.pg.socket_dir().display(),
            self.db.get_dbname().unwrap()
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["--listen", "127.0.0.1:0", "--node-id", "node-test"])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--kernel")
            .arg(&guest.kernel)
            .args(["--database-url", &db])
            .arg("--object-store")
            .arg(format!("file://{}", self.objects_dir().display()))
            .args(&self.args)
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
