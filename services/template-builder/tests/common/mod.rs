//! The template-builder as a real process, with its real dependencies: a private Postgres,
//! a local registry, a local-filesystem object store, and a gRPC client. The builder is
//! configured by a `nanobox.toml` the harness writes, with an API key the client sends.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nanobox_proto::v1::templates_client::TemplatesClient;
use nanobox_proto::v1::{self, TemplateState, WarmupTask};
use nanobox_scheduler::auth::ClientAuth;
use nanobox_store::{LocalFsStore, MetadataStore, ObjectStore};
use nanobox_testkit::guest_init;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, Process};
use nanobox_testkit::registry::Registry;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The API key the harness configures (`[api].api_keys`) and its client sends.
pub const API_KEY: &str = "template-builder-test-key-0123456789";

/// A TOML basic string holding `s` (Rust's debug quoting escapes what TOML needs escaped
/// for the paths and URLs used here).
pub fn toml_str(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

/// A Templates client that sends `key` (nothing when `None`).
pub type Client = TemplatesClient<InterceptedService<Channel, ClientAuth>>;

/// How long a warmup may take before a test gives up (hang guard: the Debian image is
/// ~370 MB and the machine is shared).
pub const WARMUP_TIMEOUT: Duration = Duration::from_secs(600);

/// Everything a template-builder needs, and the builder.
pub struct Stack {
    pub pg: Postgres,
    pub db: tokio_postgres::Config,
    pub registry: Registry,
    pub dir: tempfile::TempDir,
    pub builder: Option<Process>,
    /// `[api].api_keys` of the next start; empty leaves the API open.
    pub api_keys: Vec<String>,
    /// More `nanobox.toml` text for the next start, appended to the harness's own.
    pub extra_config: String,
    /// Environment of the next start (`NANOBOX__SECTION__KEY` overrides).
    pub extra_env: Vec<(String, String)>,
}

impl Stack {
    pub async fn start() -> Self {
        Self::with_registry(Registry::start()).await
    }

    pub async fn with_registry(registry: Registry) -> Self {
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let mut stack = Self {
            pg,
            db,
            registry,
            dir,
            builder: None,
            api_keys: vec![API_KEY.to_owned()],
            extra_config: String::new(),
            extra_env: Vec::new(),
        };
        stack.start_builder();
        stack
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.dir.path().join("objects")
    }

    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// `registry/name:tag` on the stack's registry.
    pub fn image(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.registry.host)
    }

    /// The configuration file the builder is started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("nanobox.toml")
    }

    /// Writes the configuration file (`[builder]`, `[oci]`, `[database]`,
    /// `[object_store]`, `[api]`, then [`Stack::extra_config`]) and starts the builder
    /// with `--config`.
    pub fn start_builder(&mut self) {
        let db = self.pg.url(&self.db);
        let keys: Vec<String> = self.api_keys.iter().map(toml_str).collect();
        let config = format!(
            "[builder]\nlisten_addr = \"127.0.0.1:0\"\nwork_dir = {work}\n\n\
             [oci]\ninit_binary = {init}\nplain_http_registries = [{registry}]\n\n\
             [database]\nurl = {db}\n\n\
             [object_store]\nlocation = {objects}\n\n\
             [api]\napi_keys = [{keys}]\n\n{extra}\n",
            work = toml_str(self.work_dir().to_string_lossy()),
            init = toml_str(guest_init().to_string_lossy()),
            registry = toml_str(&self.registry.host),
            db = toml_str(db),
            objects = toml_str(format!("file://{}", self.objects_dir().display())),
            keys = keys.join(", "),
            extra = self.extra_config,
        );
        std::fs::write(self.config_path(), config).unwrap();
        self.builder = Some(Process::spawn(
            "template-builder",
            service_command(
                env!("CARGO_BIN_EXE_nanobox-template-builder"),
                &self.config_path(),
            )
            .envs(self.extra_env.iter().map(|(k, v)| (k, v))),
        ));
    }

    /// The builder's address (`host:port`).
    pub fn addr(&self) -> String {
        self.builder.as_ref().unwrap().addr.clone()
    }

    /// A Templates client sending the harness's API key.
    pub async fn client(&self) -> Client {
        self.client_with_key(Some(API_KEY)).await
    }

    /// A Templates client sending `key` as `authorization: Bearer <key>` (nothing when
    /// `None`).
    pub async fn client_with_key(&self, key: Option<&str>) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TemplatesClient::with_interceptor(channel, ClientAuth::new(key).unwrap())
    }

    pub async fn meta(&self) -> MetadataStore {
        MetadataStore::open(self.db.clone(), Default::default())
            .await
            .unwrap()
    }

    pub fn objects(&self) -> LocalFsStore {
        LocalFsStore::open(self.objects_dir()).unwrap()
    }

    /// Keys of every object in the store.
    pub async fn object_keys(&self) -> Vec<String> {
        self.objects()
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key.to_string())
            .collect()
    }

    pub async fn warmup(&self, name: &str, image: &str) -> WarmupTask {
        self.client()
            .await
            .warmup(v1::WarmupRequest {
                name: name.into(),
                image: image.into(),
                platform: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("warmup {name}: {e}"))
            .into_inner()
            .task
            .unwrap()
    }

    /// Polls `Status` until the task ends; returns the final task and every state seen.
    pub async fn wait(&self, name: &str) -> (WarmupTask, Vec<TemplateState>) {
        let mut client = self.client().await;
        let deadline = Instant::now() + WARMUP_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let task = client
                .status(v1::GetTemplateStatusRequest { name: name.into() })
                .await
                .unwrap_or_else(|e| panic!("status {name}: {e}"))
                .into_inner()
                .task
                .unwrap();
            let state = task.state();
            if seen.last() != Some(&state) {
                seen.push(state);
            }
            if matches!(state, TemplateState::Ready | TemplateState::Failed) {
                return (task, seen);
            }
            assert!(
                Instant::now() < deadline,
                "warmup of {name} hangs: {task:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
