//! Every request body the Firecracker backend sends, checked against Firecracker's
//! published API schema (a copy of its definitions in tests/data).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "firecracker_schema.rs"]
mod schema;

use std::path::Path;

use nanobox_vmm::firecracker::api::*;
use nanobox_vmm::firecracker::plan::{boot_requests, PlannedRequest, VmmPaths};
use nanobox_vmm::firecracker::DEFAULT_BOOT_ARGS;
use nanobox_vmm::{DriveSpec, NetSpec, RateLimit, VmSpec};
use schema::{check, definitions, validate};
use serde_json::Value;

fn boot_args() -> Vec<String> {
    DEFAULT_BOOT_ARGS.iter().map(|s| (*s).to_owned()).collect()
}

fn paths(run_dir: &str) -> VmmPaths {
    VmmPaths {
        kernel: "/k/vmlinux".into(),
        rootfs: "/proc/self/fd/3".into(),
        vsock_uds: format!("{run_dir}/v.sock"),
    }
}

fn limiter() -> RateLimiter {
    RateLimiter {
        bandwidth: Some(TokenBucket::bytes_per_second(10 << 20)),
        ops: Some(TokenBucket {
            size: 1000,
            refill_time: 1000,
            one_time_burst: Some(100),
        }),
    }
}

#[test]
fn the_boot_plan_matches_the_schema() {
    let mut spec = VmSpec::new(
        "fc",
        "/k/vmlinux",
        DriveSpec::writable("/d/root.ext4"),
        "/run/fc",
    );
    spec.vcpus = 2;
    spec.memory_mib = 256;
    spec.extra_kernel_args = vec!["nanobox.x=1".into()];
    spec.network = Some(NetSpec {
        tap: "nbx-tap0".into(),
        mac: "52:54:00:12:34:56".into(),
        rate_limit: Some(RateLimit {
            rate_bytes_per_sec: 12_500_000,
            burst_bytes: 1_000_000,
        }),
    });
    let plan = boot_requests(&spec, &boot_args(), &paths("/run/fc")).expect("plan");
    assert_eq!(plan.len(), 7);
    plan.iter().for_each(check);
}

#[test]
fn every_request_type_with_every_field_matches_the_schema() {
    let all = [
        PlannedRequest::new(&MachineConfiguration {
            vcpu_count: 32,
            mem_size_mib: 8192,
            smt: Some(true),
            track_dirty_pages: Some(true),
            huge_pages: Some(HugePages::TwoMiB),
        }),
        PlannedRequest::new(&BootSource {
            kernel_image_path: "/k".into(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: Some("/i".into()),
        }),
        PlannedRequest::new(&Drive {
            drive_id: "data".into(),
            is_root_device: false,
            is_read_only: true,
            path_on_host: "/d".into(),
            cache_type: Some(CacheType::Writeback),
            io_engine: Some(IoEngine::Async),
            rate_limiter: Some(limiter()),
        }),
        PlannedRequest::new(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
            mtu: Some(1500),
            rx_rate_limiter: Some(limiter()),
            tx_rate_limiter: Some(limiter()),
        }),
        PlannedRequest::new(&PartialNetworkInterface {
            iface_id: "eth0".into(),
            rx_rate_limiter: Some(limiter()),
            tx_rate_limiter: None,
        }),
        PlannedRequest::new(&Vsock {
            guest_cid: 3,
            uds_path: "/v.sock".into(),
        }),
        PlannedRequest::new(&EntropyDevice {
            rate_limiter: Some(limiter()),
        }),
        PlannedRequest::new(&InstanceActionInfo {
            action_type: ActionType::SendCtrlAltDel,
        }),
        PlannedRequest::new(&VmStateRequest {
            state: VmRunState::Paused,
        }),
        PlannedRequest::new(&VmStateRequest {
            state: VmRunState::Resumed,
        }),
        PlannedRequest::new(&SnapshotCreateParams {
            snapshot_path: "/s/state".into(),
            mem_file_path: "/s/mem".into(),
            snapshot_type: Some(SnapshotType::Full),
        }),
        PlannedRequest::new(&SnapshotLoadParams {
            snapshot_path: "/s/state".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/s/mem".into(),
            },
            resume_vm: Some(true),
            track_dirty_pages: Some(false),
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap9".into(),
            }],
            vsock_override: Some(VsockOverride {
                uds_path: "/new/v.sock".into(),
            }),
        }),
    ];
    for request in all {
        check(&request.expect("encode"));
    }
}

#[test]
fn the_validator_catches_what_firecracker_would_refuse() {
    let defs = definitions();
    let body = serde_json::json!({"vcpu_count": 33, "mem_size_mib": 128, "bogus": true});
    let errors = validate(&defs, "MachineConfiguration", &body, "m");
    assert!(
        errors.iter().any(|e| e.contains("maximum 32")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("no field bogus")),
        "{errors:?}"
    );
    let errors = validate(&defs, "Vsock", &serde_json::json!({"guest_cid": 2}), "v");
    assert!(errors.iter().any(|e| e.contains("minimum 3")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("uds_path")), "{errors:?}");
}

/// A stand-in for Firecracker's API socket that records what it receives. It checks the
/// HTTP the client speaks; the bodies are checked against the schema above.
async fn api_socket(
    dir: &Path,
) -> (
    std::path::PathBuf,
    tokio::sync::mpsc::UnboundedReceiver<(String, String, String, Value)>,
) {
    use http_body_util::BodyExt;
    let path = dir.join("api.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_owned();
                            let ctype = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap_or("").to_owned())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.expect("body").to_bytes();
                            let json: Value = if body.is_empty() {
                                Value::Null
                            } else {
                                serde_json::from_slice(&body).expect("json body")
                            };
                            tx.send((method, path.clone(), ctype, json))
                                .expect("record");
                            let (status, reply) = match path.as_str() {
                                "/" => (
                                    200,
                                    r#"{"app_name":"Firecracker","id":"anonymous-instance","state":"Not started","vmm_version":"1.10.1"}"#,
                                ),
                                "/drives/bad" => {
                                    (400, r#"{"fault_message":"The drive path is invalid"}"#)
                                }
                                _ => (204, ""),
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from(reply)))
                                    .expect("response"),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (path, rx)
}

#[tokio::test]
async fn the_client_sends_the_plan_as_json_and_reports_faults() {
    use nanobox_vmm::firecracker::client::ApiClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, mut seen) = api_socket(dir.path()).await;
    let client = ApiClient::new(&socket, std::time::Duration::from_secs(5));

    let info = client.instance_info().await.expect("info");
    assert_eq!(info.state, "Not started");
    let (method, path, _, body) = seen.recv().await.expect("GET /");
    assert_eq!(
        (method.as_str(), path.as_str(), body),
        ("GET", "/", Value::Null)
    );

    let spec = VmSpec::new(
        "fc",
        "/k/vmlinux",
        DriveSpec::writable("/d/root.ext4"),
        "/run/fc",
    );
    let plan = boot_requests(&spec, &boot_args(), &paths("/run/fc")).expect("plan");
    for request in &plan {
        client.send(request).await.expect("send");
        let (method, path, ctype, body) = seen.recv().await.expect("request");
        assert_eq!(method, request.method.as_str());
        assert_eq!(path, request.path);
        assert_eq!(ctype, "application/json");
        assert_eq!(body, request.body);
    }

    let bad = PlannedRequest::new(&Drive {
        drive_id: "bad".into(),
        is_root_device: false,
        is_read_only: true,
        path_on_host: "/nope".into(),
        cache_type: None,
        io_engine: None,
        rate_limiter: None,
    })
    .expect("encode");
    let err = client.send(&bad).await.expect_err("400");
    let text = err.to_string();
    assert!(
        text.contains("400") && text.contains("The drive path is invalid"),
        "{text}"
    );
    match err {
        nanobox_vmm::VmmError::FirecrackerApi {
            request,
            status,
            fault_message,
        } => {
            assert_eq!(request, "PUT /drives/bad");
            assert_eq!(status, 400);
            assert_eq!(fault_message, "The drive path is invalid");
        }
        other => panic!("not a typed API error: {other:?}"),
    }

    // No API socket: a clear error, not a hang.
    let gone = ApiClient::new(
        dir.path().join("missing.sock"),
        std::time::Duration::from_secs(5),
    );
    assert!(gone.instance_info().await.is_err());
}
