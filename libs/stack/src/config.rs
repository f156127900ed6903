//! The one `nanobox.toml` every service of the stack reads (each takes its own sections,
//! as on a real cluster), written to `<data>/nanobox.toml` so that an operator can read
//! what runs, or start a service by hand with the same file. It is checked with the
//! services' own validation before anything starts.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::StackError;

/// Everything the file is made from.
#[derive(Debug, Clone)]
pub(crate) struct StackConfig<'a> {
    pub api_port: u16,
    pub grpc_port: u16,
    pub templates_port: u16,
    pub agent_port: u16,
    /// Prometheus listeners: gateway, scheduler, template-builder, node agent.
    pub metrics_ports: Option<[u16; 4]>,
    pub node_id: &'a str,
    pub data_dir: &'a Path,
    pub database_url: &'a str,
    pub api_keys_file: &'a Path,
    pub service_token_file: &'a Path,
    pub kernel: &'a Path,
    pub init: &'a Path,
    pub host_netns: &'a str,
    pub netns_prefix: &'a str,
    pub host_iface: &'a str,
    pub dns_server: Option<Ipv4Addr>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub max_sandboxes: Option<u32>,
    pub vmm_user: Option<&'a str>,
    pub plain_http_registries: &'a [String],
    pub pools: &'a [(String, u32)],
    pub otlp_endpoint: Option<&'a str>,
}

/// A TOML basic string: Rust's debug quoting escapes what TOML needs escaped in the
/// paths, names and addresses written here.
fn q(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

fn p(path: &Path) -> String {
    q(path.display().to_string())
}

impl StackConfig<'_> {
    /// The file's text.
    pub(crate) fn render(&self) -> String {
        let loopback = |port: u16| q(format!("127.0.0.1:{port}"));
        let dir = |name: &str| p(&self.data_dir.join(name));
        let metrics = |i: usize| {
            self.metrics_ports
                .map(|ports| format!("metrics_addr = {}\n", loopback(ports[i])))
                .unwrap_or_default()
        };
        let mut s = String::from(
            "# Written by `nanobox up` at every start; edits are overwritten. Each service\n\
             # reads the sections it needs (docs/deployment.md, libs/config/nanobox.example.toml).\n\n",
        );
        let _ = write!(
            s,
            "[api]\nlisten_addr = {api}\ngrpc_addr = {grpc}\napi_keys_file = {keys}\n{m0}\n",
            api = loopback(self.api_port),
            grpc = loopback(self.grpc_port),
            keys = p(self.api_keys_file),
            m0 = metrics(0),
        );
        let _ = write!(
            s,
            "[scheduler]\n{m1}\n[builder]\nlisten_addr = {builder}\nwork_dir = {work}\n{m2}\n",
            m1 = metrics(1),
            builder = loopback(self.templates_port),
            work = dir("builder"),
            m2 = metrics(2),
        );
        let _ = write!(
            s,
            "[agent]\nnode_id = {node}\nlisten_addr = {agent}\nscheduler_addr = {grpc}\n\
             state_dir = {state}\n{m3}",
            node = q(self.node_id),
            agent = loopback(self.agent_port),
            grpc = loopback(self.grpc_port),
            state = dir("agent"),
            m3 = metrics(3),
        );
        if let Some(v) = self.vcpus {
            let _ = writeln!(s, "capacity_vcpus = {v}");
        }
        if let Some(m) = self.memory_mb {
            let _ = writeln!(s, "capacity_memory_mb = {m}");
        }
        if let Some(n) = self.max_sandboxes {
            let _ = writeln!(s, "max_sandboxes = {n}");
        }
        if let Some(user) = self.vmm_user {
            let _ = writeln!(s, "run_as_user = {}", q(user));
        }
        let _ = write!(
            s,
            "\n[firecracker]\nkernel = {kernel}\n\n[qemu]\nkernel = {kernel}\n\n\
             [network]\nhost_netns = {host}\nnetns_prefix = {prefix}\nhost_iface = {iface}\n",
            kernel = p(self.kernel),
            host = q(self.host_netns),
            prefix = q(self.netns_prefix),
            iface = q(self.host_iface),
        );
        if let Some(dns) = self.dns_server {
            let _ = writeln!(s, "dns_server = {}", q(dns.to_string()));
        }
        let registries: Vec<String> = self.plain_http_registries.iter().map(q).collect();
        let _ = write!(
            s,
            "\n[oci]\ninit_binary = {init}\nplain_http_registries = [{regs}]\n\n\
             [database]\nurl = {db}\n\n[object_store]\nlocation = {objects}\n\n\
             [auth]\nservice_token_file = {token}\n",
            init = p(self.init),
            regs = registries.join(", "),
            db = q(self.database_url),
            objects = q(format!(
                "file://{}",
                self.data_dir.join("objects").display()
            )),
            token = p(self.service_token_file),
        );
        if let Some(endpoint) = self.otlp_endpoint {
            let _ = write!(s, "\n[telemetry]\notlp_endpoint = {}\n", q(endpoint));
        }
        if !self.pools.is_empty() {
            s.push_str("\n[pool]\nreplenish_interval_sec = 2\n");
            for (name, size) in self.pools {
                let _ = write!(
                    s,
                    "\n[[pool.templates]]\nname = {}\nmin_ready = {size}\nmax_ready = {size}\n",
                    q(name)
                );
            }
        }
        s
    }

    /// Writes the file to `path` and checks it as the services will.
    pub(crate) fn write(&self, path: &Path) -> Result<PathBuf, StackError> {
        let text = self.render();
        let parsed = nanobox_config::Config::parse(&text, path, std::iter::empty())
            .and_then(|config| config.validate().map(|()| config));
        if let Err(e) = parsed {
            return Err(StackError::Config {
                path: path.to_owned(),
                message: e.to_string(),
            });
        }
        std::fs::write(path, text).map_err(|e| StackError::io("writing", path, e))?;
        Ok(path.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(
        dir: &'a Path,
        pools: &'a [(String, u32)],
        regs: &'a [String],
    ) -> StackConfig<'a> {
        StackConfig {
            api_port: 8080,
            grpc_port: 50051,
            templates_port: 50061,
            agent_port: 50071,
            metrics_ports: None,
            node_id: "local",
            data_dir: dir,
            database_url: "host=/tmp/pg user=postgres dbname=nanobox",
            api_keys_file: Path::new("/etc/nanobox/api-keys"),
            service_token_file: Path::new("/etc/nanobox/service-token"),
            kernel: Path::new("/k/vmlinux"),
            init: Path::new("/k/nanobox-init"),
            host_netns: "nbxup-000001-host",
            netns_prefix: "nbxup-000001-s-",
            host_iface: "wan0",
            dns_server: None,
            vcpus: Some(2),
            memory_mb: Some(4096),
            max_sandboxes: Some(16),
            vmm_user: Some("nobody"),
            plain_http_registries: regs,
            pools,
            otlp_endpoint: Some("http://127.0.0.1:4317"),
        }
    }

    #[test]
    fn the_file_passes_the_services_own_validation() {
        let dir = tempfile::tempdir().unwrap();
        let pools = vec![("demo".to_owned(), 2)];
        let regs = vec!["127.0.0.1:5000".to_owned()];
        let config = sample(dir.path(), &pools, &regs);
        let path = config.write(&dir.path().join("nanobox.toml")).unwrap();
        let loaded = nanobox_config::Config::load(Some(&path)).unwrap();
        assert_eq!(loaded.api.listen_addr.port(), 8080);
        assert_eq!(
            loaded.agent.scheduler_addr.as_deref(),
            Some("127.0.0.1:50051")
        );
        assert_eq!(
            loaded.network.host_netns.as_deref(),
            Some("nbxup-000001-host")
        );
        assert_eq!(loaded.pool.templates.len(), 1);
        assert_eq!(loaded.agent.capacity_vcpus, Some(2));
    }

    #[test]
    fn a_value_the_services_refuse_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let pools = vec![("Not A Name".to_owned(), 1)];
        let config = sample(dir.path(), &pools, &[]);
        let err = config.write(&dir.path().join("nanobox.toml")).unwrap_err();
        assert!(matches!(err, StackError::Config { .. }), "{err}");
        assert!(!dir.path().join("nanobox.toml").exists());
    }
}
