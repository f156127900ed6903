//! Environment overrides: `NANOBOX__<SECTION>__<KEY>=value` sets `[section] key`, over the
//! file. Names are matched without regard to case; the value is read as the key's TOML type
//! (a string, an integer, a boolean `true`/`false`, or a comma-separated list of strings),
//! then checked like a value from the file. `[[pool.templates]]` cannot be set this way.

/// The prefix of override variables.
pub const ENV_PREFIX: &str = "NANOBOX__";

/// The TOML type a key takes, which decides how an override's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Int,
    Bool,
    List,
}

impl Kind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Bool => "true or false",
            Kind::List => "a comma-separated list",
        }
    }
}

use Kind::{Bool, Int, List, Str};

/// Every key an environment variable may set, with its kind. A test checks this against
/// the configuration's fields (via the example file), both ways.
pub(crate) const KEYS: &[(&str, &str, Kind)] = &[
    ("api", "listen_addr", Str),
    ("api", "grpc_addr", Str),
    ("api", "api_keys", List),
    ("api", "api_keys_file", Str),
    ("api", "max_body_bytes", Int),
    ("api", "request_timeout_sec", Int),
    ("api", "metrics_addr", Str),
    ("agent", "node_id", Str),
    ("agent", "firecracker_bin", Str),
    ("agent", "rootfs_dir", Str),
    ("agent", "snapshot_dir", Str),
    ("agent", "listen_addr", Str),
    ("agent", "advertise_addr", Str),
    ("agent", "scheduler_addr", Str),
    ("agent", "state_dir", Str),
    ("agent", "vmm", Str),
    ("agent", "template_cache_dir", Str),
    ("agent", "template_cache_bytes", Int),
    ("agent", "cow", Str),
    ("agent", "default_timeout_sec", Int),
    ("agent", "max_timeout_sec", Int),
    ("agent", "capacity_vcpus", Int),
    ("agent", "capacity_memory_mb", Int),
    ("agent", "max_sandboxes", Int),
    ("agent", "disk_headroom_mb", Int),
    ("agent", "cgroup_parent", Str),
    ("agent", "run_as_user", Str),
    ("agent", "metrics_addr", Str),
    ("firecracker", "kernel", Str),
    ("firecracker", "boot_args", Str),
    ("firecracker", "jailer_bin", Str),
    ("firecracker", "chroot_base_dir", Str),
    ("firecracker", "uid", Int),
    ("firecracker", "gid", Int),
    ("qemu", "binary", Str),
    ("qemu", "accel", Str),
    ("qemu", "kernel", Str),
    ("qemu", "seccomp_sandbox", Bool),
    ("network", "bridge_name", Str),
    ("network", "subnet", Str),
    ("network", "host_iface", Str),
    ("network", "dns_server", Str),
    ("network", "internal_services", List),
    ("network", "default_rate_limit_mbps", Int),
    ("network", "host_netns", Str),
    ("network", "netns_prefix", Str),
    ("oci", "cache_dir", Str),
    ("oci", "init_binary", Str),
    ("oci", "dns_server", Str),
    ("oci", "plain_http_registries", List),
    ("oci", "docker_config", Str),
    ("oci", "max_parallel", Int),
    ("pool", "replenish_interval_sec", Int),
    ("pool", "max_idle_sec", Int),
    ("pool", "max_parallel_boots", Int),
    ("database", "url", Str),
    ("object_store", "location", Str),
    ("scheduler", "heartbeat_interval_ms", Int),
    ("scheduler", "node_lost_after_sec", Int),
    ("scheduler", "metrics_addr", Str),
    ("builder", "listen_addr", Str),
    ("builder", "advertise_addr", Str),
    ("builder", "work_dir", Str),
    ("builder", "rootfs_headroom_mb", Int),
    ("builder", "max_image_mb", Int),
    ("builder", "metrics_addr", Str),
    ("snapshot_store", "listen_addr", Str),
    ("snapshot_store", "advertise_addr", Str),
    ("snapshot_store", "metrics_addr", Str),
    ("auth", "service_token", Str),
    ("auth", "service_token_file", Str),
    ("telemetry", "log_format", Str),
    ("telemetry", "default_filter", Str),
    ("telemetry", "otlp_endpoint", Str),
];

/// An override's value, read as its key's kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EnvValue {
    Str(String),
    Int(String),
    Bool(bool),
    List(Vec<String>),
}

/// One override: the variable, the key it sets and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Override {
    pub(crate) var: String,
    pub(crate) section: &'static str,
    pub(crate) key: &'static str,
    pub(crate) value: EnvValue,
}

/// The overrides among `vars` (other variables are ignored), sorted by variable name.
/// A `NANOBOX__` variable that names no key, or whose value is not of the key's kind, is an
/// error naming the variable.
pub(crate) fn overrides(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<Override>, crate::ConfigError> {
    let mut found = Vec::new();
    for (var, text) in vars {
        if !var.to_ascii_uppercase().starts_with(ENV_PREFIX) {
            continue;
        }
        found.push(parse_override(&var, &text)?);
    }
    found.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(found)
}

fn parse_override(var: &str, text: &str) -> Result<Override, crate::ConfigError> {
    let err = |message: String| crate::ConfigError::Env {
        var: var.to_owned(),
        message,
    };
    let name = var[ENV_PREFIX.len()..].to_ascii_lowercase();
    let Some((section, key)) = name.split_once("__") else {
        return Err(err(format!(
            "expected {ENV_PREFIX}<SECTION>__<KEY>, such as NANOBOX__AGENT__LISTEN_ADDR"
        )));
    };
    let Some(&(section, key, kind)) = KEYS.iter().find(|(s, k, _)| *s == section && *k == key)
    else {
        return Err(err(unknown(section, key)));
    };
    let value = match kind {
        Str => EnvValue::Str(text.to_owned()),
        Int => {
            let trimmed = text.trim();
            if trimmed.parse::<i64>().is_err() {
                return Err(err(format!(
                    "[{section}].{key} takes {}, not {text:?}",
                    kind.describe()
                )));
            }
            EnvValue::Int(trimmed.to_owned())
        }
        Bool => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => EnvValue::Bool(true),
            "false" | "0" | "no" | "off" => EnvValue::Bool(false),
            _ => {
                return Err(err(format!(
                    "[{section}].{key} takes {}, not {text:?}",
                    kind.describe()
                )))
            }
        },
        List => EnvValue::List(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
    };
    Ok(Override {
        var: var.to_owned(),
        section,
        key,
        value,
    })
}

/// Why `section`/`key` is not a key an override can set.
fn unknown(section: &str, key: &str) -> String {
    let sections: Vec<&str> = {
        let mut s: Vec<&str> = KEYS.iter().map(|(s, _, _)| *s).collect();
        s.dedup();
        s
    };
    if !sections.contains(&section) {
        let hint = match crate::source::closest(section, sections.iter().copied()) {
            Some(s) => format!("did you mean [{s}]?"),
            None => format!("sections: {}", sections.join(", ")),
        };
        return format!("unknown section [{section}]; {hint}");
    }
    if section == "pool" && key == "templates" {
        return "[[pool.templates]] cannot be set from the environment".to_owned();
    }
    let keys = KEYS
        .iter()
        .filter(|(s, _, _)| *s == section)
        .map(|(_, k, _)| *k);
    let hint = match crate::source::closest(key, keys.clone()) {
        Some(k) => format!("did you mean `{k}`?"),
        None => format!(
            "keys that can be set: {}",
            keys.collect::<Vec<_>>().join(", ")
        ),
    };
    format!("unknown key `{key}` in [{section}]; {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(var: &str, value: &str) -> Result<Override, crate::ConfigError> {
        parse_override(var, value)
    }

    #[test]
    fn values_take_the_kind_of_their_key() {
        let o = one("NANOBOX__AGENT__LISTEN_ADDR", "0.0.0.0:9000").unwrap();
        assert_eq!((o.section, o.key), ("agent", "listen_addr"));
        assert_eq!(o.value, EnvValue::Str("0.0.0.0:9000".into()));
        let o = one("nanobox__agent__max_sandboxes", " 12 ").unwrap();
        assert_eq!(o.value, EnvValue::Int("12".into()));
        let o = one("NANOBOX__QEMU__SECCOMP_SANDBOX", "off").unwrap();
        assert_eq!(o.value, EnvValue::Bool(false));
        let o = one("NANOBOX__API__API_KEYS", "a, b,,c").unwrap();
        assert_eq!(
            o.value,
            EnvValue::List(vec!["a".into(), "b".into(), "c".into()])
        );
    }

    #[test]
    fn bad_overrides_name_the_variable() {
        let e = one("NANOBOX__AGENT__MAX_SANDBOXES", "lots")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "NANOBOX__AGENT__MAX_SANDBOXES: [agent].max_sandboxes takes an integer, not \"lots\""
        );
        let e = one("NANOBOX__AGENT__LISTEN_ADR", "x")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "NANOBOX__AGENT__LISTEN_ADR: unknown key `listen_adr` in [agent]; did you mean \
             `listen_addr`?"
        );
        let e = one("NANOBOX__AGNET__LISTEN_ADDR", "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown section [agnet]; did you mean [agent]?"),
            "{e}"
        );
        let e = one("NANOBOX__AGENT", "x").unwrap_err().to_string();
        assert!(e.starts_with("NANOBOX__AGENT: expected"), "{e}");
        let e = one("NANOBOX__QEMU__SECCOMP_SANDBOX", "maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes true or false"), "{e}");
        let e = one("NANOBOX__POOL__TEMPLATES", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be set from the environment"), "{e}");
    }

    #[test]
    fn other_variables_are_ignored() {
        let found = overrides([
            ("NANOBOX_CONFIG".to_owned(), "/x".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
            ("NANOBOX__POOL__MAX_IDLE_SEC".to_owned(), "5".to_owned()),
        ])
        .unwrap();
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn keys_are_unique() {
        for (i, (s, k, _)) in KEYS.iter().enumerate() {
            assert!(
                !KEYS[i + 1..].iter().any(|(s2, k2, _)| s == s2 && k == k2),
                "[{s}].{k} listed twice"
            );
        }
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;
    use crate::Config;

    /// The example with its commented-out alternatives (`#key = value`) switched on: every
    /// key there is.
    fn every_key() -> toml::Table {
        let text: String = include_str!("../nanobox.example.toml")
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| is_key(k)) => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let config = Config::parse(&text, std::path::Path::new("example"), [])
            .expect("the example with every key parses");
        toml::Table::try_from(&config).expect("serialises")
    }

    fn is_key(text: &str) -> bool {
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    }

    fn kind_of(value: &toml::Value) -> Kind {
        match value {
            toml::Value::String(_) => Kind::Str,
            toml::Value::Integer(_) => Kind::Int,
            toml::Value::Boolean(_) => Kind::Bool,
            toml::Value::Array(_) => Kind::List,
            other => panic!("no override kind for {other:?}"),
        }
    }

    #[test]
    fn every_key_of_the_example_can_be_overridden_with_its_kind() {
        let table = every_key();
        let mut seen = Vec::new();
        for (section, keys) in &table {
            let keys = keys.as_table().expect("sections are tables");
            for (key, value) in keys {
                if section == "pool" && key == "templates" {
                    continue;
                }
                let entry = KEYS
                    .iter()
                    .find(|(s, k, _)| s == section && k == key)
                    .unwrap_or_else(|| panic!("[{section}].{key} missing from env::KEYS"));
                assert_eq!(entry.2, kind_of(value), "kind of [{section}].{key}");
                seen.push((section.clone(), key.clone()));
            }
        }
        for (s, k, _) in KEYS {
            assert!(
                seen.iter().any(|(s2, k2)| s2 == s && k2 == k),
                "[{s}].{k} is in env::KEYS but not in nanobox.example.toml"
            );
        }
    }

    #[test]
    fn the_example_shows_every_key_the_defaults_have() {
        let example = every_key();
        let defaults = toml::Table::try_from(Config::default()).expect("serialises");
        for (section, keys) in &defaults {
            for key in keys.as_table().expect("table").keys() {
                assert!(
                    example
                        .get(section)
                        .and_then(|s| s.as_table())
                        .is_some_and(|s| s.contains_key(key)),
                    "[{section}].{key} is not in nanobox.example.toml"
                );
            }
        }
    }
}
