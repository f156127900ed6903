//! Warmups that cannot succeed, through the service: each ends FAILED with a message a
//! user can act on, and leaves no template and no object behind. Bad requests are refused
//! at once with INVALID_ARGUMENT or NOT_FOUND, naming the problem.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Stack;
use nanobox_proto::v1::{self, TemplateState};
use nanobox_testkit::images::busybox_layout;
use nanobox_testkit::registry::{PushFormat, Registry};

/// Warms `image` up as `name`, expects it to fail, and checks that nothing is left but
/// the task record. Returns the failure message.
async fn expect_failure(stack: &Stack, name: &str, image: &str) -> String {
    stack.warmup(name, image).await;
    let (task, _) = stack.wait(name).await;
    assert_eq!(task.state(), TemplateState::Failed, "{task:?}");
    assert!(!task.message.is_empty(), "{task:?}");
    let meta = stack.meta().await;
    let template = nanobox_core::TemplateName::new(name).unwrap();
    assert_eq!(meta.get_template(&template).await.unwrap(), None);
    let keys = stack.object_keys().await;
    assert!(keys.is_empty(), "objects left behind: {keys:?}");
    let list = stack
        .client()
        .await
        .list(v1::ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.templates.is_empty(), "{list:?}");
    let builds = std::fs::read_dir(stack.work_dir().join("builds"))
        .unwrap()
        .count();
    assert_eq!(builds, 0, "stray builds");
    task.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_image_and_unknown_tag() {
    let stack = Stack::start().await;
    let work = tempfile::tempdir().unwrap();
    stack.registry.push(
        &busybox_layout(work.path(), "app"),
        "v1",
        "app",
        "v1",
        PushFormat::Oci,
    );
    let message = expect_failure(&stack, "nope", &stack.image("nope:v1")).await;
    assert_eq!(
        message,
        format!(
            "image {}/nope not found (the registry knows no such repository)",
            stack.registry.host
        )
    );
    let message = expect_failure(&stack, "app", &stack.image("app:9.9")).await;
    assert_eq!(
        message,
        format!("tag 9.9 not found in {}/app", stack.registry.host)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down() {
    let stack = Stack::start().await;
    // A port with nothing behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let image = format!("127.0.0.1:{port}/app:v1");
    let message = expect_failure(&stack, "down", &image).await;
    assert!(
        message.starts_with(&format!("cannot reach registry 127.0.0.1:{port}")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_refused() {
    let stack = Stack::with_registry(Registry::start_with_auth("alice", "s3cret")).await;
    let work = tempfile::tempdir().unwrap();
    stack.registry.push(
        &busybox_layout(work.path(), "private"),
        "v1",
        "private",
        "v1",
        PushFormat::Oci,
    );
    let message = expect_failure(&stack, "private", &stack.image("private:v1")).await;
    assert_eq!(
        message,
        format!(
            "registry {} requires credentials and none are configured for it",
            stack.registry.host
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_mismatch_of_a_corrupt_blob() {
    let stack = Stack::start().await;
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), "corrupt");
    stack
        .registry
        .push(&layout, "v1", "corrupt", "v1", PushFormat::Oci);
    // The layout's manifest names the layers; corrupt the first in the registry's storage.
    let blob = |digest: &str| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let stored = stack.registry.blob_data_path(&layer);
    let mut data = std::fs::read(&stored).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&stored, data).unwrap();

    let message = expect_failure(&stack, "corrupt", &stack.image("corrupt:v1")).await;
    assert!(
        message.starts_with(&format!("digest mismatch for layer {layer}")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_media_type() {
    let stack = Stack::start().await;
    let config = br#"{"kind":"not an image"}"#;
    let config_digest = stack.registry.put_blob("artifact", config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.example.thing.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [],
    });
    stack.registry.put_manifest(
        "artifact",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let image = stack.image("artifact:v1");
    let message = expect_failure(&stack, "artifact", &image).await;
    assert_eq!(
        message,
        format!(
            "unsupported media type \"application/vnd.example.thing.config.v1+json\" for the \
             config of {image}"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_at_once() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let warmup = |name: &str, image: &str, platform: &str| v1::WarmupRequest {
        name: name.into(),
        image: image.into(),
        platform: platform.into(),
    };
    let cases = [
        (warmup("Bad Name", "app:v1", ""), "name"),
        (warmup("ok", "", ""), "image"),
        (warmup("ok", "UPPER/Case::x", ""), "image"),
        (warmup("ok", "app:v1", "linux"), "platform"),
        (warmup("ok", "oci-layout:/etc:v1", ""), "image"),
        (warmup("ok", "docker-archive:/etc/passwd", ""), "image"),
    ];
    for (request, field) in cases {
        let err = client.warmup(request.clone()).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{request:?}: {err:?}"
        );
        assert!(
            err.message().contains(field),
            "{request:?}: {:?} does not name {field}",
            err.message()
        );
    }
    let err = client
        .status(v1::GetTemplateStatusRequest {
            name: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "template missing not found");
    let err = client
        .delete(v1::DeleteTemplateRequest {
            name: "missing".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .list(v1::ListTemplatesRequest { state: 42 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Nothing was recorded for any of them.
    let meta = stack.meta().await;
    assert!(meta.unfinished_tasks().await.unwrap().is_empty());
}
