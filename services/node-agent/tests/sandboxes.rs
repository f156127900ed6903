//! The node agent end to end: a real process, real guests under QEMU, a real Postgres and
//! object store. Sandboxes are created, used and destroyed through gRPC; limits, deadlines,
//! bad input, and a kill -9 of the agent behave as specified.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{create_request, Stack, TEMPLATE};
use nanobox_proto::node::v1 as node;
use nanobox_proto::v1::{self, SandboxState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_list_destroy() {
    let stack = Stack::start("").await;
    let mut request = create_request(TEMPLATE);
    request.resources = Some(v1::Resources {
        vcpu: 2,
        memory_mb: 256,
        disk_mb: 0,
    });
    request.env = [("GREETING".to_owned(), "hello from env".to_owned())].into();
    request.metadata = [("owner".to_owned(), "test".to_owned())].into();
    let created = stack.create(request).await;
    assert!(!created.from_pool);
    let sandbox = created.sandbox.unwrap();
    assert_eq!(sandbox.state(), SandboxState::Running);
    assert_eq!(sandbox.template, TEMPLATE);
    assert_eq!(sandbox.node_id, "node-test");
    assert!(sandbox.boot_time_ms > 0);
    assert!(sandbox.template_digest.starts_with("sha256:"));
    let id = sandbox.id.clone();

    // The guest is the sandbox: its hostname, its env, its vCPUs and memory.
    let (out, err, code) = stack
        .sh(
            &id,
            "hostname; echo $GREETING; nproc; grep MemTotal /proc/meminfo",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], id);
    assert_eq!(lines[1], "hello from env");
    assert_eq!(lines[2], "2", "vCPUs inside equal the request");
    let mem_kb: u64 = lines[3].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (200_000..=262_144).contains(&mem_kb),
        "guest memory {mem_kb} kB for 256 MiB"
    );
    // The VMM runs hardened: its own user, a seccomp filter.
    let vmms = stack.vmm_processes();
    assert_eq!(vmms.len(), 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", vmms[0])).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == nobody.to_string()),
        "{uid_line}"
    );
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    let (out, _, code) = stack.sh(&id, "exit 7").await;
    assert_eq!((out.as_str(), code), ("", 7));

    let mut client = stack.client().await;
    let list = client
        .list_sandboxes(node::ListSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sandboxes.len(), 1);
    assert_eq!(list.sandboxes[0].state(), SandboxState::Running);
    assert_eq!(list.sandboxes[0].metadata["owner"], "test");

    let destroyed = client
        .destroy_sandbox(node::DestroySandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(destroyed.existed);
    let got = client
        .get_sandbox(node::GetSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(got.state(), SandboxState::Stopped);
    // Exec on a destroyed sandbox says so.
    let err = client
        .exec(v1::ExecRequest {
            id: id.clone(),
            command: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("STOPPED"), "{err:?}");
    // Every trace is gone.
    assert!(stack.vmm_processes().is_empty());
    assert!(
        stack.sandbox_namespaces().is_empty(),
        "{:?}",
        stack.sandbox_namespaces()
    );
    for sub in ["vms", "disks", "run"] {
        assert!(
            stack.leftovers(sub).is_empty(),
            "{sub}: {:?}",
            stack.leftovers(sub)
        );
    }
    let again = client
        .destroy_sandbox(node::DestroySandboxRequest { sandbox_id: id })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_oom_stays_in_the_guest() {
    let stack = Stack::start("").await;
    let id = stack
        .create(create_request(TEMPLATE))
        .await
        .sandbox
        .unwrap()
        .id;
    // dd's buffer is its block size: four dd's each touch 50 MB, 200 MB in a 128 MiB
    // guest. Each allocation alone is allowed, so the guest's OOM killer has to end one;
    // the sandbox and the host carry on.
    stack
        .sh(
            &id,
            "for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=50M count=40 2>/dev/null & done; wait",
        )
        .await;
    let (out, _, code) = stack.sh(&id, "echo alive").await;
    assert_eq!((out.as_str(), code), ("alive\n", 0));
    let (out, _, _) = stack
        .sh(&id, "dmesg | grep -ci 'out of memory' || true")
        .await;
    assert_ne!(out.trim(), "0", "the guest's OOM killer acted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_keepalive() {
    let stack = Stack::start("").await;
    let mut short = create_request(TEMPLATE);
    short.timeout_sec = 3;
    let doomed = stack.create(short.clone()).await.sandbox.unwrap().id;
    let kept = stack.create(short).await.sandbox.unwrap().id;
    let mut client = stack.client().await;
    let reply = client
        .keepalive(node::KeepaliveRequest {
            sandbox_id: kept.clone(),
            timeout_sec: 120,
        })
        .await
        .unwrap()
        .into_inner();
    let expires = reply.expires_at.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (100..=125).contains(&(expires.seconds - now)),
        "{expires:?}"
    );

    // Poll until the short one is gone (hang guard, not a timing assertion).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let gone = loop {
        let got = client
            .get_sandbox(node::GetSandboxRequest {
                sandbox_id: doomed.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .sandbox
            .unwrap();
        // STOPPING while its teardown runs, then STOPPED.
        if !matches!(got.state(), SandboxState::Running | SandboxState::Stopping) {
            break got;
        }
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(gone.state(), SandboxState::Stopped);
    assert!(gone.message.contains("timeout"), "{gone:?}");
    let (out, _, _) = stack.sh(&kept, "echo still here").await;
    assert_eq!(out, "still here\n");

    let err = client
        .keepalive(node::KeepaliveRequest {
            sandbox_id: doomed,
            timeout_sec: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_a_full_node() {
    let stack = Stack::start_with("", &[("NANOBOX__AGENT__MAX_SANDBOXES", "1")]).await;
    let mut client = stack.client().await;
    let code_of = |r: Result<tonic::Response<node::CreateSandboxResponse>, tonic::Status>| {
        let e = r.unwrap_err();
        (e.code(), e.message().to_owned())
    };

    let (code, message) = code_of(client.create_sandbox(create_request("nope")).await);
    assert_eq!(code, tonic::Code::NotFound);
    assert_eq!(message, "template nope not found");

    let mut big = create_request(TEMPLATE);
    big.resources = Some(v1::Resources {
        vcpu: 1,
        memory_mb: 1 << 20,
        disk_mb: 0,
    });
    let (code, message) = code_of(client.create_sandbox(big).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("memory_mb"), "{message}");
    let mut many = create_request(TEMPLATE);
    many.resources = Some(v1::Resources {
        vcpu: 999,
        memory_mb: 128,
        disk_mb: 0,
    });
    let (code, message) = code_of(client.create_sandbox(many).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("vcpu"), "{message}");

    // A template whose first warmup is still running.
    let meta = stack.meta().await;
    meta.create_task(
        &nanobox_core::TemplateName::new("warming").unwrap(),
        "x:1",
        "linux/amd64",
    )
    .await
    .unwrap();
    let (code, message) = code_of(client.create_sandbox(create_request("warming")).await);
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert_eq!(
        message,
        "template warming is not ready (its warmup is QUEUED)"
    );

    stack.create(create_request(TEMPLATE)).await;
    let (code, message) = code_of(client.create_sandbox(create_request(TEMPLATE)).await);
    assert_eq!(code, tonic::Code::ResourceExhausted);
    assert_eq!(message, "node is full: sandboxes: 1 of 1 running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_agent_leaves_no_orphans() {
    let mut stack = Stack::start("").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            stack
                .create(create_request(TEMPLATE))
                .await
                .sandbox
                .unwrap()
                .id,
        );
    }
    assert_eq!(stack.vmm_processes().len(), 3);
    stack.agent.take().unwrap().kill();
    // The VMs outlive the agent (they are not its children's children to kill).
    assert_eq!(stack.vmm_processes().len(), 3);

    stack.start_agent();
    // Recovery destroyed them and reports each as lost.
    let list = stack
        .client()
        .await
        .list_sandboxes(node::ListSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut listed: Vec<_> = list.sandboxes.iter().map(|s| s.id.clone()).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    for s in &list.sandboxes {
        assert_eq!(s.state(), SandboxState::Lost, "{s:?}");
        assert!(s.message.contains("restarted"), "{s:?}");
    }
    assert!(
        stack.sandbox_namespaces().is_empty(),
        "{:?}",
        stack.sandbox_namespaces()
    );
    assert!(stack.vmm_processes().is_empty());
    for sub in ["vms", "disks", "run"] {
        assert!(
            stack.leftovers(sub).is_empty(),
            "{sub}: {:?}",
            stack.leftovers(sub)
        );
    }
    // cgroups of those VMs are gone too (where this host has writable ones).
    for root in [
        "/sys/fs/cgroup/memory/nanobox",
        "/sys/fs/cgroup/cpu/nanobox",
        "/sys/fs/cgroup/nanobox",
    ] {
        if let Ok(entries) = std::fs::read_dir(root) {
            let left: Vec<_> = entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| ids.iter().any(|id| id.eq_ignore_ascii_case(n)))
                .collect();
            assert!(left.is_empty(), "{root}: {left:?}");
        }
    }
    // And the node works.
    let id = stack
        .create(create_request(TEMPLATE))
        .await
        .sandbox
        .unwrap()
        .id;
    let (out, _, _) = stack.sh(&id, "echo ok").await;
    assert_eq!(out, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_and_out() {
    use node::read_file_response::Msg as ReadMsg;
    use node::write_file_request::Msg as WriteMsg;
    let stack = Stack::start("").await;
    let id = stack
        .create(create_request(TEMPLATE))
        .await
        .sandbox
        .unwrap()
        .id;
    let mut client = stack.client().await;
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut messages = vec![node::WriteFileRequest {
        msg: Some(WriteMsg::Header(node::WriteFileHeader {
            sandbox_id: id.clone(),
            path: "/tmp/deep/dir/data.bin".into(),
            mode: 0o640,
            uid: Some(1000),
            gid: Some(1000),
            create_parents: true,
            append: false,
        })),
    }];
    messages.extend(data.chunks(1 << 20).map(|c| node::WriteFileRequest {
        msg: Some(WriteMsg::Chunk(c.to_vec())),
    }));
    let written = client
        .write_file(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.bytes_written, data.len() as u64);
    let (out, _, _) = stack
        .sh(&id, "stat -c '%s %a %u:%g' /tmp/deep/dir/data.bin")
        .await;
    assert_eq!(out.trim(), format!("{} 640 1000:1000", data.len()));

    let read = |offset: u64, length: u64| node::ReadFileRequest {
        sandbox_id: id.clone(),
        path: "/tmp/deep/dir/data.bin".into(),
        offset,
        length,
    };
    let collect = |mut stream: tonic::Streaming<node::ReadFileResponse>| async move {
        let mut header = None;
        let mut body = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            match m.msg.unwrap() {
                ReadMsg::Header(h) => header = Some(h),
                ReadMsg::Chunk(c) => body.extend(c),
            }
        }
        (header.unwrap(), body)
    };
    let (header, body) = collect(client.read_file(read(0, 0)).await.unwrap().into_inner()).await;
    assert_eq!(header.size, data.len() as u64);
    assert!(body == data, "the file came back different");
    let (_, part) = collect(client.read_file(read(1000, 10)).await.unwrap().into_inner()).await;
    assert_eq!(part, data[1000..1010]);

    // Bad requests name their problem.
    let err = client
        .read_file(node::ReadFileRequest {
            sandbox_id: id.clone(),
            path: "/no/such/file".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let err = client
        .read_file(node::ReadFileRequest {
            sandbox_id: id.clone(),
            path: "relative".into(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("path"), "{err:?}");
    let err = client
        .write_file(tokio_stream::iter([node::WriteFileRequest {
            msg: Some(WriteMsg::Chunk(b"no header".to_vec())),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("header"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_keeps_processes_and_survives_an_agent_restart() {
    let mut stack = Stack::start("").await;
    let id = stack
        .create(create_request(TEMPLATE))
        .await
        .sandbox
        .unwrap()
        .id;
    // A process that exists only in the guest's memory: a cold boot would not have it.
    let (out, _, code) = stack
        .sh(
            &id,
            "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
        )
        .await;
    assert_eq!(code, 0);
    let pid: u32 = out.trim().parse().unwrap();
    let mut client = stack.client().await;
    fn failed_precondition<T>(r: Result<T, tonic::Status>, what: &str) -> String {
        let e = r.err().unwrap_or_else(|| panic!("{what} succeeded"));
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{what}: {e:?}");
        e.message().to_owned()
    }

    let paused = client
        .pause_sandbox(node::PauseSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.snapshot_id.starts_with("snap-"), "{paused:?}");
    assert!(paused.size_bytes > 0, "{paused:?}");
    let get = |client: &mut node::node_agent_client::NodeAgentClient<_>| {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            client
                .get_sandbox(node::GetSandboxRequest { sandbox_id: id })
                .await
                .unwrap()
                .into_inner()
                .sandbox
                .unwrap()
        }
    };
    let got = get(&mut client).await;
    assert_eq!(got.state(), SandboxState::Paused);
    assert_eq!(got.snapshot_id, paused.snapshot_id);
    assert_eq!(got.expires_at, None, "a paused sandbox has no deadline");
    // Paused, it holds no VM, vCPUs or memory.
    assert!(stack.vmm_processes().is_empty());
    let allocated = stack.status().await.allocated.unwrap();
    assert_eq!(
        (allocated.vcpu, allocated.memory_mb),
        (0, 0),
        "{allocated:?}"
    );

    let message = failed_precondition(
        stack
            .client()
            .await
            .exec(v1::ExecRequest {
                id: id.clone(),
                command: "true".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "exec while paused",
    );
    assert!(message.contains("paused"), "{message}");
    failed_precondition(
        client
            .keepalive(node::KeepaliveRequest {
                sandbox_id: id.clone(),
                timeout_sec: 60,
            })
            .await,
        "keepalive while paused",
    );
    failed_precondition(
        client
            .pause_sandbox(node::PauseSandboxRequest {
                sandbox_id: id.clone(),
            })
            .await,
        "pausing twice",
    );

    // A paused sandbox is only files: it survives a kill -9 of the agent.
    stack.agent.take().unwrap().kill();
    stack.start_agent();
    let mut client = stack.client().await;
    assert_eq!(get(&mut client).await.state(), SandboxState::Paused);

    let mut resume = node::ResumeSandboxRequest {
        sandbox_id: id.clone(),
        snapshot_id: "snap-elsewhere".into(),
        ..Default::default()
    };
    let err = client.resume_sandbox(resume.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    resume.snapshot_id = paused.snapshot_id.clone();
    resume.timeout_sec = 120;
    let resumed = client
        .resume_sandbox(resume.clone())
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(resumed.state(), SandboxState::Running);
    assert!(resumed.snapshot_id.is_empty());
    assert!(resumed.boot_time_ms > 0);
    let (out, _, code) = stack.sh(&id, &format!("kill -0 {pid} && hostname")).await;
    assert_eq!((out.trim(), code), (id.as_str(), 0), "the process lived on");
    // Its snapshot is gone: the guest has run since, so it no longer matches the disk.
    assert!(stack.leftovers("snapshots").is_empty());
    failed_precondition(
        client.resume_sandbox(resume).await,
        "resuming a running sandbox",
    );

    // Paused again, then destroyed: nothing is left.
    client
        .pause_sandbox(node::PauseSandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
    client
        .destroy_sandbox(node::DestroySandboxRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(get(&mut client).await.state(), SandboxState::Stopped);
    for sub in ["vms", "disks", "run", "snapshots"] {
        assert!(
            stack.leftovers(sub).is_empty(),
            "{sub}: {:?}",
            stack.leftovers(sub)
        );
    }
}

/// The agent opens the database read-only and applies no migrations: started against a
/// database nobody has migrated yet, it waits for the control plane to do it, then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_waits_for_the_control_plane_to_migrate_and_never_migrates_itself() {
    let mut stack = Stack::prepare("", &[]).await;
    let db = stack.db.clone();
    let objects = stack.objects_dir();
    let migrated = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = migrated.clone();
    // What the scheduler or the template-builder does at its start, a little later.
    let control_plane = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let meta = nanobox_store::MetadataStore::open(db, Default::default())
            .await
            .unwrap();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let objects = nanobox_store::LocalFsStore::open(objects).unwrap();
        let rootfs = nanobox_testkit::GuestArtifacts::from_env().rootfs;
        nanobox_testkit::template::publish_template(&meta, &objects, TEMPLATE, &rootfs).await;
    });
    // Blocks until the agent prints its address, which it does only once it has waited.
    tokio::task::block_in_place(|| stack.start_agent());
    assert!(
        migrated.load(std::sync::atomic::Ordering::SeqCst),
        "the agent served before the schema existed"
    );
    control_plane.await.unwrap();
    let created = stack.create(create_request(TEMPLATE)).await;
    let id = created.sandbox.unwrap().id;
    let (out, _, code) = stack.sh(&id, "echo served").await;
    assert_eq!((out.as_str(), code), ("served\n", 0));
}
