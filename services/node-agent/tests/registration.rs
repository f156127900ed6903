//! Joining the cluster, against a stand-in for the scheduler's `NodeRegistry` served by
//! the test: the agent registers, heartbeats, and destroys the sandboxes the heartbeat
//! answers name, off its heartbeat loop, while it goes on heartbeating.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_request, Stack, TEMPLATE};
use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_registry_server::{NodeRegistry, NodeRegistryServer};
use nanobox_proto::v1;
use tonic::{Request, Response, Status};

/// What the stand-in registry saw, and which sandboxes it wants gone.
#[derive(Default)]
struct Seen {
    registrations: u32,
    /// The running sandboxes each heartbeat reported, in order.
    heartbeats: Vec<BTreeSet<String>>,
    unwanted: BTreeSet<String>,
}

#[derive(Clone, Default)]
struct Registry(Arc<Mutex<Seen>>);

#[tonic::async_trait]
impl NodeRegistry for Registry {
    async fn register(
        &self,
        _request: Request<node::RegisterRequest>,
    ) -> Result<Response<node::RegisterResponse>, Status> {
        self.0.lock().unwrap().registrations += 1;
        Ok(Response::new(node::RegisterResponse {
            heartbeat_interval_ms: 100,
            pool_targets: Vec::new(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<node::HeartbeatRequest>,
    ) -> Result<Response<node::HeartbeatResponse>, Status> {
        let status = request.into_inner().status.unwrap_or_default();
        let running: BTreeSet<String> = status
            .sandboxes
            .iter()
            .filter(|s| s.state == v1::SandboxState::Running as i32)
            .map(|s| s.id.clone())
            .collect();
        let mut seen = self.0.lock().unwrap();
        // Like the scheduler: every report of an unwanted sandbox asks again.
        let destroy = running.intersection(&seen.unwanted).cloned().collect();
        seen.heartbeats.push(running);
        Ok(Response::new(node::HeartbeatResponse {
            heartbeat_interval_ms: 100,
            pool_targets: Vec::new(),
            destroy_sandbox_ids: destroy,
            reregister: false,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwanted_sandboxes_are_destroyed_while_heartbeats_go_on() {
    let registry = Registry::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = registry.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(NodeRegistryServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let stack =
        Stack::start_with("", &[("NANOBOX__AGENT__SCHEDULER_ADDR", &addr.to_string())]).await;

    // Three sandboxes, one kept.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let created = stack.create(create_request(TEMPLATE)).await;
        ids.push(created.sandbox.unwrap().id);
    }
    let keep = ids.pop().unwrap();
    let heartbeats_before = {
        let mut seen = registry.0.lock().unwrap();
        assert_eq!(seen.registrations, 1);
        seen.unwanted = ids.iter().cloned().collect();
        seen.heartbeats.len()
    };

    // They go, the kept one stays, and the heartbeats go on.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = stack.status().await;
        // Destroyed sandboxes stay listed a while as STOPPED (tombstones).
        let left: BTreeSet<String> = status
            .sandboxes
            .iter()
            .filter(|s| s.state != v1::SandboxState::Stopped as i32)
            .map(|s| s.id.clone())
            .collect();
        if left == BTreeSet::from([keep.clone()]) {
            break;
        }
        if Instant::now() >= deadline {
            let seen = registry.0.lock().unwrap();
            panic!(
                "still there: {left:?}; {} heartbeats, the last {:?}",
                seen.heartbeats.len(),
                seen.heartbeats.last()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A heartbeat after the destroys that reports only the kept sandbox.
        let (settled, registrations) = {
            let seen = registry.0.lock().unwrap();
            let settled = seen.heartbeats[heartbeats_before..]
                .iter()
                .any(|running| running == &BTreeSet::from([keep.clone()]));
            (settled, seen.registrations)
        };
        if settled {
            assert_eq!(registrations, 1, "the agent never had to register again");
            break;
        }
        assert!(Instant::now() < deadline, "no heartbeat after the destroys");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stack.vmm_processes().len(), 1);
    let (out, _, code) = stack.sh(&keep, "echo alive").await;
    assert_eq!((out.as_str(), code), ("alive\n", 0));
}
