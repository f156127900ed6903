//! `nanobox.toml`: the one configuration file every NanoBox service reads (gateway,
//! scheduler, template-builder, node agent, snapshot-store), each using the sections it
//! needs.
//!
//! The format is the seed project's `nanobox.toml`, extended; `nanobox.example.toml` beside
//! this crate shows every key. [`Config::load`] finds the file (an explicit path, else
//! `$NANOBOX_CONFIG`, else `/etc/nanobox/nanobox.toml` if it exists, else none: all
//! defaults, which run everything on one machine), applies `NANOBOX__<SECTION>__<KEY>`
//! environment overrides and validates the result.
//!
//! Mistakes are reported by key, with where the value came from:
//!
//! ```text
//! /etc/nanobox/nanobox.toml: unknown key `listen_adr` in [agent] (line 12); did you mean `listen_addr`?
//! /etc/nanobox/nanobox.toml: [pool.templates][1].min_ready (line 40): must be at most max_ready (3 > 2)
//! NANOBOX__AGENT__LISTEN_ADDR: [agent].listen_addr: invalid socket address syntax (expected ip:port, ...)
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

mod env;
mod error;
mod keys;
mod schema;
mod source;
mod types;
mod validate;

use std::path::{Path, PathBuf};

pub use env::ENV_PREFIX;
pub use error::{ConfigError, KeyPath, Location, Problem, Segment, UnknownKey};
pub use nanobox_telemetry::{LogFormat, TelemetryConfig};
pub use schema::{
    AgentConfig, ApiConfig, AuthConfig, BuilderConfig, Capacity, Config, DatabaseConfig,
    FirecrackerConfig, NetworkConfig, ObjectStoreConfig, OciConfig, PoolConfig, PoolTemplate,
    QemuConfig, SchedulerConfig, SnapshotStoreConfig,
};
pub use types::{Accel, CowMode, IpCidr, Ipv4Cidr, Secret, Vmm};
pub use validate::MIN_SECRET_LEN;

/// The variable naming the configuration file when no path is given.
pub const CONFIG_ENV: &str = "NANOBOX_CONFIG";

/// The configuration file read when neither a path nor `$NANOBOX_CONFIG` is given, if it
/// exists.
pub const DEFAULT_PATH: &str = "/etc/nanobox/nanobox.toml";

impl Config {
    /// Loads the configuration a service runs with: the file ([`Config::load_from`] says
    /// which), the process environment's `NANOBOX__*` overrides, then
    /// [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            let relevant = name == CONFIG_ENV || name.to_ascii_uppercase().starts_with(ENV_PREFIX);
            match value.into_string() {
                Ok(value) => vars.push((name, value)),
                Err(_) if relevant => {
                    return Err(ConfigError::Env {
                        var: name,
                        message: "the value is not valid UTF-8".to_owned(),
                    })
                }
                Err(_) => {}
            }
        }
        Self::load_from(path, vars)
    }

    /// [`Config::load`] with the environment given as `(name, value)` pairs rather than
    /// read from the process (for tests and tools).
    ///
    /// The file: `path` if given; else `NANOBOX_CONFIG` if set and not empty; else
    /// [`DEFAULT_PATH`] if it exists; else none, and every key takes its default. A file
    /// that is named but cannot be read is an error.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => env
                .iter()
                .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
                .or_else(|| {
                    let default = Path::new(DEFAULT_PATH);
                    default.exists().then(|| default.to_path_buf())
                }),
        };
        let config = match file {
            Some(file) => {
                let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                    path: file.clone(),
                    source,
                })?;
                Self::parse_inner(&text, Some(&file), env)?
            }
            None => Self::parse_inner("", None, env)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses `text` as the file `file` (a name used in messages) with the overrides among
    /// `env` applied; does not validate (call [`Config::validate`], whose errors then name
    /// lines of `text`).
    pub fn parse(
        text: &str,
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::parse_inner(text, Some(file), env)
    }

    fn parse_inner(
        text: &str,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let overrides = env::overrides(env)?;
        source::build(text, file, &overrides)
    }
}
