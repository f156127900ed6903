//! [`Config::validate`]: the checks that parsing cannot make. Values of the right type that
//! make no sense (a zero interval, a relative path where the service needs an absolute
//! one), and keys that must agree (`min_ready <= max_ready`, the default timeout within
//! the maximum, a subnet with room for the sandboxes). Every problem is reported, each
//! naming its key and where its value came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::error::{KeyPath, Problem};
use crate::schema::Config;
use crate::types::Secret;
use crate::ConfigError;

/// The fewest characters an API key or service token may have.
pub const MIN_SECRET_LEN: usize = 16;

impl Config {
    /// Checks the values together; `Err(ConfigError::Invalid)` lists every problem found.
    /// Pure: it reads no file and touches no network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut c = Checker {
            config: self,
            problems: Vec::new(),
        };
        c.api();
        c.agent();
        c.firecracker();
        c.qemu();
        c.network();
        c.oci();
        c.pool();
        c.services();
        c.auth();
        c.telemetry();
        c.addresses_distinct();
        if c.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(c.problems))
        }
    }
}

struct Checker<'a> {
    config: &'a Config,
    problems: Vec<Problem>,
}

fn key(section: &str, name: &str) -> KeyPath {
    KeyPath::keys([section, name])
}

impl Checker<'_> {
    fn fail(&mut self, key: KeyPath, message: impl Into<String>) {
        let location = self.config.location(&key);
        self.problems.push(Problem {
            key,
            location,
            message: message.into(),
        });
    }

    fn at_least(&mut self, key: KeyPath, value: u64, min: u64) {
        if value < min {
            self.fail(key, format!("must be at least {min} (is {value})"));
        }
    }

    fn absolute(&mut self, key: KeyPath, path: &Path) {
        if !path.is_absolute() {
            self.fail(
                key,
                format!(
                    "must be an absolute path (is {:?})",
                    path.display().to_string()
                ),
            );
        }
    }

    fn absolute_opt(&mut self, key: KeyPath, path: Option<&Path>) {
        if let Some(path) = path {
            self.absolute(key, path);
        }
    }

    /// A program: a bare name looked up in `PATH`, or an absolute path.
    fn binary(&mut self, key: KeyPath, path: &Path) {
        let text = path.to_string_lossy();
        if text.is_empty() || (!path.is_absolute() && text.contains('/')) {
            self.fail(
                key,
                format!("must be a program name or an absolute path (is {text:?})"),
            );
        }
    }

    fn host_port(&mut self, key: KeyPath, text: &str, allow_scheme: bool) {
        let bare = if allow_scheme {
            text.strip_prefix("http://")
                .or_else(|| text.strip_prefix("https://"))
                .unwrap_or(text)
        } else {
            text
        };
        if !is_host_port(bare) {
            let scheme = if allow_scheme {
                " (optionally with http:// or https://)"
            } else {
                ""
            };
            self.fail(
                key,
                format!("{text:?} is not host:port{scheme}, such as 10.0.0.7:50071"),
            );
        }
    }

    fn secret(&mut self, key: KeyPath, secret: &Secret) {
        if let Some(problem) = secret_problem(secret.expose()) {
            self.fail(key, problem);
        }
    }

    fn iface(&mut self, key: KeyPath, name: &str) {
        let valid = !name.is_empty()
            && name.len() <= 15
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':'));
        if !valid {
            self.fail(
                key,
                format!(
                    "{name:?} is not a network interface name (1 to 15 printable characters, \
                     no '/', ':' or spaces)"
                ),
            );
        }
    }

    fn api(&mut self) {
        let api = &self.config.api;
        for (i, k) in api.api_keys.iter().enumerate() {
            self.secret(key("api", "api_keys").index(i), k);
        }
        self.absolute_opt(key("api", "api_keys_file"), api.api_keys_file.as_deref());
        self.at_least(key("api", "max_body_bytes"), api.max_body_bytes, 1024);
        self.at_least(
            key("api", "request_timeout_sec"),
            api.request_timeout_sec,
            1,
        );
    }

    fn agent(&mut self) {
        let a = &self.config.agent;
        let k = |name| key("agent", name);
        if !is_node_id(&a.node_id) {
            self.fail(
                k("node_id"),
                format!(
                    "{:?} is not a node id (1 to 63 of [A-Za-z0-9._-], starting with a letter \
                     or digit)",
                    a.node_id
                ),
            );
        }
        self.binary(k("firecracker_bin"), &a.firecracker_bin);
        self.absolute(k("rootfs_dir"), &a.rootfs_dir);
        self.absolute(k("snapshot_dir"), &a.snapshot_dir);
        self.absolute(k("state_dir"), &a.state_dir);
        self.absolute(k("template_cache_dir"), &a.template_cache_dir);
        if let Some(addr) = &a.advertise_addr {
            self.host_port(k("advertise_addr"), addr, false);
        } else if a.listen_addr.ip().is_unspecified() {
            self.fail(
                k("advertise_addr"),
                format!(
                    "required when listen_addr is unspecified ({}): the address the scheduler \
                     reaches this node at",
                    a.listen_addr
                ),
            );
        }
        if let Some(addr) = &a.scheduler_addr {
            self.host_port(k("scheduler_addr"), addr, true);
        }
        self.at_least(k("template_cache_bytes"), a.template_cache_bytes, 1 << 20);
        self.at_least(k("default_timeout_sec"), a.default_timeout_sec, 1);
        let max = nanobox_core::MAX_SANDBOX_TIMEOUT.as_secs();
        if a.max_timeout_sec == 0 || a.max_timeout_sec > max {
            self.fail(
                k("max_timeout_sec"),
                format!("must be 1 to {max} (is {})", a.max_timeout_sec),
            );
        }
        if a.default_timeout_sec > a.max_timeout_sec {
            self.fail(
                k("default_timeout_sec"),
                format!(
                    "must be at most max_timeout_sec ({} > {})",
                    a.default_timeout_sec, a.max_timeout_sec
                ),
            );
        }
        if let Some(vcpus) = a.capacity_vcpus {
            self.at_least(k("capacity_vcpus"), vcpus.into(), 1);
        }
        if let Some(mb) = a.capacity_memory_mb {
            self.at_least(k("capacity_memory_mb"), mb, 64);
        }
        self.at_least(k("max_sandboxes"), a.max_sandboxes.into(), 1);
        if !is_relative_cgroup(&a.cgroup_parent) {
            self.fail(
                k("cgroup_parent"),
                format!(
                    "{:?} is not a relative cgroup path (segments of [A-Za-z0-9._-], no \
                     leading '/', no '.' or '..')",
                    a.cgroup_parent
                ),
            );
        }
        if let Some(user) = &a.run_as_user {
            if !is_user(user) {
                self.fail(
                    k("run_as_user"),
                    format!("{user:?} is not a user name or numeric uid"),
                );
            }
        }
    }

    fn firecracker(&mut self) {
        let fc = &self.config.firecracker;
        let k = |name| key("firecracker", name);
        self.absolute(k("kernel"), &fc.kernel);
        if let Some(args) = &fc.boot_args {
            if args.trim().is_empty() || args.contains(['\n', '\r', '\0']) {
                self.fail(k("boot_args"), "must be one non-empty line");
            }
        }
        if let Some(jailer) = &fc.jailer_bin {
            self.binary(k("jailer_bin"), jailer);
            for (name, id) in [("uid", fc.uid), ("gid", fc.gid)] {
                if id.is_none() {
                    self.fail(k(name), "required when jailer_bin is set");
                }
            }
        }
        for (name, id) in [("uid", fc.uid), ("gid", fc.gid)] {
            if id == Some(0) {
                self.fail(
                    k(name),
                    "must not be 0 (root): the jailer drops privileges to it",
                );
            }
        }
        self.absolute(k("chroot_base_dir"), &fc.chroot_base_dir);
    }

    fn qemu(&mut self) {
        let q = &self.config.qemu;
        self.binary(key("qemu", "binary"), &q.binary);
        self.absolute_opt(key("qemu", "kernel"), q.kernel.as_deref());
    }

    fn network(&mut self) {
        let n = &self.config.network;
        let k = |name| key("network", name);
        self.iface(k("bridge_name"), &n.bridge_name);
        if let Some(iface) = &n.host_iface {
            self.iface(k("host_iface"), iface);
        }
        let subnet = n.subnet;
        if subnet.prefix() > 30 {
            self.fail(
                k("subnet"),
                format!("{subnet} is too small: a prefix of at most /30 is needed"),
            );
        } else {
            // The bridge takes the first host address.
            let room = subnet.host_count().saturating_sub(1);
            let wanted = u64::from(self.config.agent.max_sandboxes);
            if room < wanted {
                self.fail(
                    k("subnet"),
                    format!(
                        "{subnet} has room for {room} sandboxes, fewer than [agent] \
                         max_sandboxes ({wanted})"
                    ),
                );
            }
        }
        if let Some(rate) = n.default_rate_limit_mbps {
            self.at_least(k("default_rate_limit_mbps"), rate, 1);
        }
        let prefix_ok = !n.netns_prefix.is_empty()
            && n.netns_prefix.len() <= 32
            && n.netns_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !prefix_ok {
            self.fail(
                k("netns_prefix"),
                format!("{:?} must be 1 to 32 of [a-z0-9-]", n.netns_prefix),
            );
        }
        if let Some(netns) = &n.host_netns {
            let named = !netns.is_empty()
                && netns.len() <= 255
                && netns != "."
                && netns != ".."
                && netns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !named && !Path::new(netns).is_absolute() {
                self.fail(
                    k("host_netns"),
                    format!(
                        "{netns:?} is neither a namespace name ([A-Za-z0-9._-]) nor an \
                         absolute path"
                    ),
                );
            } else if named && netns.starts_with(&n.netns_prefix) {
                // The agent removes every namespace with that prefix at start as a
                // sandbox namespace of a previous run: its own would go with them.
                self.fail(
                    k("host_netns"),
                    format!(
                        "{netns:?} starts with netns_prefix {:?}: the agent would take it \
                         for a sandbox namespace and remove it",
                        n.netns_prefix
                    ),
                );
            }
        }
    }

    fn oci(&mut self) {
        let o = &self.config.oci;
        let k = |name| key("oci", name);
        self.absolute(k("cache_dir"), &o.cache_dir);
        self.absolute(k("init_binary"), &o.init_binary);
        self.absolute_opt(k("docker_config"), o.docker_config.as_deref());
        for (i, registry) in o.plain_http_registries.iter().enumerate() {
            self.host_port(k("plain_http_registries").index(i), registry, false);
        }
        self.at_least(k("max_parallel"), o.max_parallel.into(), 1);
    }

    fn pool(&mut self) {
        let p = &self.config.pool;
        self.at_least(
            key("pool", "replenish_interval_sec"),
            p.replenish_interval_sec,
            1,
        );
        self.at_least(key("pool", "max_idle_sec"), p.max_idle_sec, 1);
        let mut seen = BTreeMap::new();
        let mut total: u64 = 0;
        for (i, t) in p.templates.iter().enumerate() {
            let item = KeyPath::keys(["pool", "templates"]).index(i);
            if let Some(first) = seen.insert(t.name.clone(), i) {
                self.fail(
                    item.key("name"),
                    format!(
                        "template {:?} is already pooled by [pool.templates][{first}]",
                        t.name.as_str()
                    ),
                );
            }
            self.at_least(item.key("max_ready"), t.max_ready.into(), 1);
            if t.min_ready > t.max_ready {
                self.fail(
                    item.key("min_ready"),
                    format!(
                        "must be at most max_ready ({} > {})",
                        t.min_ready, t.max_ready
                    ),
                );
            }
            total += u64::from(t.max_ready);
            let default = nanobox_core::Resources::DEFAULT;
            let vcpus = t.vcpus.unwrap_or(default.vcpu());
            let memory = t.memory_mb.unwrap_or(default.memory_mb());
            if let Err(e) = nanobox_core::Resources::new(vcpus, 64, None) {
                self.fail(item.key("vcpus"), reason(&e));
            }
            if let Err(e) = nanobox_core::Resources::new(1, memory, None) {
                self.fail(item.key("memory_mb"), reason(&e));
            }
            if let Some(cap) = self.config.agent.capacity_vcpus {
                if vcpus > cap {
                    self.fail(
                        item.key("vcpus"),
                        format!("must be at most [agent] capacity_vcpus ({vcpus} > {cap})"),
                    );
                }
            }
        }
        let max = u64::from(self.config.agent.max_sandboxes);
        if total > max {
            self.fail(
                KeyPath::keys(["pool", "templates"]),
                format!(
                    "the pools' max_ready add up to {total}, more than [agent] max_sandboxes \
                     ({max})"
                ),
            );
        }
    }

    fn services(&mut self) {
        let c = self.config;
        if c.database.url.expose().trim().is_empty() {
            self.fail(key("database", "url"), "must not be empty");
        }
        if let Err(message) = check_location(&c.object_store.location) {
            self.fail(key("object_store", "location"), message);
        }
        let s = &c.scheduler;
        self.at_least(
            key("scheduler", "heartbeat_interval_ms"),
            s.heartbeat_interval_ms,
            100,
        );
        let lost_ms = s.node_lost_after_sec.saturating_mul(1000);
        if lost_ms < s.heartbeat_interval_ms.saturating_mul(3) {
            self.fail(
                key("scheduler", "node_lost_after_sec"),
                format!(
                    "must be at least three heartbeat intervals ({} s < 3 x {} ms)",
                    s.node_lost_after_sec, s.heartbeat_interval_ms
                ),
            );
        }
        self.absolute(key("builder", "work_dir"), &c.builder.work_dir);
        self.at_least(key("builder", "max_image_mb"), c.builder.max_image_mb, 16);
        if let Some(addr) = &c.builder.advertise_addr {
            self.host_port(key("builder", "advertise_addr"), addr, true);
        }
        if let Some(addr) = &c.snapshot_store.advertise_addr {
            self.host_port(key("snapshot_store", "advertise_addr"), addr, true);
        }
    }

    fn auth(&mut self) {
        let a = &self.config.auth;
        if let Some(token) = &a.service_token {
            self.secret(key("auth", "service_token"), token);
        }
        if a.service_token.is_some() && a.service_token_file.is_some() {
            self.fail(
                key("auth", "service_token_file"),
                "set service_token or service_token_file, not both",
            );
        }
        self.absolute_opt(
            key("auth", "service_token_file"),
            a.service_token_file.as_deref(),
        );
    }

    fn telemetry(&mut self) {
        let t = &self.config.telemetry;
        if t.default_filter.trim().is_empty() {
            self.fail(key("telemetry", "default_filter"), "must not be empty");
        }
        if let Some(endpoint) = &t.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                self.fail(
                    key("telemetry", "otlp_endpoint"),
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                );
            }
        }
    }

    /// Services may all run on one machine: no two may listen on the same port (the
    /// metrics listeners that are set included).
    fn addresses_distinct(&mut self) {
        let c = self.config;
        let metrics = [
            (key("api", "metrics_addr"), c.api.metrics_addr),
            (key("scheduler", "metrics_addr"), c.scheduler.metrics_addr),
            (key("builder", "metrics_addr"), c.builder.metrics_addr),
            (key("agent", "metrics_addr"), c.agent.metrics_addr),
            (
                key("snapshot_store", "metrics_addr"),
                c.snapshot_store.metrics_addr,
            ),
        ];
        let listeners: Vec<(KeyPath, SocketAddr)> = [
            (key("api", "listen_addr"), c.api.listen_addr),
            (key("api", "grpc_addr"), c.api.grpc_addr),
            (key("agent", "listen_addr"), c.agent.listen_addr),
            (key("builder", "listen_addr"), c.builder.listen_addr),
            (
                key("snapshot_store", "listen_addr"),
                c.snapshot_store.listen_addr,
            ),
        ]
        .into_iter()
        .chain(
            metrics
                .into_iter()
                .filter_map(|(k, addr)| addr.map(|a| (k, a))),
        )
        .collect();
        for (i, (k, a)) in listeners.iter().enumerate() {
            if a.port() == 0 {
                continue;
            }
            let clash = listeners[..i].iter().find(|(_, b)| {
                b.port() == a.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            });
            if let Some((other, b)) = clash {
                self.fail(k.clone(), format!("{a} clashes with {other} ({b})"));
            }
        }
    }
}

fn reason(e: &nanobox_core::CoreError) -> String {
    match e {
        nanobox_core::CoreError::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Why a secret (API key, service token) is unusable, if it is.
pub(crate) fn secret_problem(secret: &str) -> Option<String> {
    if secret.chars().count() < MIN_SECRET_LEN {
        Some(format!("must be at least {MIN_SECRET_LEN} characters"))
    } else if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain spaces or control characters".to_owned())
    } else {
        None
    }
}

/// `host:port` with a DNS name or an IP address (IPv6 in brackets) and a port 1-65535.
fn is_host_port(text: &str) -> bool {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return addr.port() != 0;
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    port_ok && host_ok
}

fn is_node_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            first.is_ascii_alphanumeric()
                && rest.len() <= 62
                && rest
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => false,
    }
}

fn is_relative_cgroup(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

fn is_user(user: &str) -> bool {
    if user.parse::<u32>().is_ok() {
        return true;
    }
    let bytes = user.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            (first.is_ascii_lowercase() || *first == b'_')
                && rest.len() < 32
                && rest.iter().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-')
                })
        }
        None => false,
    }
}

/// The shape of an object store location, as `nanobox_store::open_object_store` accepts
/// it (checked here without opening anything).
fn check_location(location: &str) -> Result<(), String> {
    if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = bucket.trim_end_matches('/');
        if bucket.is_empty() || bucket.contains('/') {
            return Err(format!("{location:?}: expected s3://<bucket>[?options]"));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "endpoint" | "region" => {}
                "path_style" => {
                    if !matches!(value, "true" | "1" | "" | "false" | "0") {
                        return Err(format!(
                            "{location:?}: path_style={value:?}, expected true or false"
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "{location:?}: unknown s3 option {other:?} (known: endpoint, region, \
                         path_style)"
                    ))
                }
            }
        }
        return Ok(());
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{location:?}: expected file:///absolute/path, an absolute path, or \
             s3://bucket?endpoint=...&region=...&path_style=true"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        for good in [
            "10.0.0.7:50071",
            "[::1]:50071",
            "scheduler:50051",
            "node-1.example.com:1",
        ] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "10.0.0.7",
            "scheduler",
            ":50051",
            "host:0",
            "host:65536",
            "-x:1",
            "a b:1",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn locations() {
        assert!(check_location("file:///var/lib/nanobox/objects").is_ok());
        assert!(check_location("/var/lib/nanobox/objects").is_ok());
        assert!(check_location("s3://bucket?endpoint=http://h:1&region=x&path_style=true").is_ok());
        assert!(check_location("relative").is_err());
        assert!(check_location("s3://").is_err());
        assert!(check_location("s3://b?colour=red").is_err());
        assert!(check_location("s3://b?path_style=maybe").is_err());
    }

    #[test]
    fn names() {
        assert!(is_node_id("node-01"));
        assert!(!is_node_id("-node"));
        assert!(!is_node_id(""));
        assert!(is_relative_cgroup("nanobox/vms"));
        assert!(!is_relative_cgroup("/nanobox"));
        assert!(!is_relative_cgroup("a/../b"));
        assert!(is_user("nanobox"));
        assert!(is_user("1000"));
        assert!(!is_user("Root"));
        assert!(secret_problem("short").is_some());
        assert!(secret_problem("0123456789abcdef").is_none());
        assert!(secret_problem("0123456789 abcdef").is_some());
    }
}
