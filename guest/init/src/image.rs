//! The image's runtime configuration, written into the rootfs by the template builder.
//!
//! `/etc/nanobox/image.json` holds the OCI config fields the guest needs (Env, WorkingDir,
//! User, Entrypoint, Cmd). Every exec starts from this environment, as `docker exec`
//! starts from the image's.

use std::path::Path;

/// Where the template builder writes the image config inside the rootfs.
pub const IMAGE_CONFIG_PATH: &str = "/etc/nanobox/image.json";

/// Limit on the config file: it comes from an untrusted image.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// PATH for images that do not set one (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub use nanobox_core::ImageConfig;

/// Loads the image config; a missing file is an empty config, a bad one is reported.
pub fn load(path: &Path) -> Result<ImageConfig, String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ImageConfig::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The image's environment as ordered pairs, with PATH defaulted.
pub fn env_pairs(config: &ImageConfig) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for entry in &config.env {
        if let Some((k, v)) = entry.split_once('=') {
            merge(&mut pairs, k, v);
        }
    }
    if !pairs.iter().any(|(k, _)| k == "PATH") {
        pairs.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
    }
    pairs
}

/// Sets `key` in `pairs`, replacing an existing entry in place.
pub fn merge(pairs: &mut Vec<(String, String)>, key: &str, value: &str) {
    match pairs.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_owned(),
        None => pairs.push((key.to_owned(), value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.json");
        std::fs::write(
            &path,
            r#"{"env":["A=1","B=x=y","A=2"],"working_dir":"/app","cmd":["node"]}"#,
        )
        .expect("write");
        let cfg = load(&path).expect("load");
        assert_eq!(cfg.working_dir, "/app");
        let env = env_pairs(&cfg);
        assert_eq!(env[0], ("PATH".into(), DEFAULT_PATH.into()));
        assert!(env.contains(&("A".into(), "2".into())));
        assert!(env.contains(&("B".into(), "x=y".into())));
    }

    #[test]
    fn missing_file_is_empty_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            load(&dir.path().join("none")).expect("missing is ok"),
            ImageConfig::default()
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").expect("write");
        assert!(load(&bad).is_err());
    }
}
