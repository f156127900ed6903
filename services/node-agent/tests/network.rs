//! Network modes through the node agent: every sandbox in its own namespace inside the
//! test's private namespaces; an internet-mode sandbox reaches a server in the simulated
//! internet (and gets an address from the subnet), an isolated one reaches nothing; all
//! of it is gone after destroy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};

use common::{create_request, Stack, TEMPLATE};
use nanobox_proto::node::v1 as node;
use nanobox_proto::v1;
use nanobox_testkit::process::run;

/// A web server in the simulated internet, stopped on drop.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(stack: &Stack, dir: &std::path::Path) -> Server {
    std::fs::write(dir.join("hello.txt"), "hello from the internet\n").unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            stack.net.internet(),
            "python3",
            "-m",
            "http.server",
        ])
        .args(["--bind", "10.254.0.2", "8080", "--directory"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Server(child)
}

fn with_mode(mode: v1::NetworkMode) -> node::CreateSandboxRequest {
    let mut request = create_request(TEMPLATE);
    request.network = Some(v1::NetworkSpec {
        mode: mode.into(),
        egress_rate_bps: 0,
        tenant_scope: String::new(),
    });
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_reaches_out_isolated_reaches_nothing() {
    let stack = Stack::start("").await;
    let www = tempfile::tempdir().unwrap();
    let _server = serve(&stack, www.path());

    let online = stack
        .create(with_mode(v1::NetworkMode::Internet))
        .await
        .sandbox
        .unwrap();
    assert!(online.ip.starts_with("10.100."), "{online:?}");
    let offline = stack
        .create(with_mode(v1::NetworkMode::Isolated))
        .await
        .sandbox
        .unwrap();
    assert_eq!(offline.ip, "");
    assert_eq!(stack.sandbox_namespaces().len(), 2);

    // The server may take a moment to listen; the guest retries.
    let fetch = "for i in 1 2 3 4 5 6 7 8 9 10; do \
                 timeout 5 wget -q -O - http://10.254.0.2:8080/hello.txt && exit 0; sleep 1; done; exit 1";
    let (out, err, code) = stack.sh(&online.id, fetch).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "hello from the internet\n");

    let (_, _, code) = stack
        .sh(
            &offline.id,
            "timeout 5 wget -q -O - http://10.254.0.2:8080/hello.txt",
        )
        .await;
    assert_ne!(code, 0, "an isolated sandbox reached the internet");
    let (out, _, _) = stack.sh(&offline.id, "ls /sys/class/net").await;
    assert!(
        !out.split_whitespace().any(|d| d.starts_with("eth")),
        "an isolated guest has no network device: {out}"
    );

    // Paused and resumed, the sandbox gets a new namespace and device; the guest keeps
    // its inside address and reaches out as before.
    let mut client = stack.client().await;
    client
        .pause_sandbox(node::PauseSandboxRequest {
            sandbox_id: online.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        stack.sandbox_namespaces().len(),
        1,
        "a paused sandbox has no network"
    );
    let resumed = client
        .resume_sandbox(node::ResumeSandboxRequest {
            sandbox_id: online.id.clone(),
            network: with_mode(v1::NetworkMode::Internet).network,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert!(resumed.ip.starts_with("10.100."), "{resumed:?}");
    let (out, err, code) = stack.sh(&online.id, fetch).await;
    assert_eq!(
        (out.as_str(), code),
        ("hello from the internet\n", 0),
        "{err}"
    );
    // It cannot come back in another mode: its guest was configured for this one.
    client
        .pause_sandbox(node::PauseSandboxRequest {
            sandbox_id: online.id.clone(),
        })
        .await
        .unwrap();
    let err = client
        .resume_sandbox(node::ResumeSandboxRequest {
            sandbox_id: online.id.clone(),
            network: with_mode(v1::NetworkMode::Isolated).network,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    for id in [&online.id, &offline.id] {
        client
            .destroy_sandbox(node::DestroySandboxRequest {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap();
    }
    assert!(
        stack.sandbox_namespaces().is_empty(),
        "{:?}",
        stack.sandbox_namespaces()
    );
    let links = run(&["ip", "-n", &stack.net.host, "-o", "link"]);
    assert!(
        !links.contains("nbx")
            || links
                .lines()
                .all(|l| !l.contains("@") || l.contains("wan0")),
        "veths left on the bridge: {links}"
    );
}
