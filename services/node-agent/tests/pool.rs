//! The warm pool through the node agent: VMs booted ahead, taken by creates (and
//! indistinguishable from cold ones inside), refilled in the background, and retired
//! after `max_idle_sec` or when their template is deleted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{create_request, Stack, TEMPLATE};

/// VMs waiting in the pool: recorded, and not (yet) serving a sandbox.
fn pooled_vms(stack: &Stack) -> BTreeSet<String> {
    stack
        .leftovers("vms")
        .into_iter()
        .filter(|name| {
            let path = stack.state_dir().join("vms").join(name);
            let Ok(data) = std::fs::read(path) else {
                return false;
            };
            let record: serde_json::Value = serde_json::from_slice(&data).unwrap();
            record["sandbox_id"].is_null() && record["pid"].is_u64()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_boots_ahead_hands_over_refills_and_retires() {
    let stack = Stack::start(&format!(
        r#"
[pool]
replenish_interval_sec = 1
max_idle_sec = 20

[[pool.templates]]
name = "{TEMPLATE}"
min_ready = 2
max_ready = 3
vcpus = 1
memory_mb = 128
"#
    ))
    .await;
    let ready = |n: u32| move |s: &nanobox_proto::node::v1::NodeStatus| s.pools[0].ready == n;
    let status = stack
        .wait_status("two VMs booted ahead", Duration::from_secs(240), ready(2))
        .await;
    assert_eq!(status.pools[0].template, TEMPLATE);
    assert_eq!(
        (status.pools[0].min_ready, status.pools[0].max_ready),
        (2, 3)
    );
    assert!(status.sandboxes.is_empty(), "pooled VMs are not sandboxes");
    let first_generation = pooled_vms(&stack);
    assert_eq!(first_generation.len(), 2);

    // Two creates take the two ready VMs; each is its own sandbox inside.
    let mut ids = Vec::new();
    for greeting in ["one", "two"] {
        let mut request = create_request(TEMPLATE);
        request.env = [("GREETING".to_owned(), greeting.to_owned())].into();
        let created = stack.create(request).await;
        assert!(created.from_pool, "{created:?}");
        let id = created.sandbox.unwrap().id;
        let (out, _, code) = stack.sh(&id, "hostname; echo $GREETING").await;
        assert_eq!(code, 0);
        assert_eq!(out, format!("{id}\n{greeting}\n"));
        ids.push(id);
    }
    // A different size does not match the pool: a cold boot.
    let mut bigger = create_request(TEMPLATE);
    bigger.resources = Some(nanobox_proto::v1::Resources {
        vcpu: 1,
        memory_mb: 192,
        disk_mb: 0,
    });
    assert!(!stack.create(bigger).await.from_pool);

    // Refill follows in the background.
    stack
        .wait_status("the pool refilled", Duration::from_secs(240), ready(2))
        .await;
    let second_generation = pooled_vms(&stack);
    assert!(second_generation.is_disjoint(&first_generation));

    // Idle VMs are retired after max_idle_sec and replaced (min_ready stays 2).
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let now = pooled_vms(&stack);
        if now.is_disjoint(&second_generation) && now.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never retired: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_vms_make_room_for_a_sandbox_that_needs_its_own_boot() {
    // 384 MiB: two pooled 128 MiB VMs leave 128, too little for a 256 MiB sandbox.
    let stack = Stack::start_with(
        &format!(
            r#"
[pool]
replenish_interval_sec = 1
max_idle_sec = 3600

[[pool.templates]]
name = "{TEMPLATE}"
min_ready = 2
max_ready = 2
vcpus = 1
memory_mb = 128
"#
        ),
        &[("NANOBOX__AGENT__CAPACITY_MEMORY_MB", "384")],
    )
    .await;
    let ready = |n: u32| move |s: &nanobox_proto::node::v1::NodeStatus| s.pools[0].ready == n;
    let status = stack
        .wait_status("two VMs booted ahead", Duration::from_secs(240), ready(2))
        .await;
    // What the scheduler may count as room on this node.
    let reclaimable = status.reclaimable.unwrap();
    assert_eq!((reclaimable.vcpu, reclaimable.memory_mb), (2, 256));
    let mut big = create_request(TEMPLATE);
    big.resources = Some(nanobox_proto::v1::Resources {
        vcpu: 1,
        memory_mb: 256,
        disk_mb: 0,
    });
    let created = stack.create(big.clone()).await;
    assert!(!created.from_pool);
    let status = stack.status().await;
    assert_eq!(status.pools[0].ready, 1, "one pooled VM was retired for it");
    assert_eq!(status.allocated.unwrap().memory_mb, 384);
    assert_eq!(status.reclaimable.unwrap().memory_mb, 128);
    // Sandboxes are never evicted: with the node full of them, a create is refused.
    let err = stack.client().await.create_sandbox(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let status = stack.status().await;
    assert_eq!(status.sandboxes.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_of_a_deleted_template_is_retired() {
    let stack = Stack::start(&format!(
        r#"
[pool]
replenish_interval_sec = 1

[[pool.templates]]
name = "{TEMPLATE}"
min_ready = 1
max_ready = 1
vcpus = 1
memory_mb = 128
"#
    ))
    .await;
    let ready = |n: u32| move |s: &nanobox_proto::node::v1::NodeStatus| s.pools[0].ready == n;
    stack
        .wait_status("a VM booted ahead", Duration::from_secs(240), ready(1))
        .await;
    assert_eq!(pooled_vms(&stack).len(), 1);
    assert_eq!(stack.vmm_processes().len(), 1);

    // The template is deleted (Templates.Delete with force removes its row).
    let name = nanobox_core::TemplateName::new(TEMPLATE).unwrap();
    assert!(stack.meta().await.delete_template(&name).await.unwrap());
    stack
        .wait_status("the pool retired", Duration::from_secs(60), ready(0))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(pooled_vms(&stack).is_empty() && stack.vmm_processes().is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "left: {:?}, VMMs {:?}",
            pooled_vms(&stack),
            stack.vmm_processes()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And nothing boots for it while it is gone.
    let status = stack.status().await;
    assert_eq!((status.pools[0].ready, status.pools[0].starting), (0, 0));
}
