//! The scheduler end to end: Postgres, two real node agents (each in its own network
//! namespace, one with a warm pool), the scheduler, real guests under QEMU. Creates are
//! placed (the pool first), exec/get/list/keepalive/delete go through the scheduler, bad
//! input gets the right codes, internal calls need the service token, a sandbox paused
//! and resumed through the scheduler keeps its processes and memory (and frees its node's
//! capacity while paused), and a node killed with -9 gets no new sandboxes while its
//! running sandboxes become LOST and its paused ones cannot resume (UNAVAILABLE).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use common::{small, Cluster, TEMPLATE, TOKEN};
use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_proto::node::v1 as node;
use nanobox_proto::v1::{self, NodeState, SandboxState};
use nanobox_store::metadata::TemplateRecord;
use nanobox_testkit::config::pool_sections;
use tonic::Code;

/// sb1's lifetime: what a keepalive or resume with timeout 0 gives it again.
const CREATION_TIMEOUT_SEC: u32 = 300;

fn expires(s: &v1::Sandbox) -> SystemTime {
    SystemTime::try_from(s.expires_at.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_place_route_and_lose_a_node() {
    let mut cluster = Cluster::start().await;
    cluster.start_agent("node-a", &pool_sections(TEMPLATE, 1, 600));
    cluster.start_agent("node-b", "");
    let nodes = cluster
        .wait_nodes(
            "both nodes registered, node-a with a ready pool VM",
            Duration::from_secs(240),
            |nodes| {
                nodes.len() == 2
                    && nodes.iter().all(|n| n.state() == NodeState::Ready)
                    && nodes[0].ready_pool.get(TEMPLATE) == Some(&1)
            },
        )
        .await;
    assert_eq!(nodes[0].id, "node-a");
    assert_eq!(nodes[1].id, "node-b");
    assert_eq!(nodes[1].capacity.unwrap().vcpu, 4);
    assert!(
        nodes[0].cached_templates.iter().any(|t| t == TEMPLATE),
        "{nodes:?}"
    );

    let mut api = cluster.sandboxes().await;

    // Bad input, each with its code and a message naming the problem.
    let err = api.create(small("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("template nope not found"), "{err:?}");
    cluster
        .meta()
        .await
        .upsert_template(&TemplateRecord {
            name: TemplateName::new("building").unwrap(),
            image_ref: "test/x:1".into(),
            manifest_digest: None,
            rootfs_key: None,
            size_bytes: None,
            image_config: ImageConfig::default(),
            state: TemplateState::Building,
        })
        .await
        .unwrap();
    let err = api.create(small("building")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not ready (BUILDING)"), "{err:?}");
    let mut too_many = small(TEMPLATE);
    too_many.resources.as_mut().unwrap().vcpu = 33;
    let err = api.create(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("resources.vcpu"), "{err:?}");
    let mut too_big = small(TEMPLATE);
    too_big.resources.as_mut().unwrap().memory_mb = 4096;
    let err = api.create(too_big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("node-a: ") && err.message().contains("MiB memory free"),
        "{err:?}"
    );
    let err = api
        .get(v1::GetSandboxRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let unknown = nanobox_core::SandboxId::new().to_string();
    let err = api
        .get(v1::GetSandboxRequest {
            id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(&unknown), "{err:?}");
    let err = api
        .pause(v1::PauseSandboxRequest {
            id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(&unknown), "{err:?}");
    let err = api
        .resume(v1::ResumeSandboxRequest {
            id: unknown.clone(),
            timeout_sec: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Internal calls need the service token.
    let mut registry = node::node_registry_client::NodeRegistryClient::connect(format!(
        "http://{}",
        cluster.scheduler_addr()
    ))
    .await
    .unwrap();
    let err = registry
        .heartbeat(node::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut wrong = tonic::Request::new(node::HeartbeatRequest::default());
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-the-token-at-all".parse().unwrap(),
    );
    assert_eq!(
        registry.heartbeat(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let agent_b = cluster.agent("node-b").process.addr.clone();
    let mut node_b = node::node_agent_client::NodeAgentClient::connect(format!("http://{agent_b}"))
        .await
        .unwrap();
    let err = node_b
        .list_sandboxes(node::ListSandboxesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut right = tonic::Request::new(node::ListSandboxesRequest {});
    right
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    assert!(node_b.list_sandboxes(right).await.is_ok());

    // Placement prefers the node with a ready pool VM.
    let mut request = small(TEMPLATE);
    request.env = [("GREETING".to_owned(), "hello".to_owned())].into();
    request.metadata = [("owner".to_owned(), "test".to_owned())].into();
    request.timeout_sec = CREATION_TIMEOUT_SEC;
    let sb1 = api
        .create(request)
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(sb1.state(), SandboxState::Running, "{sb1:?}");
    assert_eq!(sb1.node_id, "node-a");
    assert_eq!(sb1.template, TEMPLATE);
    assert!(sb1.template_digest.starts_with("sha256:"));
    assert!(sb1.boot_time_ms > 0);

    // Exec through the scheduler.
    let (out, err, code) = cluster.sh(&sb1.id, "echo hi").await.unwrap();
    assert_eq!((out.as_str(), code), ("hi\n", 0), "{err}");
    let (out, _, _) = cluster
        .sh(&sb1.id, "hostname; echo $GREETING")
        .await
        .unwrap();
    assert_eq!(out, format!("{}\nhello\n", sb1.id));

    // Get, list (with filters), keepalive.
    let got = api
        .get(v1::GetSandboxRequest { id: sb1.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(
        (got.state(), got.node_id.as_str()),
        (SandboxState::Running, "node-a")
    );
    assert_eq!(got.metadata["owner"], "test");
    let list = |r: v1::ListSandboxesRequest| {
        let mut api = api.clone();
        async move { api.list(r).await.unwrap().into_inner().sandboxes }
    };
    assert_eq!(list(Default::default()).await.len(), 1);
    assert!(list(v1::ListSandboxesRequest {
        node_id: "node-b".into(),
        ..Default::default()
    })
    .await
    .is_empty());
    assert_eq!(
        list(v1::ListSandboxesRequest {
            metadata: [("owner".to_owned(), "test".to_owned())].into(),
            ..Default::default()
        })
        .await
        .len(),
        1
    );
    let kept = api
        .keepalive(v1::KeepaliveSandboxRequest {
            id: sb1.id.clone(),
            timeout_sec: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let kept = SystemTime::try_from(kept.expires_at.unwrap()).unwrap();
    assert!(kept > expires(&sb1) + Duration::from_secs(3000), "{kept:?}");

    pause_and_resume(&cluster, &sb1).await;

    // Idempotent create, then delete it (twice: NOT_FOUND) and exec on it.
    let mut keyed = small(TEMPLATE);
    keyed.request_id = "request-1".into();
    let sb2 = api
        .create(keyed.clone())
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    let again = api
        .create(keyed)
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(again.id, sb2.id);
    let deleted = api
        .delete(v1::DeleteSandboxRequest {
            id: sb2.id.clone(),
            delete_snapshot: false,
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(deleted.state(), SandboxState::Stopped, "{deleted:?}");
    let err = api
        .delete(v1::DeleteSandboxRequest {
            id: sb2.id.clone(),
            delete_snapshot: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = cluster.sh(&sb2.id, "true").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("STOPPED"), "{err:?}");

    let stats = cluster
        .cluster()
        .await
        .get_stats(v1::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(
        stats.sandboxes_by_state.get("RUNNING"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(
        stats.sandboxes_by_state.get("STOPPED"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!((stats.nodes_total, stats.nodes_ready), (2, 2));
    assert_eq!((stats.templates_total, stats.templates_ready), (2, 1));

    // A sandbox paused on node-a when it dies: (node-a's pool VM makes it land there.)
    cluster
        .wait_nodes(
            "node-a's pool refilled",
            Duration::from_secs(240),
            |nodes| nodes[0].ready_pool.get(TEMPLATE) == Some(&1),
        )
        .await;
    let sb_paused = api
        .create(small(TEMPLATE))
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(sb_paused.node_id, "node-a", "{sb_paused:?}");
    api.pause(v1::PauseSandboxRequest {
        id: sb_paused.id.clone(),
    })
    .await
    .unwrap();

    // node-a dies without a word: it becomes LOST, so does its running sandbox, and new
    // sandboxes go to node-b.
    cluster.agent("node-a").process.kill();
    cluster
        .wait_nodes("node-a lost", Duration::from_secs(30), |nodes| {
            nodes[0].state() == NodeState::Lost
        })
        .await;
    let lost = api
        .get(v1::GetSandboxRequest { id: sb1.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(lost.state(), SandboxState::Lost, "{lost:?}");
    assert!(lost.message.contains("heartbeat"), "{lost:?}");
    let err = cluster.sh(&sb1.id, "true").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Its paused sandbox stays PAUSED (the snapshot is on node-a's disk), but only node-a
    // can resume it.
    let still = api
        .get(v1::GetSandboxRequest {
            id: sb_paused.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(still.state(), SandboxState::Paused, "{still:?}");
    let err = api
        .resume(v1::ResumeSandboxRequest {
            id: sb_paused.id.clone(),
            timeout_sec: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("node node-a") && err.message().contains("lost"),
        "{err:?}"
    );
    let sb3 = api
        .create(small(TEMPLATE))
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(sb3.node_id, "node-b", "{sb3:?}");
    let (out, _, code) = cluster.sh(&sb3.id, "echo hi").await.unwrap();
    assert_eq!((out.as_str(), code), ("hi\n", 0));
    // Deleting the lost sandbox settles it.
    let deleted = api
        .delete(v1::DeleteSandboxRequest {
            id: sb1.id.clone(),
            delete_snapshot: false,
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(deleted.state(), SandboxState::Stopped, "{deleted:?}");
    // Deleting the paused one cannot reach node-a: STOPPING, then STOPPED once the
    // reconcile pass gives up on the lost node (which destroys it if it ever returns).
    let deleted = api
        .delete(v1::DeleteSandboxRequest {
            id: sb_paused.id.clone(),
            delete_snapshot: true,
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert!(
        matches!(
            deleted.state(),
            SandboxState::Stopping | SandboxState::Stopped
        ),
        "{deleted:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = api
            .get(v1::GetSandboxRequest {
                id: sb_paused.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .sandbox
            .unwrap();
        if got.state() == SandboxState::Stopped {
            assert!(got.snapshot_id.is_empty(), "{got:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pauses `sb` (running on node-a) and resumes it through the scheduler: a process and
/// a tmpfs file that exist only in the guest's memory survive, exec and keepalive on the
/// paused sandbox are refused as paused, and node-a's allocation gives its share back.
async fn pause_and_resume(cluster: &Cluster, sb: &v1::Sandbox) {
    let mut api = cluster.sandboxes().await;
    let (out, err, code) = cluster
        .sh(
            &sb.id,
            "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!; echo kept > /dev/shm/x",
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let pid: u32 = out.trim().parse().unwrap();
    // Capacity: measured with node-a's pool full, so nothing else moves its numbers.
    let before = cluster
        .wait_nodes(
            "node-a's pool refilled",
            Duration::from_secs(240),
            |nodes| nodes[0].ready_pool.get(TEMPLATE) == Some(&1),
        )
        .await[0]
        .allocated
        .unwrap();

    let paused = api
        .pause(v1::PauseSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let record = paused.sandbox.clone().unwrap();
    assert_eq!(record.state(), SandboxState::Paused, "{paused:?}");
    assert!(!record.snapshot_id.is_empty(), "{paused:?}");
    assert_eq!(record.node_id, "node-a", "{paused:?}");
    assert!(record.ip.is_empty(), "{paused:?}");
    assert!(record.expires_at.is_none(), "{paused:?}");
    assert!(paused.snapshot_size_bytes > 0, "{paused:?}");
    let got = api
        .get(v1::GetSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(
        (got.state(), got.snapshot_id.as_str()),
        (SandboxState::Paused, record.snapshot_id.as_str())
    );
    let listed = api
        .list(v1::ListSandboxesRequest {
            state: SandboxState::Paused.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let stats = cluster
        .cluster()
        .await
        .get_stats(v1::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(
        stats.sandboxes_by_state.get("PAUSED"),
        Some(&1),
        "{stats:?}"
    );
    // A paused sandbox holds no vCPUs or memory on its node.
    cluster
        .wait_nodes(
            "node-a reports the paused sandbox's share free",
            Duration::from_secs(30),
            |nodes| {
                let now = nodes[0].allocated.unwrap();
                now.vcpu + sb.resources.unwrap().vcpu == before.vcpu
                    && now.memory_mb + sb.resources.unwrap().memory_mb == before.memory_mb
            },
        )
        .await;

    // It has no VM: exec, keepalive and a second pause are refused, naming the state.
    let err = cluster.sh(&sb.id, "true").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is paused; resume it first"),
        "{err:?}"
    );
    let err = api
        .keepalive(v1::KeepaliveSandboxRequest {
            id: sb.id.clone(),
            timeout_sec: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is paused; resume it first"),
        "{err:?}"
    );
    let err = api
        .pause(v1::PauseSandboxRequest { id: sb.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("PAUSED"), "{err:?}");
    let err = api
        .resume(v1::ResumeSandboxRequest {
            id: sb.id.clone(),
            timeout_sec: 999_999,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Resumed with its creation timeout (not the keepalive's), on the node holding the
    // snapshot.
    let lifetime = Duration::from_secs(CREATION_TIMEOUT_SEC.into());
    let asked = SystemTime::now();
    let resumed = api
        .resume(v1::ResumeSandboxRequest {
            id: sb.id.clone(),
            timeout_sec: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    let answered = SystemTime::now();
    assert_eq!(resumed.state(), SandboxState::Running, "{resumed:?}");
    assert_eq!(resumed.node_id, "node-a", "{resumed:?}");
    assert_eq!(resumed.snapshot_id, record.snapshot_id, "{resumed:?}");
    assert!(resumed.boot_time_ms > 0, "{resumed:?}");
    // (A second either side for the timestamps' rounding.)
    let slack = Duration::from_secs(1);
    assert!(
        expires(&resumed) + slack >= asked + lifetime
            && expires(&resumed) <= answered + lifetime + slack,
        "resumed until {:?}, asked at {asked:?}, answered at {answered:?}",
        expires(&resumed)
    );
    let (out, err, code) = cluster
        .sh(&sb.id, &format!("kill -0 {pid} && cat /dev/shm/x"))
        .await
        .unwrap();
    assert_eq!((out.as_str(), code), ("kept\n", 0), "{err}");
    let err = api
        .resume(v1::ResumeSandboxRequest {
            id: sb.id.clone(),
            timeout_sec: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("RUNNING; resume needs it PAUSED"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_refuses_for_capacity_passes_the_create_on() {
    let mut cluster = Cluster::start().await;
    cluster.start_agent("node-a", "");
    // A real node agent with room for no 256 MiB sandbox, which does not register itself...
    cluster.start_agent_with("spare", 128, false, "");
    cluster
        .wait_nodes("node-a registered", Duration::from_secs(240), |nodes| {
            nodes.len() == 1 && nodes[0].state() == NodeState::Ready
        })
        .await;
    // ...and a report for it that says it is roomy with a warm pool: what a report sent
    // just before the node filled up looks like. Placement ranks it first.
    let spare = cluster.agent("spare").process.addr.clone();
    let mut registry = node::node_registry_client::NodeRegistryClient::connect(format!(
        "http://{}",
        cluster.scheduler_addr()
    ))
    .await
    .unwrap();
    let mut register = tonic::Request::new(node::RegisterRequest {
        status: Some(node::NodeStatus {
            node_id: "stale".into(),
            address: spare,
            capacity: Some(v1::Resources {
                vcpu: 8,
                memory_mb: 65536,
                disk_mb: 0,
            }),
            allocated: Some(v1::Resources::default()),
            pools: vec![node::TemplatePool {
                template: TEMPLATE.into(),
                ready: 4,
                min_ready: 4,
                max_ready: 4,
                ..Default::default()
            }],
            ..Default::default()
        }),
        version: "test".into(),
        vmm: "qemu".into(),
        ..Default::default()
    });
    register
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    registry.register(register).await.unwrap();

    let mut request = small(TEMPLATE);
    request.resources = Some(v1::Resources {
        vcpu: 1,
        memory_mb: 256,
        disk_mb: 0,
    });
    let mut api = cluster.sandboxes().await;
    let created = api
        .create(request.clone())
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(created.state(), SandboxState::Running, "{created:?}");
    assert_eq!(
        created.node_id, "node-a",
        "the refusal passed it on: {created:?}"
    );
    let (out, _, code) = cluster.sh(&created.id, "echo placed").await.unwrap();
    assert_eq!((out.as_str(), code), ("placed\n", 0));
    // The refusing node counts as full until it reports again: the next create goes
    // straight to node-a.
    let again = api
        .create(request)
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(again.node_id, "node-a", "{again:?}");
}
