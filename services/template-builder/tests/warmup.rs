//! The template-builder service end to end: a real process serving gRPC, a real Postgres,
//! a real registry, a local-filesystem object store; the realistic image warms up, boots
//! and runs node; work is shared and cached; a kill -9 mid-warmup loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::Stack;
use nanobox_proto::v1::{self, TemplateState};
use nanobox_store::ObjectStore as _;
use nanobox_testkit::images::busybox_layout;
use nanobox_testkit::registry::PushFormat;

fn rootfs_objects(keys: &[String]) -> Vec<&String> {
    keys.iter().filter(|k| k.starts_with("rootfs/")).collect()
}

/// The realistic image through the gRPC API: progress shows, it ends READY, the
/// ext4 passes e2fsck, a guest boots from it and node runs. Warming it again under
/// another name downloads and converts nothing and shares the object; deleting one name
/// keeps the object, deleting the last removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_node_warms_up_boots_and_is_shared() {
    use nanobox_testkit::images::{debian_node_layout, DEBIAN_NODE_TAG};
    let stack = Stack::start().await;
    stack.registry.push(
        &debian_node_layout(),
        DEBIAN_NODE_TAG,
        "library/node",
        "22-bookworm",
        PushFormat::Oci,
    );
    let image = stack.image("library/node:22-bookworm");

    let submitted = stack.warmup("node22", &image).await;
    assert_eq!(submitted.name, "node22");
    assert!(
        matches!(
            submitted.state(),
            TemplateState::Queued | TemplateState::Pulling
        ),
        "Warmup returns at once: {submitted:?}"
    );
    let (task, seen) = stack.wait("node22").await;
    assert_eq!(task.state(), TemplateState::Ready, "{task:?}");
    assert!(task.message.is_empty(), "{task:?}");
    assert!(task.digest.starts_with("sha256:"), "{task:?}");
    let progress = task.progress.unwrap();
    assert_eq!((progress.layers_done, progress.layers_total), (2, 2));
    assert_eq!(progress.bytes_done, progress.bytes_total);
    assert!(progress.bytes_total > 50 << 20, "{progress:?}");
    // A 370 MB image takes long enough that polling sees the pipeline move.
    assert!(seen.len() >= 3, "states seen: {seen:?}");
    let order = |s: &TemplateState| *s as i32;
    assert!(
        seen.windows(2).all(|w| order(&w[0]) < order(&w[1])),
        "states go forward only: {seen:?}"
    );

    // The template, with the image config recorded.
    let mut client = stack.client().await;
    let status = client
        .status(v1::GetTemplateStatusRequest {
            name: "node22".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let template = status.template.unwrap();
    assert_eq!(template.state(), TemplateState::Ready);
    assert_eq!(template.digest, task.digest);
    assert!(template.size_bytes > 0);
    let config = template.config.unwrap();
    assert_eq!(config.working_dir, "/app");
    assert!(
        config.env.iter().any(|e| e.starts_with("PATH=")),
        "{config:?}"
    );

    // The object: an ext4 that passes e2fsck, beside its sidecar.
    let keys = stack.object_keys().await;
    let rootfs = rootfs_objects(&keys);
    assert_eq!(rootfs.len(), 2, "{keys:?}");
    let ext4_key = rootfs
        .iter()
        .find(|k| k.ends_with("/rootfs.ext4"))
        .unwrap()
        .to_string();
    let local = stack.dir.path().join("node22.ext4");
    let meta = stack
        .objects()
        .get_file(&ext4_key.as_str().try_into().unwrap(), &local)
        .await
        .unwrap();
    assert_eq!(meta.size, template.size_bytes);
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&local)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // A guest boots from it and node runs.
    let vm = nanobox_testkit::TestVm::boot_with("tb-node", |spec| {
        spec.rootfs.path = local.clone();
        spec.rootfs.ephemeral = true;
        spec.memory_mib = 512;
    })
    .await;
    let mut request = nanobox_guest_client::ExecRequest::new([
        "node",
        "-e",
        "console.log(JSON.stringify({ok:true}))",
    ]);
    request.timeout = Some(Duration::from_secs(120));
    let out = vm.agent.run(request, 1 << 20).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"ok\":true}\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{:?}", out.status);
    drop(vm);

    // The same image under another name: nothing downloaded, nothing built, one object.
    let blob_gets = stack.registry.requests("GET", "/blobs/");
    stack.warmup("node-lts", &image).await;
    let (task2, _) = stack.wait("node-lts").await;
    assert_eq!(task2.state(), TemplateState::Ready, "{task2:?}");
    assert_eq!(task2.digest, task.digest);
    assert_eq!(stack.registry.requests("GET", "/blobs/"), blob_gets);
    assert_eq!(stack.object_keys().await, keys);

    // Warming the same name again is a no-op too.
    stack.warmup("node22", &image).await;
    let (task3, _) = stack.wait("node22").await;
    assert_eq!(task3.state(), TemplateState::Ready);
    assert_eq!(stack.registry.requests("GET", "/blobs/"), blob_gets);

    let names = |list: v1::ListTemplatesResponse| -> Vec<String> {
        list.templates.into_iter().map(|t| t.name).collect()
    };
    let list = client
        .list(v1::ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(list), ["node-lts", "node22"]);

    // Deleting one name keeps the shared object; deleting the last removes it.
    client
        .delete(v1::DeleteTemplateRequest {
            name: "node22".into(),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(stack.object_keys().await, keys);
    let err = client
        .status(v1::GetTemplateStatusRequest {
            name: "node22".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    client
        .delete(v1::DeleteTemplateRequest {
            name: "node-lts".into(),
            force: false,
        })
        .await
        .unwrap();
    assert!(rootfs_objects(&stack.object_keys().await).is_empty());
    let list = client
        .list(v1::ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.templates.is_empty(), "{list:?}");
}

/// Concurrent warmups: two names over one image share one download and one build, while
/// a different image proceeds in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_warmups_share_the_same_image() {
    let stack = Stack::start().await;
    let work = tempfile::tempdir().unwrap();
    stack.registry.push(
        &busybox_layout(work.path(), "one"),
        "v1",
        "one",
        "v1",
        PushFormat::Oci,
    );
    stack.registry.push(
        &busybox_layout(work.path(), "two"),
        "v1",
        "two",
        "v1",
        PushFormat::DockerV2s2,
    );
    let (one, two) = (stack.image("one:v1"), stack.image("two:v1"));
    let (a, b, c) = tokio::join!(
        stack.warmup("a", &one),
        stack.warmup("b", &one),
        stack.warmup("c", &two),
    );
    assert_eq!(
        (a.name, b.name, c.name),
        ("a".into(), "b".into(), "c".into())
    );
    let ((ta, _), (tb, _), (tc, _)) =
        tokio::join!(stack.wait("a"), stack.wait("b"), stack.wait("c"));
    for t in [&ta, &tb, &tc] {
        assert_eq!(t.state(), TemplateState::Ready, "{t:?}");
    }
    assert_eq!(ta.digest, tb.digest);
    assert_ne!(ta.digest, tc.digest);
    // Two images, each one ext4 and one sidecar.
    assert_eq!(rootfs_objects(&stack.object_keys().await).len(), 4);
    // Each layer of image one was downloaded once (two layers, one config), not twice.
    assert_eq!(stack.registry.requests("GET", "/v2/one/blobs/"), 3);
}

/// A warmup that is running when the builder is killed (-9) leaves no template visible;
/// the restarted builder resumes it and it ends READY, with no stray build files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_mid_warmup_resumes_cleanly_after_restart() {
    use nanobox_testkit::images::{debian_node_layout, DEBIAN_NODE_TAG};
    let mut stack = Stack::start().await;
    stack.registry.push(
        &debian_node_layout(),
        DEBIAN_NODE_TAG,
        "library/node",
        "22-bookworm",
        PushFormat::Oci,
    );
    let image = stack.image("library/node:22-bookworm");
    stack.warmup("node", &image).await;

    // Wait until it is extracting or building: well into the work.
    let mut client = stack.client().await;
    let deadline = std::time::Instant::now() + common::WARMUP_TIMEOUT;
    loop {
        let task = client
            .status(v1::GetTemplateStatusRequest {
                name: "node".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        match task.state() {
            TemplateState::Extracting | TemplateState::Building => break,
            TemplateState::Ready | TemplateState::Failed => {
                panic!("finished before it could be interrupted: {task:?}")
            }
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "{task:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.builder.take().unwrap().kill();

    // Nothing half-written is visible: no template, no root filesystem object.
    let meta = stack.meta().await;
    let name = nanobox_core::TemplateName::new("node").unwrap();
    assert_eq!(meta.get_template(&name).await.unwrap(), None);
    assert!(rootfs_objects(&stack.object_keys().await).is_empty());

    stack.start_builder();
    let (task, _) = stack.wait("node").await;
    assert_eq!(task.state(), TemplateState::Ready, "{task:?}");
    assert!(meta.get_template(&name).await.unwrap().is_some());
    assert_eq!(rootfs_objects(&stack.object_keys().await).len(), 2);
    let builds: Vec<_> = std::fs::read_dir(stack.work_dir().join("builds"))
        .unwrap()
        .collect();
    assert!(builds.is_empty(), "stray builds: {builds:?}");
}

/// Health and reflection are served next to Templates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let stack = Stack::start().await;
    let addr = format!("http://{}", stack.builder.as_ref().unwrap().addr);
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let reply = health
        .check(HealthCheckRequest {
            service: "nanobox.v1.Templates".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("{reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "nanobox.v1.Templates"),
        "{names:?}"
    );
}

/// Delete refuses a template that live sandboxes or nodes' pools use, naming both counts,
/// and goes ahead when forced (the proto's promise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_refuses_a_template_in_use_unless_forced() {
    use nanobox_core::{
        NetworkMode, NetworkSpec, Resources, SandboxId, SandboxState, TemplateName,
    };
    use nanobox_store::metadata::{NewSandbox, NodeObserved, NodeReport, SandboxObservation};

    let stack = Stack::start().await;
    let work = tempfile::tempdir().unwrap();
    stack.registry.push(
        &busybox_layout(work.path(), "used"),
        "v1",
        "used",
        "v1",
        PushFormat::Oci,
    );
    stack.warmup("used", &stack.image("used:v1")).await;
    let (task, _) = stack.wait("used").await;
    assert_eq!(task.state(), TemplateState::Ready, "{task:?}");

    // A node with a pool VM of it, and a running sandbox of it there, as the scheduler
    // records them.
    let meta = stack.meta().await;
    meta.report_node(&NodeReport {
        id: "node-a".into(),
        address: "127.0.0.1:1".into(),
        draining: false,
        capacity_vcpus: 2,
        capacity_memory_mb: 2048,
        allocated_vcpus: 1,
        allocated_memory_mb: 256,
        observed: NodeObserved {
            ready_pool: [("used".to_owned(), 1)].into(),
            ..NodeObserved::default()
        },
    })
    .await
    .unwrap();
    let (sandbox, _) = meta
        .insert_sandbox(&NewSandbox {
            id: SandboxId::new(),
            request_id: None,
            template: TemplateName::new("used").unwrap(),
            template_digest: task.digest.clone(),
            node_id: Some("node-a".into()),
            observed_state: SandboxState::Running,
            resources: Resources::new(1, 256, None).unwrap(),
            network: NetworkSpec::new(NetworkMode::Isolated, None, None).unwrap(),
            env: Default::default(),
            metadata: Default::default(),
            timeout: Duration::from_secs(300),
            expires_at: None,
        })
        .await
        .unwrap();

    let mut client = stack.client().await;
    let delete = |force| v1::DeleteTemplateRequest {
        name: "used".into(),
        force,
    };
    let err = client.delete(delete(false)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("in use by 1 sandbox(es) and 1 pool VM(s)"),
        "{}",
        err.message()
    );
    // Still there, object and all.
    client
        .status(v1::GetTemplateStatusRequest {
            name: "used".into(),
        })
        .await
        .unwrap();
    assert_eq!(rootfs_objects(&stack.object_keys().await).len(), 2);

    // The sandbox stops; the pool VM still holds it.
    meta.observe_sandbox(
        &sandbox.id,
        &SandboxObservation {
            state: Some(SandboxState::Stopped),
            ..SandboxObservation::default()
        },
    )
    .await
    .unwrap();
    let err = client.delete(delete(false)).await.unwrap_err();
    assert!(
        err.message().contains("0 sandbox(es) and 1 pool VM(s)"),
        "{}",
        err.message()
    );

    // Forced: gone.
    client.delete(delete(true)).await.unwrap();
    let err = client
        .status(v1::GetTemplateStatusRequest {
            name: "used".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(rootfs_objects(&stack.object_keys().await).is_empty());
}
