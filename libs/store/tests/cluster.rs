//! Nodes and sandboxes (the scheduler's records) against a real, private PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use nanobox_core::{
    NetworkMode, NetworkSpec, NodeState, Resources, SandboxId, SandboxState, TemplateName,
};
use nanobox_store::metadata::{
    NewSandbox, NodeObserved, NodeReport, PoolOptions, SandboxFilter, SandboxObservation,
    TemplateUsers,
};
use nanobox_store::MetadataStore;
use nanobox_testkit::postgres::Postgres;

async fn fresh() -> (Postgres, tokio_postgres::Config, MetadataStore) {
    let pg = Postgres::start().await;
    let config = pg.create_database().await;
    let store = MetadataStore::open(config.clone(), PoolOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    (pg, config, store)
}

fn report(id: &str) -> NodeReport {
    NodeReport {
        id: id.into(),
        address: format!("{id}.local:50071"),
        draining: false,
        capacity_vcpus: 8,
        capacity_memory_mb: 16384,
        allocated_vcpus: 1,
        allocated_memory_mb: 512,
        observed: NodeObserved {
            cached_digests: vec![format!("sha256:{}", "ab".repeat(32))],
            ready_pool: [("busybox".to_owned(), 2)].into(),
            sandboxes_running: 1,
            labels: BTreeMap::new(),
        },
    }
}

fn new_sandbox(node: &str, template: &str) -> NewSandbox {
    NewSandbox {
        id: SandboxId::new(),
        request_id: None,
        template: TemplateName::new(template).unwrap_or_else(|e| panic!("{e:?}")),
        template_digest: format!("sha256:{}", "cd".repeat(32)),
        node_id: Some(node.into()),
        observed_state: SandboxState::Starting,
        resources: Resources::new(2, 1024, Some(2048)).unwrap_or_else(|e| panic!("{e:?}")),
        network: NetworkSpec::new(NetworkMode::Internet, Some(1_000_000), Some("t1".into()))
            .unwrap_or_else(|e| panic!("{e:?}")),
        env: [("A".to_owned(), "1".to_owned())].into(),
        metadata: [("owner".to_owned(), "me".to_owned())].into(),
        timeout: Duration::from_secs(300),
        expires_at: Some(SystemTime::now() + Duration::from_secs(300)),
    }
}

#[tokio::test]
async fn nodes_report_list_and_go_lost() {
    let (_pg, _config, store) = fresh().await;
    let a = store
        .report_node(&report("node-a"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(a.state, NodeState::Ready);
    assert_eq!(a.observed.ready_pool["busybox"], 2);
    let mut draining = report("node-b");
    draining.draining = true;
    let b = store
        .report_node(&draining)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(b.state, NodeState::Draining);
    let nodes = store.list_nodes().await.unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["node-a", "node-b"]
    );

    // A live sandbox on node-a; a stopped one too (which must stay stopped).
    let live = store
        .insert_sandbox(&new_sandbox("node-a", "busybox"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .0;
    let done = store
        .insert_sandbox(&new_sandbox("node-a", "busybox"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .0;
    store
        .observe_sandbox(
            &done.id,
            &SandboxObservation {
                state: Some(SandboxState::Stopped),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));

    // Nothing is silent for an hour.
    assert!(store
        .mark_silent_nodes_lost(Duration::from_secs(3600), "silent")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .report_node(&report("node-b"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let lost = store
        .mark_silent_nodes_lost(Duration::from_millis(200), "node-a stopped heartbeating")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(lost, ["node-a"]);
    let a = store
        .get_node("node-a")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("node-a"));
    assert_eq!(a.state, NodeState::Lost);
    let live = store
        .get_sandbox(&live.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("live"));
    assert_eq!(live.observed_state, SandboxState::Lost);
    assert_eq!(live.message, "node-a stopped heartbeating");
    let done = store
        .get_sandbox(&done.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("done"));
    assert_eq!(done.observed_state, SandboxState::Stopped);
    // Reporting again makes it ready.
    let a = store
        .report_node(&report("node-a"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(a.state, NodeState::Ready);
    assert!(store
        .get_node("nope")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
}

#[tokio::test]
async fn sandboxes_round_trip_filter_page_and_count() {
    let (_pg, _config, store) = fresh().await;
    store
        .report_node(&report("node-a"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    store
        .report_node(&report("node-b"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let new = new_sandbox("node-a", "busybox");
    let (created, fresh) = store
        .insert_sandbox(&new)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(fresh);
    assert_eq!(created.id, new.id);
    assert_eq!(created.resources, new.resources);
    assert_eq!(created.network, new.network);
    assert_eq!(created.env, new.env);
    assert_eq!(created.metadata, new.metadata);
    assert_eq!(created.timeout, new.timeout);
    assert_eq!(created.desired_state, SandboxState::Running);
    assert_eq!(created.observed_state, SandboxState::Starting);
    let got = store
        .get_sandbox(&new.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(got, created);

    // Observations land; unset fields keep their values.
    let seen = store
        .observe_sandbox(
            &new.id,
            &SandboxObservation {
                state: Some(SandboxState::Running),
                ip: Some("10.100.0.2".into()),
                boot_time_ms: Some(321),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(
        (seen.observed_state, seen.ip.as_str(), seen.boot_time_ms),
        (SandboxState::Running, "10.100.0.2", 321)
    );
    assert_eq!(seen.expires_at, created.expires_at);
    assert!(store
        .observe_sandbox(&SandboxId::new(), &SandboxObservation::default())
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());

    // Idempotency keys: the second insert returns the first sandbox.
    let mut keyed = new_sandbox("node-b", "other");
    keyed.request_id = Some("req-1".into());
    let (first, created_first) = store
        .insert_sandbox(&keyed)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(created_first);
    let mut again = new_sandbox("node-a", "other");
    again.request_id = Some("req-1".into());
    let (second, created_second) = store
        .insert_sandbox(&again)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(!created_second);
    assert_eq!(second.id, first.id);

    // Filters and pages, newest first.
    let all = store
        .list_sandboxes(&SandboxFilter::default())
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        [first.id.clone(), new.id.clone()]
    );
    let on_a = store
        .list_sandboxes(&SandboxFilter {
            node_id: Some("node-a".into()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(on_a.len(), 1);
    let by_state = store
        .list_sandboxes(&SandboxFilter {
            state: Some(SandboxState::Starting),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(by_state[0].id, first.id);
    let by_template = store
        .list_sandboxes(&SandboxFilter {
            template: Some(TemplateName::new("busybox").unwrap_or_else(|e| panic!("{e:?}"))),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(by_template[0].id, new.id);
    let by_label = store
        .list_sandboxes(&SandboxFilter {
            metadata: [("owner".to_owned(), "someone".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(by_label.is_empty());
    let page1 = store
        .list_sandboxes(&SandboxFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let page2 = store
        .list_sandboxes(&SandboxFilter {
            limit: 1,
            before: Some(page1[0].id.clone()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        (page1[0].id.clone(), page2[0].id.clone()),
        (first.id.clone(), new.id.clone())
    );

    // Desired state and deadlines.
    let mut expired = new_sandbox("node-b", "busybox");
    expired.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
    let expired = store
        .insert_sandbox(&expired)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .0;
    let due = store
        .expired_sandboxes()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(due.iter().map(|s| &s.id).collect::<Vec<_>>(), [&expired.id]);
    store
        .set_sandbox_desired(&expired.id, SandboxState::Stopped)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(store
        .expired_sandboxes()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_empty());
    let unsettled = store
        .unsettled_stops()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(unsettled.len(), 1);
    store
        .observe_sandbox(
            &expired.id,
            &SandboxObservation {
                state: Some(SandboxState::Stopped),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(store
        .unsettled_stops()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_empty());

    let counts = store
        .count_sandboxes_by_state()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(counts.get(&SandboxState::Running), Some(&1));
    assert_eq!(counts.get(&SandboxState::Starting), Some(&1));
    assert_eq!(counts.get(&SandboxState::Stopped), Some(&1));

    // The database refuses what the schema forbids: a node it does not know.
    let orphan = new_sandbox("no-such-node", "busybox");
    assert!(store.insert_sandbox(&orphan).await.is_err());
}

#[tokio::test]
async fn pause_and_resume_are_compare_and_set() {
    let (_pg, _config, store) = fresh().await;
    store
        .report_node(&report("node-a"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut past = new_sandbox("node-a", "busybox");
    // Already past its deadline: pausing must take it out of the expiry scan.
    past.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
    let sandbox = store
        .insert_sandbox(&past)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .0;
    let running = store
        .observe_sandbox(
            &sandbox.id,
            &SandboxObservation {
                state: Some(SandboxState::Running),
                ip: Some("10.100.0.2".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(running.snapshot_id, None);
    assert!(!running.resuming());
    assert_eq!(
        store
            .expired_sandboxes()
            .await
            .unwrap_or_else(|e| panic!("{e:?}"))
            .len(),
        1
    );

    // Paused: both states, the snapshot, no address, no deadline; it never expires.
    let paused = store
        .record_pause(&sandbox.id, Some("snap-1"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(
        (paused.observed_state, paused.desired_state),
        (SandboxState::Paused, SandboxState::Paused)
    );
    assert_eq!(paused.snapshot_id.as_deref(), Some("snap-1"));
    assert_eq!((paused.ip.as_str(), paused.expires_at), ("", None));
    assert_eq!(paused.node_id.as_deref(), Some("node-a"));
    assert!(store
        .expired_sandboxes()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_empty());
    // A later pause without an id keeps the recorded one.
    let again = store
        .record_pause(&sandbox.id, None)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(again.snapshot_id.as_deref(), Some("snap-1"));

    // One resume begins; a second finds it no longer paused.
    let started = store
        .begin_resume(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(
        (started.observed_state, started.desired_state),
        (SandboxState::Starting, SandboxState::Running)
    );
    assert!(started.resuming());
    assert_eq!(started.snapshot_id.as_deref(), Some("snap-1"));
    assert!(store
        .begin_resume(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
    // It failed: paused again with the reason, snapshot kept; undoing twice does nothing.
    let aborted = store
        .abort_resume(&sandbox.id, "resume failed: node node-a: full")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(
        (aborted.observed_state, aborted.desired_state),
        (SandboxState::Paused, SandboxState::Paused)
    );
    assert_eq!(aborted.snapshot_id.as_deref(), Some("snap-1"));
    assert_eq!(aborted.message, "resume failed: node node-a: full");
    assert!(store
        .abort_resume(&sandbox.id, "again")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());

    // Resumed: running, wanted running, the snapshot moved to resumed_from.
    store
        .begin_resume(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    let deadline = SystemTime::now() + Duration::from_secs(600);
    let resumed = store
        .record_resumed(
            &sandbox.id,
            &SandboxObservation {
                state: Some(SandboxState::Running),
                ip: Some("10.100.0.9".into()),
                boot_time_ms: Some(42),
                expires_at: Some(deadline),
                message: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(
        (resumed.observed_state, resumed.desired_state),
        (SandboxState::Running, SandboxState::Running)
    );
    assert_eq!(
        (
            resumed.snapshot_id.as_deref(),
            resumed.resumed_from.as_deref()
        ),
        (None, Some("snap-1"))
    );
    assert_eq!(
        (
            resumed.ip.as_str(),
            resumed.boot_time_ms,
            resumed.message.as_str()
        ),
        ("10.100.0.9", 42, "")
    );
    assert!(resumed.expires_at.is_some());
    assert!(!resumed.resuming());
    assert!(store
        .begin_resume(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());

    // Paused again, then deleted: stopped without a snapshot, and neither a late pause
    // nor a late resume revives it.
    store
        .record_pause(&sandbox.id, Some("snap-2"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    let counts = store
        .count_sandboxes_by_state()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(counts.get(&SandboxState::Paused), Some(&1));
    store
        .set_sandbox_desired(&sandbox.id, SandboxState::Stopped)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(store
        .begin_resume(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
    let stopped = store
        .observe_sandbox(
            &sandbox.id,
            &SandboxObservation {
                state: Some(SandboxState::Stopped),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(stopped.snapshot_id, None);
    assert!(store
        .record_pause(&sandbox.id, Some("snap-3"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
    assert!(store
        .record_resumed(&sandbox.id, &SandboxObservation::default())
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
    let last = store
        .get_sandbox(&sandbox.id)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(last.observed_state, SandboxState::Stopped);

    // Unknown sandboxes: nothing.
    let unknown = SandboxId::new();
    assert!(store
        .record_pause(&unknown, Some("snap-x"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
    assert!(store
        .begin_resume(&unknown)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"))
        .is_none());
}

#[tokio::test]
async fn template_users_count_live_sandboxes_and_pools_of_nodes_not_lost() {
    let (_pg, _config, store) = fresh().await;
    let busybox = TemplateName::new("busybox").unwrap_or_else(|e| panic!("{e:?}"));
    let users = |store: &MetadataStore| {
        let store = store.clone();
        let name = busybox.clone();
        async move {
            store
                .template_users(&name)
                .await
                .unwrap_or_else(|e| panic!("{e:?}"))
        }
    };
    assert_eq!(users(&store).await, TemplateUsers::default());
    // A node with two ready pool VMs of it.
    store
        .report_node(&report("node-a"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(users(&store).await.pool_vms, 2);
    // Two sandboxes of it and one of another template; one of them then stops.
    let (one, _) = store
        .insert_sandbox(&new_sandbox("node-a", "busybox"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    store
        .insert_sandbox(&new_sandbox("node-a", "busybox"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    store
        .insert_sandbox(&new_sandbox("node-a", "other"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        users(&store).await,
        TemplateUsers {
            sandboxes: 2,
            pool_vms: 2
        }
    );
    let stopped = SandboxObservation {
        state: Some(SandboxState::Stopped),
        ..SandboxObservation::default()
    };
    store
        .observe_sandbox(&one.id, &stopped)
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(users(&store).await.sandboxes, 1);
    // A lost node's pools count for nothing (its live sandboxes are marked LOST too).
    store
        .mark_silent_nodes_lost(Duration::ZERO, "gone")
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(users(&store).await, TemplateUsers::default());
}
