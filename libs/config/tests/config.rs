//! `nanobox.toml` end to end: the seed's file and the example load, defaults work with no
//! file, every mistake names its key (and line or variable), and environment overrides
//! apply and are type-checked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use nanobox_config::{
    Accel, Config, ConfigError, CowMode, KeyPath, Location, LogFormat, Vmm, CONFIG_ENV,
    DEFAULT_PATH,
};

const SEED: &str = include_str!("fixtures/seed.nanobox.toml");
const EXAMPLE: &str = include_str!("../nanobox.example.toml");

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("nanobox.toml"), [])
}

/// The error of parsing then validating `text` with `vars`, as text.
fn error(text: &str, vars: &[(&str, &str)]) -> String {
    match Config::parse(text, Path::new("nanobox.toml"), env(vars)) {
        Err(e) => e.to_string(),
        Ok(config) => match config.validate() {
            Err(e) => e.to_string(),
            Ok(()) => panic!("expected an error for:\n{text}"),
        },
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn the_seed_file_loads_as_is() {
    let config = parse(SEED).unwrap();
    config.validate().unwrap();
    assert_eq!(config.api.listen_addr, addr("0.0.0.0:8080"));
    assert_eq!(config.agent.node_id, "node-01");
    assert_eq!(
        config.agent.firecracker_bin,
        Path::new("/usr/local/bin/firecracker")
    );
    assert_eq!(
        config.agent.rootfs_dir,
        Path::new("/var/lib/nanobox/rootfs")
    );
    assert_eq!(
        config.agent.snapshot_dir,
        Path::new("/var/lib/nanobox/snapshots")
    );
    assert_eq!(
        config.firecracker.kernel,
        Path::new("/var/lib/nanobox/kernels/vmlinux-fc")
    );
    assert_eq!(
        config.firecracker.boot_args.as_deref(),
        Some("console=ttyS0 reboot=k panic=1 pci=off init=/sbin/nanobox-init")
    );
    assert_eq!(config.network.bridge_name, "nanobox-br0");
    assert_eq!(config.network.subnet.to_string(), "10.100.0.0/16");
    assert_eq!(config.network.host_iface.as_deref(), Some("eth0"));
    assert_eq!(
        config.oci.cache_dir,
        Path::new("/var/lib/nanobox/oci-cache")
    );
    assert_eq!(
        config.oci.init_binary,
        Path::new("/usr/local/lib/nanobox/nanobox-init")
    );
    // The seed's [oci] dns_server is the one sandboxes get.
    assert_eq!(config.dns_server(), "10.100.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(config.pool.replenish_interval_sec, 5);
    assert_eq!(config.pool.max_idle_sec, 600);
    let [pool] = config.pool.templates.as_slice() else {
        panic!("one pool");
    };
    assert_eq!(pool.name.as_str(), "node22");
    assert_eq!((pool.min_ready, pool.max_ready), (3, 10));
    // The QEMU kernel defaults to Firecracker's.
    assert_eq!(
        config.qemu_kernel(),
        Path::new("/var/lib/nanobox/kernels/vmlinux-fc")
    );
    assert_eq!(config.source_file(), Some(Path::new("nanobox.toml")));
}

#[test]
fn the_example_loads_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nanobox.toml");
    std::fs::write(&file, EXAMPLE).unwrap();
    let config = Config::load_from(Some(&file), []).unwrap();
    assert_eq!(config.source_file(), Some(file.as_path()));
    assert_eq!(config.agent.vmm, Vmm::Auto);
    assert_eq!(config.agent.cow, CowMode::Auto);
    assert_eq!(config.qemu.accel, Accel::Auto);
    assert_eq!(config.telemetry.log_format, LogFormat::Json);
    assert_eq!(config.network.internal_services.len(), 2);
    assert_eq!(
        config.scheduler_endpoint(),
        "http://scheduler.nanobox.svc:50051"
    );
    assert_eq!(config.agent.advertised_addr(), "10.0.0.7:50071");
    let capacity = config.agent.capacity();
    assert_eq!((capacity.vcpus, capacity.memory_mb), (32, 131_072));
    // Every service's metrics listener, each on a port of its own.
    assert_eq!(config.api.metrics_addr, Some(addr("0.0.0.0:9451")));
    assert_eq!(config.scheduler.metrics_addr, Some(addr("0.0.0.0:9452")));
    assert_eq!(config.builder.metrics_addr, Some(addr("0.0.0.0:9453")));
    assert_eq!(config.agent.metrics_addr, Some(addr("0.0.0.0:9454")));
    assert_eq!(
        config.snapshot_store.metrics_addr,
        Some(addr("0.0.0.0:9455"))
    );
}

#[test]
fn defaults_run_one_machine() {
    if Path::new(DEFAULT_PATH).exists() {
        eprintln!("{DEFAULT_PATH} exists on this machine; checking Config::default() only");
    } else {
        let config = Config::load_from(None, env(&[("PATH", "/bin")])).unwrap();
        assert_eq!(config.source_file(), None);
    }
    let config = Config::default();
    config.validate().unwrap();
    let cache = nanobox_core::cache_dir();
    assert_eq!(
        config.object_store.location,
        format!("file://{}", cache.join("objects").display())
    );
    assert_eq!(config.oci.cache_dir, cache.join("oci"));
    assert_eq!(config.oci.init_binary, cache.join("nanobox-init"));
    assert_eq!(config.firecracker.kernel, cache.join("vmlinux"));
    assert_eq!(config.api.listen_addr, addr("127.0.0.1:8080"));
    assert_eq!(config.api.grpc_addr, addr("127.0.0.1:50051"));
    assert_eq!(config.agent.listen_addr, addr("127.0.0.1:50071"));
    assert_eq!(config.agent.state_dir, Path::new("/var/lib/nanobox/agent"));
    assert_eq!(config.agent.template_cache_bytes, 20 << 30);
    assert_eq!(config.agent.default_timeout_sec, 300);
    assert_eq!(config.agent.max_timeout_sec, 86_400);
    assert_eq!(config.agent.cgroup_parent, "nanobox");
    assert_eq!(config.qemu.binary, Path::new("qemu-system-x86_64"));
    assert!(config.qemu.seccomp_sandbox);
    // No metrics listeners unless asked for.
    assert_eq!(config.api.metrics_addr, None);
    assert_eq!(config.scheduler.metrics_addr, None);
    assert_eq!(config.builder.metrics_addr, None);
    assert_eq!(config.agent.metrics_addr, None);
    assert_eq!(config.snapshot_store.metrics_addr, None);
    // Clients find each service on this machine.
    assert_eq!(config.scheduler_endpoint(), "http://127.0.0.1:50051");
    assert_eq!(config.builder_endpoint(), "http://127.0.0.1:50061");
    assert_eq!(config.snapshot_store_endpoint(), "http://127.0.0.1:50081");
    assert_eq!(config.agent.advertised_addr(), "127.0.0.1:50071");
    // No DNS server configured: the bridge address.
    assert_eq!(config.dns_server(), "10.100.0.1".parse::<IpAddr>().unwrap());
    // Host capacity is read from the machine.
    let capacity = config.agent.capacity();
    assert!(
        capacity.vcpus >= 1 && capacity.memory_mb > 0,
        "{capacity:?}"
    );
    // An empty file is the defaults too.
    parse("").unwrap().validate().unwrap();
}

#[test]
fn the_file_is_found_by_path_then_environment() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, "[agent]\nnode_id = \"from-a\"\n").unwrap();
    std::fs::write(&b, "[agent]\nnode_id = \"from-b\"\n").unwrap();
    let b_env = env(&[(CONFIG_ENV, b.to_str().unwrap())]);

    let config = Config::load_from(None, b_env.clone()).unwrap();
    assert_eq!(config.agent.node_id, "from-b");
    let config = Config::load_from(Some(&a), b_env).unwrap();
    assert_eq!(config.agent.node_id, "from-a");

    let missing = dir.path().join("missing.toml");
    let e = Config::load_from(Some(&missing), []).unwrap_err();
    assert!(matches!(e, ConfigError::Read { ref path, .. } if *path == missing));
    assert!(e
        .to_string()
        .starts_with(&format!("cannot read {}:", missing.display())));
    let e = Config::load_from(None, env(&[(CONFIG_ENV, missing.to_str().unwrap())])).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
}

#[test]
fn loading_validates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nanobox.toml");
    std::fs::write(
        &file,
        "[pool]\n\n[[pool.templates]]\nname = \"py\"\nmin_ready = 3\nmax_ready = 2\n",
    )
    .unwrap();
    let e = Config::load_from(Some(&file), []).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: [pool.templates][0].min_ready (line 5): must be at most max_ready (3 > 2)",
            file.display()
        )
    );
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let text = "[api]\nlisten_addr = \"127.0.0.1:8080\"\n\n[agent]\nnode_id = \"n1\"\nlisten_adr = \"0.0.0.0:1\"\n";
    let e = parse(text).unwrap_err();
    assert!(
        matches!(&e, ConfigError::UnknownKey(u) if u.line == 6 && u.key == "listen_adr"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "nanobox.toml: unknown key `listen_adr` in [agent] (line 6); did you mean `listen_addr`?"
    );

    assert_eq!(
        error("[agnet]\nnode_id = \"x\"\n", &[]),
        "nanobox.toml: unknown section [agnet] (line 1); did you mean [agent]?"
    );
    let e = error("[network]\ncolour = \"blue\"\n", &[]);
    assert!(
        e.starts_with("nanobox.toml: unknown key `colour` in [network] (line 2); expected one of"),
        "{e}"
    );
    assert!(e.contains("`bridge_name`"), "{e}");
    assert_eq!(
        error(
            "[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\n\n[[pool.templates]]\nname = \"b\"\nmin_redy = 1\nmax_ready = 1\n",
            &[]
        ),
        "nanobox.toml: unknown key `min_redy` in [pool.templates][1] (line 8); did you mean `min_ready`?"
    );
    assert_eq!(
        error("[telemetry]\nlog_formt = \"json\"\n", &[]),
        "nanobox.toml: unknown key `log_formt` in [telemetry] (line 2); did you mean `log_format`?"
    );
}

#[test]
fn bad_values_are_named_with_their_line() {
    let cases: &[(&str, &str)] = &[
        (
            "[agent]\nlisten_addr = \"nope\"\n",
            "nanobox.toml: [agent].listen_addr (line 2): invalid socket address syntax (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)",
        ),
        (
            "[agent]\nmax_sandboxes = -1\n",
            "nanobox.toml: [agent].max_sandboxes (line 2): invalid value: integer `-1`, expected a non-negative integer below 2^32",
        ),
        (
            "[api]\nrequest_timeout_sec = \"60\"\n",
            "nanobox.toml: [api].request_timeout_sec (line 2): invalid type: string \"60\", expected a non-negative integer",
        ),
        (
            "[agent]\nvmm = \"kvm\"\n",
            "nanobox.toml: [agent].vmm (line 2): unknown value `kvm`, expected one of `auto`, `qemu`, `firecracker`",
        ),
        (
            "[qemu]\nseccomp_sandbox = \"yes\"\n",
            "nanobox.toml: [qemu].seccomp_sandbox (line 2): invalid type: string \"yes\", expected a boolean",
        ),
        (
            "[network]\ninternal_services = [\n  \"10.0.0.0/8\",\n  \"bogus\",\n]\n",
            "nanobox.toml: [network].internal_services[1] (line 4): \"bogus\" is not an IP address or network like 10.0.0.5 or 10.0.0.0/8",
        ),
        (
            "[network]\nsubnet = \"10.100.0.1/16\"\n",
            "nanobox.toml: [network].subnet (line 2): 10.100.0.1/16 has host bits set; the network is 10.100.0.0/16",
        ),
        (
            "[network]\ndns_server = \"dns.example\"\n",
            "nanobox.toml: [network].dns_server (line 2): invalid IP address syntax (expected an address such as 10.100.0.1)",
        ),
        (
            "[[pool.templates]]\nname = \"Node 22\"\nmin_ready = 1\nmax_ready = 2\n",
            "nanobox.toml: [pool.templates][0].name (line 2): \"Node 22\" is not a template name (1 to 63 of [a-z0-9._-], starting with a letter or digit)",
        ),
        (
            "[[pool.templates]]\nmin_ready = 1\nmax_ready = 2\n",
            "nanobox.toml: [pool.templates][0].name (line 1): required key is missing",
        ),
        (
            "[scheduler]\nmetrics_addr = \"scheduler:9452\"\n",
            "nanobox.toml: [scheduler].metrics_addr (line 2): invalid socket address syntax (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)",
        ),
        (
            "agent = 5\n",
            "nanobox.toml: [agent] (line 1): invalid type: integer `5`, expected a table",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(&error(text, &[]), expected, "for:\n{text}");
        let e = parse(text).unwrap_err();
        assert!(matches!(e, ConfigError::Value(_)), "{e:?}");
    }
}

#[test]
fn syntax_errors_give_line_and_column() {
    let e = parse("[agent]\nnode_id = \"x\"\n[pool\n").unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::Syntax {
                line: 3,
                column: 6,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("nanobox.toml: line 3, column 6: "),
        "{e}"
    );
    let e = parse("[agent]\nnode_id = \"x\"\nnode_id = \"y\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{e:?}");
}

/// Each validation rule: a file, the key it must name (with the line, from the file) and a
/// part of the message.
#[test]
fn every_validation_error_names_its_key() {
    let cases: &[(&str, &str, usize, &str)] = &[
        ("[api]\napi_keys = [\"short\"]\n", "[api].api_keys[0]", 2, "at least 16 characters"),
        ("[api]\napi_keys_file = \"keys.txt\"\n", "[api].api_keys_file", 2, "absolute path"),
        ("[api]\nmax_body_bytes = 10\n", "[api].max_body_bytes", 2, "at least 1024"),
        ("[api]\nrequest_timeout_sec = 0\n", "[api].request_timeout_sec", 2, "at least 1"),
        ("[agent]\nnode_id = \"-x\"\n", "[agent].node_id", 2, "not a node id"),
        ("[agent]\nfirecracker_bin = \"bin/firecracker\"\n", "[agent].firecracker_bin", 2, "program name or an absolute path"),
        ("[agent]\nrootfs_dir = \"rootfs\"\n", "[agent].rootfs_dir", 2, "absolute path"),
        ("[agent]\nsnapshot_dir = \"snaps\"\n", "[agent].snapshot_dir", 2, "absolute path"),
        ("[agent]\nstate_dir = \"state\"\n", "[agent].state_dir", 2, "absolute path"),
        ("[agent]\ntemplate_cache_dir = \"t\"\n", "[agent].template_cache_dir", 2, "absolute path"),
        ("[agent]\nlisten_addr = \"0.0.0.0:50071\"\n", "[agent].advertise_addr", 1, "required when listen_addr is unspecified"),
        ("[agent]\nadvertise_addr = \"node-1\"\n", "[agent].advertise_addr", 2, "not host:port"),
        ("[agent]\nscheduler_addr = \"http://scheduler\"\n", "[agent].scheduler_addr", 2, "not host:port"),
        ("[agent]\ntemplate_cache_bytes = 1000\n", "[agent].template_cache_bytes", 2, "at least 1048576"),
        ("[agent]\ndefault_timeout_sec = 0\n", "[agent].default_timeout_sec", 2, "at least 1"),
        ("[agent]\nmax_timeout_sec = 100000\n", "[agent].max_timeout_sec", 2, "must be 1 to 86400"),
        ("[agent]\ndefault_timeout_sec = 600\nmax_timeout_sec = 300\n", "[agent].default_timeout_sec", 2, "must be at most max_timeout_sec (600 > 300)"),
        ("[agent]\ncapacity_vcpus = 0\n", "[agent].capacity_vcpus", 2, "at least 1"),
        ("[agent]\ncapacity_memory_mb = 10\n", "[agent].capacity_memory_mb", 2, "at least 64"),
        ("[agent]\nmax_sandboxes = 0\n", "[agent].max_sandboxes", 2, "at least 1"),
        ("[agent]\ncgroup_parent = \"/nanobox\"\n", "[agent].cgroup_parent", 2, "relative cgroup path"),
        ("[agent]\nrun_as_user = \"Not A User\"\n", "[agent].run_as_user", 2, "not a user name"),
        ("[firecracker]\nkernel = \"vmlinux\"\n", "[firecracker].kernel", 2, "absolute path"),
        ("[firecracker]\nboot_args = \" \"\n", "[firecracker].boot_args", 2, "one non-empty line"),
        ("[firecracker]\njailer_bin = \"jailer\"\nuid = 1000\n", "[firecracker].gid", 1, "required when jailer_bin is set"),
        ("[firecracker]\nuid = 0\n", "[firecracker].uid", 2, "must not be 0"),
        ("[firecracker]\nchroot_base_dir = \"srv\"\n", "[firecracker].chroot_base_dir", 2, "absolute path"),
        ("[qemu]\nbinary = \"./qemu\"\n", "[qemu].binary", 2, "program name or an absolute path"),
        ("[qemu]\nkernel = \"vmlinux\"\n", "[qemu].kernel", 2, "absolute path"),
        ("[network]\nbridge_name = \"a-very-long-bridge-name\"\n", "[network].bridge_name", 2, "not a network interface name"),
        ("[network]\nhost_iface = \"eth 0\"\n", "[network].host_iface", 2, "not a network interface name"),
        ("[network]\nsubnet = \"10.0.0.0/31\"\n", "[network].subnet", 2, "too small"),
        ("[network]\nsubnet = \"10.100.0.0/24\"\n", "[network].subnet", 2, "10.100.0.0/24 has room for 253 sandboxes, fewer than [agent] max_sandboxes (1024)"),
        ("[network]\ndefault_rate_limit_mbps = 0\n", "[network].default_rate_limit_mbps", 2, "at least 1"),
        ("[network]\nhost_netns = \"bad name\"\n", "[network].host_netns", 2, "neither a namespace name"),
        ("[network]\nhost_netns = \"nbx-host\"\n", "[network].host_netns", 2, "starts with netns_prefix \"nbx-\""),
        ("[builder]\nmax_image_mb = 8\n", "[builder].max_image_mb", 2, "at least 16"),
        ("[oci]\ncache_dir = \"oci\"\n", "[oci].cache_dir", 2, "absolute path"),
        ("[oci]\ninit_binary = \"nanobox-init\"\n", "[oci].init_binary", 2, "absolute path"),
        ("[oci]\ndocker_config = \"config.json\"\n", "[oci].docker_config", 2, "absolute path"),
        ("[oci]\nplain_http_registries = [\"127.0.0.1:5000\", \"localhost\"]\n", "[oci].plain_http_registries[1]", 2, "not host:port"),
        ("[oci]\nmax_parallel = 0\n", "[oci].max_parallel", 2, "at least 1"),
        ("[pool]\nreplenish_interval_sec = 0\n", "[pool].replenish_interval_sec", 2, "at least 1"),
        ("[pool]\nmax_idle_sec = 0\n", "[pool].max_idle_sec", 2, "at least 1"),
        ("[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 0\n", "[pool.templates][0].max_ready", 4, "at least 1"),
        ("[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\n[[pool.templates]]\nname = \"b\"\nmin_ready = 3\nmax_ready = 2\n", "[pool.templates][1].min_ready", 7, "must be at most max_ready (3 > 2)"),
        ("[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\n[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\n", "[pool.templates][1].name", 6, "already pooled by [pool.templates][0]"),
        ("[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\nvcpus = 64\n", "[pool.templates][0].vcpus", 5, "outside 1..=32"),
        ("[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\nmemory_mb = 8\n", "[pool.templates][0].memory_mb", 5, "outside 64..=65536"),
        ("[agent]\ncapacity_vcpus = 2\n[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 1\nvcpus = 4\n", "[pool.templates][0].vcpus", 7, "at most [agent] capacity_vcpus (4 > 2)"),
        ("[agent]\nmax_sandboxes = 4\n[[pool.templates]]\nname = \"a\"\nmin_ready = 0\nmax_ready = 5\n", "[pool].templates", 3, "add up to 5, more than [agent] max_sandboxes (4)"),
        ("[database]\nurl = \"\"\n", "[database].url", 2, "must not be empty"),
        ("[object_store]\nlocation = \"objects\"\n", "[object_store].location", 2, "expected file:///absolute/path"),
        ("[object_store]\nlocation = \"s3://b?colour=red\"\n", "[object_store].location", 2, "unknown s3 option"),
        ("[scheduler]\nheartbeat_interval_ms = 10\n", "[scheduler].heartbeat_interval_ms", 2, "at least 100"),
        ("[scheduler]\nheartbeat_interval_ms = 5000\nnode_lost_after_sec = 10\n", "[scheduler].node_lost_after_sec", 3, "at least three heartbeat intervals"),
        ("[builder]\nwork_dir = \"work\"\n", "[builder].work_dir", 2, "absolute path"),
        ("[builder]\nadvertise_addr = \"builder\"\n", "[builder].advertise_addr", 2, "not host:port"),
        ("[snapshot_store]\nadvertise_addr = \"store\"\n", "[snapshot_store].advertise_addr", 2, "not host:port"),
        ("[auth]\nservice_token = \"short\"\n", "[auth].service_token", 2, "at least 16 characters"),
        ("[auth]\nservice_token = \"0123456789abcdef\"\nservice_token_file = \"/etc/t\"\n", "[auth].service_token_file", 3, "not both"),
        ("[auth]\nservice_token_file = \"token\"\n", "[auth].service_token_file", 2, "absolute path"),
        ("[telemetry]\ndefault_filter = \"\"\n", "[telemetry].default_filter", 2, "must not be empty"),
        ("[telemetry]\notlp_endpoint = \"collector:4317\"\n", "[telemetry].otlp_endpoint", 2, "not an http:// or https:// URL"),
        ("[api]\nlisten_addr = \"127.0.0.1:7000\"\n[builder]\nlisten_addr = \"0.0.0.0:7000\"\n", "[builder].listen_addr", 4, "clashes with [api].listen_addr (127.0.0.1:7000)"),
        ("[api]\nmetrics_addr = \"127.0.0.1:50051\"\n", "[api].metrics_addr", 2, "clashes with [api].grpc_addr (127.0.0.1:50051)"),
        ("[scheduler]\nmetrics_addr = \"0.0.0.0:9450\"\n[agent]\nmetrics_addr = \"127.0.0.1:9450\"\n", "[agent].metrics_addr", 4, "clashes with [scheduler].metrics_addr (0.0.0.0:9450)"),
    ];
    for (text, key, line, fragment) in cases {
        let config = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let e = config.validate().expect_err(text);
        let [problem] = e.problems() else {
            panic!("one problem expected for:\n{text}\ngot: {e}");
        };
        assert_eq!(problem.key.to_string(), *key, "for:\n{text}");
        assert_eq!(
            problem.location,
            Location::File {
                file: PathBuf::from("nanobox.toml"),
                line: *line
            },
            "for:\n{text}"
        );
        assert!(problem.message.contains(fragment), "{e}");
        assert_eq!(
            e.to_string(),
            format!("nanobox.toml: {key} (line {line}): {}", problem.message)
        );
    }
}

#[test]
fn all_problems_are_reported_together() {
    let e = error(
        "[agent]\ndefault_timeout_sec = 500\nmax_timeout_sec = 400\n[auth]\nservice_token = \"short\"\n",
        &[],
    );
    assert_eq!(
        e,
        "2 problems in the configuration:\n  \
         nanobox.toml: [agent].default_timeout_sec (line 2): must be at most max_timeout_sec (500 > 400)\n  \
         nanobox.toml: [auth].service_token (line 5): must be at least 16 characters"
    );
}

#[test]
fn environment_overrides_apply() {
    let vars = env(&[
        ("NANOBOX__AGENT__LISTEN_ADDR", "0.0.0.0:9000"),
        ("NANOBOX__AGENT__ADVERTISE_ADDR", "10.0.0.9:9000"),
        ("NANOBOX__AGENT__MAX_SANDBOXES", "64"),
        ("nanobox__qemu__seccomp_sandbox", "false"),
        ("NANOBOX__QEMU__ACCEL", "tcg"),
        (
            "NANOBOX__API__API_KEYS",
            "0123456789abcdef-one, 0123456789abcdef-two",
        ),
        ("NANOBOX__NETWORK__DNS_SERVER", "1.1.1.1"),
        (
            "NANOBOX__OBJECT_STORE__LOCATION",
            "s3://bucket?region=eu-west-1",
        ),
        ("NANOBOX__TELEMETRY__LOG_FORMAT", "json"),
        ("NANOBOX__SCHEDULER__METRICS_ADDR", "127.0.0.1:9452"),
        ("NANOBOX_CACHE_DIR", "/ignored/by/overrides"),
    ]);
    // The seed sets [agent] and [oci] dns_server; the environment wins.
    let config = Config::parse(SEED, Path::new("nanobox.toml"), vars).unwrap();
    config.validate().unwrap();
    assert_eq!(config.agent.listen_addr, addr("0.0.0.0:9000"));
    assert_eq!(config.agent.advertised_addr(), "10.0.0.9:9000");
    assert_eq!(config.agent.max_sandboxes, 64);
    assert!(!config.qemu.seccomp_sandbox);
    assert_eq!(config.qemu.accel, Accel::Tcg);
    let keys: Vec<&str> = config.api.api_keys.iter().map(|k| k.expose()).collect();
    assert_eq!(keys, ["0123456789abcdef-one", "0123456789abcdef-two"]);
    assert_eq!(config.dns_server(), "1.1.1.1".parse::<IpAddr>().unwrap());
    assert_eq!(config.object_store.location, "s3://bucket?region=eu-west-1");
    assert_eq!(config.telemetry.log_format, LogFormat::Json);
    assert_eq!(config.scheduler.metrics_addr, Some(addr("127.0.0.1:9452")));
    // Keys the environment did not touch keep the file's values.
    assert_eq!(config.agent.node_id, "node-01");
    assert_eq!(config.pool.templates.len(), 1);
    // Where each value came from.
    assert_eq!(
        config.location(&KeyPath::keys(["agent", "listen_addr"])),
        Location::Env {
            var: "NANOBOX__AGENT__LISTEN_ADDR".to_owned()
        }
    );
    assert_eq!(
        config.location(&KeyPath::keys(["agent", "node_id"])),
        Location::File {
            file: PathBuf::from("nanobox.toml"),
            line: 5
        }
    );
}

#[test]
fn environment_overrides_apply_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing_default = !Path::new(DEFAULT_PATH).exists();
    let config = Config::load_from(
        None,
        env(&[
            (
                "NANOBOX__OCI__PLAIN_HTTP_REGISTRIES",
                "127.0.0.1:5000,localhost:5001",
            ),
            ("NANOBOX__BUILDER__WORK_DIR", dir.path().to_str().unwrap()),
        ]),
    )
    .unwrap();
    if missing_default {
        assert_eq!(config.source_file(), None);
    }
    assert_eq!(
        config.oci.plain_http_registries,
        ["127.0.0.1:5000", "localhost:5001"]
    );
    assert_eq!(config.builder.work_dir, dir.path());
}

#[test]
fn environment_overrides_are_type_checked_and_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "NANOBOX__AGENT__LISTEN_ADDR",
            "nonsense",
            "NANOBOX__AGENT__LISTEN_ADDR: [agent].listen_addr: invalid socket address syntax (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)",
        ),
        (
            "NANOBOX__AGENT__MAX_SANDBOXES",
            "lots",
            "NANOBOX__AGENT__MAX_SANDBOXES: [agent].max_sandboxes takes an integer, not \"lots\"",
        ),
        (
            "NANOBOX__AGENT__MAX_SANDBOXES",
            "-3",
            "NANOBOX__AGENT__MAX_SANDBOXES: [agent].max_sandboxes: invalid value: integer `-3`, expected a non-negative integer below 2^32",
        ),
        (
            "NANOBOX__QEMU__SECCOMP_SANDBOX",
            "maybe",
            "NANOBOX__QEMU__SECCOMP_SANDBOX: [qemu].seccomp_sandbox takes true or false, not \"maybe\"",
        ),
        (
            "NANOBOX__NETWORK__INTERNAL_SERVICES",
            "10.0.0.0/8,bad",
            "NANOBOX__NETWORK__INTERNAL_SERVICES: [network].internal_services[1]: \"bad\" is not an IP address or network like 10.0.0.5 or 10.0.0.0/8",
        ),
        (
            "NANOBOX__AGENT__VMM",
            "kvm",
            "NANOBOX__AGENT__VMM: [agent].vmm: unknown value `kvm`, expected one of `auto`, `qemu`, `firecracker`",
        ),
        (
            "NANOBOX__AGENT__LISTEN_ADR",
            "0.0.0.0:1",
            "NANOBOX__AGENT__LISTEN_ADR: unknown key `listen_adr` in [agent]; did you mean `listen_addr`?",
        ),
        (
            "NANOBOX__AGENT__DEFAULT_TIMEOUT_SEC",
            "0",
            "NANOBOX__AGENT__DEFAULT_TIMEOUT_SEC: [agent].default_timeout_sec: must be at least 1 (is 0)",
        ),
    ];
    for (var, value, expected) in cases {
        // Over the seed's file and over no file alike.
        assert_eq!(&error(SEED, &[(var, value)]), expected);
        assert_eq!(&error("", &[(var, value)]), expected);
    }
}

#[test]
fn network_dns_server_wins_over_the_seeds_oci_one() {
    let text = "[network]\ndns_server = \"10.100.0.53\"\n[oci]\ndns_server = \"10.100.0.1\"\n";
    let config = parse(text).unwrap();
    assert_eq!(
        config.dns_server(),
        "10.100.0.53".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let config = parse(
        "[api]\napi_keys = [\"0123456789abcdef-secret\"]\n[database]\nurl = \"postgres://u:pw-secret@h/db\"\n",
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("secret"), "{debug}");
    assert_eq!(config.database.url.expose(), "postgres://u:pw-secret@h/db");
}
