//! `nanobox template build`: the warm-up pipeline on one machine, without any service.
//!
//! Reads an image, applies its layers in order into a private staging directory, injects
//! the guest init and the image config, and writes an auto-sized ext4 image plus the
//! config beside it as `<out>.config.json`. Useful for debugging images and for CI systems
//! that pre-build templates.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nanobox_oci::registry::{DockerConfig, Reference, RegistryClient, RegistryOptions};
use nanobox_oci::{
    convert, import_docker_archive, ConvertOptions, Ext4Options, OciLayout, Platform, ResolvedImage,
};

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The image: a registry reference (`node:22-alpine` means
    /// `docker.io/library/node:22-alpine`), `oci-layout:<dir>[:<tag>]` (a layout on disk)
    /// or `docker-archive:<file.tar>[:<repo:tag>]` (what `docker save` writes; the tag picks
    /// one image of several, and the image is imported into the shared blob cache).
    image: String,
    /// Where to write the ext4 image.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// The guest init to inject as /sbin/nanobox-init. Default: $NANOBOX_INIT, else the
    /// copy kept by `cargo xtask setup`.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Free space to leave in the image beyond its contents, in MiB.
    #[arg(long, default_value_t = 64)]
    headroom_mb: u64,
    /// Allow plain HTTP to the image's registry; only for loopback addresses.
    #[arg(long)]
    plain_http: bool,
}

/// Where an image comes from.
#[derive(Debug, PartialEq, Eq)]
enum ImageSource {
    OciLayout { dir: PathBuf, tag: Option<String> },
    DockerArchive { file: PathBuf, name: Option<String> },
    Registry(String),
}

fn parse_source(reference: &str) -> anyhow::Result<ImageSource> {
    if let Some(rest) = reference.strip_prefix("oci-layout:") {
        // The tag follows the last ':' after the last '/', so directories may contain ':'.
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.contains('/') && !tag.is_empty() => {
                (dir, Some(tag.to_owned()))
            }
            _ => (rest, None),
        };
        anyhow::ensure!(!dir.is_empty(), "oci-layout: needs a directory");
        return Ok(ImageSource::OciLayout {
            dir: PathBuf::from(dir),
            tag,
        });
    }
    if let Some(rest) = reference.strip_prefix("docker-archive:") {
        let (file, name) = split_archive_reference(rest);
        anyhow::ensure!(!file.is_empty(), "docker-archive: needs a file");
        anyhow::ensure!(
            name != Some(""),
            "{reference:?}: the image name after the archive file is empty"
        );
        return Ok(ImageSource::DockerArchive {
            file: PathBuf::from(file),
            name: name.map(str::to_owned),
        });
    }
    Ok(ImageSource::Registry(reference.to_owned()))
}

/// Splits `<file>[:<repo:tag>]`. The file's path may contain ':' and the name always
/// does, so the file system decides: the whole text if it is a file, else the first ':'
/// that ends a path to an existing file, else the first ':' after `.tar` (so that a
/// missing archive is reported as a missing file, not as an unknown image).
fn split_archive_reference(rest: &str) -> (&str, Option<&str>) {
    if Path::new(rest).is_file() {
        return (rest, None);
    }
    for (at, _) in rest.match_indices(':') {
        if Path::new(&rest[..at]).is_file() {
            return (&rest[..at], Some(&rest[at + 1..]));
        }
    }
    match rest.find(".tar:") {
        Some(at) => (&rest[..at + 4], Some(&rest[at + 5..])),
        None => (rest, None),
    }
}

pub async fn run(args: BuildArgs) -> i32 {
    match build(args).await {
        Ok(()) => 0,
        Err(e) => {
            // One line: the reason, with its causes.
            eprintln!("nanobox: {e:#}");
            1
        }
    }
}

async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let source = parse_source(&args.image)?;
    let init = args.init.clone().unwrap_or_else(crate::paths::default_init);
    anyhow::ensure!(
        init.is_file(),
        "guest init {} not found (give --init, set NANOBOX_INIT, or run `cargo xtask setup`)",
        init.display()
    );
    let (layout, resolved) = match source {
        ImageSource::OciLayout { dir, tag } => {
            let layout =
                OciLayout::open(&dir).with_context(|| format!("reading {}", dir.display()))?;
            let resolved = layout
                .resolve(tag.as_deref(), &Platform::linux_amd64())
                .context("resolving the image")?;
            (layout, resolved)
        }
        ImageSource::DockerArchive { file, name } => {
            // The same cache as registry pulls: layers shared with pulled images are
            // stored once, and the import is listed in its index like a pull.
            let cache = crate::paths::cache_dir().join("oci");
            // The import's errors name the archive (and the entry) themselves.
            tokio::task::spawn_blocking(move || {
                import_docker_archive(&file, &cache, name.as_deref()).map_err(anyhow::Error::from)
            })
            .await
            .context("the import task failed")??
        }
        ImageSource::Registry(reference) => pull(&reference, args.plain_http).await?,
    };

    let config = resolved.config.clone();
    let digest = resolved.descriptor.digest.clone();
    // The same conversion the template-builder service runs: layers applied into a
    // private staging tree beside the output, init and config injected, mkfs.
    let options = ConvertOptions {
        ext4: Ext4Options {
            headroom_bytes: args.headroom_mb << 20,
            ..Ext4Options::default()
        },
        ..ConvertOptions::default()
    };
    let image = convert(
        layout,
        resolved,
        init,
        args.output.clone(),
        options,
        std::sync::Arc::new(|_| {}),
    )
    .await
    .context("converting the image")?;

    let config_path = PathBuf::from(format!("{}.config.json", args.output.display()));
    let config = serde_json::to_vec_pretty(&config).context("encoding the image config")?;
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    eprintln!(
        "built {} ({} MiB, image {})",
        image.path.display(),
        image.size_bytes >> 20,
        digest
    );
    Ok(())
}

/// Pulls `reference` into the shared blob cache (layers already there are not fetched
/// again) with credentials from ~/.docker/config.json when it exists.
async fn pull(reference: &str, plain_http: bool) -> anyhow::Result<(OciLayout, ResolvedImage)> {
    let parsed = Reference::parse(reference).context("parsing the image reference")?;
    let mut options = RegistryOptions::default();
    if plain_http {
        options.plain_http.push(parsed.registry().to_owned());
    }
    if let Some(home) = std::env::var_os("HOME") {
        let path = PathBuf::from(home).join(".docker/config.json");
        if path.is_file() {
            options.docker_config = Some(
                DockerConfig::load(&path).with_context(|| format!("reading {}", path.display()))?,
            );
        }
    }
    let cache = crate::paths::cache_dir().join("oci");
    let client = RegistryClient::new(&cache, options).context("setting up the registry client")?;
    let pulled = client.pull(&parsed).await.with_context(|| {
        if !plain_http && nanobox_oci::registry::is_loopback(parsed.registry()) {
            format!(
                "pulling {reference} (a plain-HTTP registry on this machine needs --plain-http)"
            )
        } else {
            format!("pulling {reference}")
        }
    })?;
    Ok((pulled.layout, pulled.image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_oci_layout_references() {
        assert_eq!(
            parse_source("oci-layout:/img").expect("ok"),
            ImageSource::OciLayout {
                dir: "/img".into(),
                tag: None
            }
        );
        assert_eq!(
            parse_source("oci-layout:/img:v1").expect("ok"),
            ImageSource::OciLayout {
                dir: "/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            parse_source("oci-layout:/a:b/img").expect("ok"),
            ImageSource::OciLayout {
                dir: "/a:b/img".into(),
                tag: None
            }
        );
        assert!(parse_source("oci-layout:").is_err());
        assert_eq!(
            parse_source("node:22").expect("ok"),
            ImageSource::Registry("node:22".into())
        );
    }

    #[test]
    fn parses_docker_archive_references() {
        let archive = |file: &str, name: Option<&str>| ImageSource::DockerArchive {
            file: file.into(),
            name: name.map(str::to_owned),
        };
        // Files that do not exist: split after `.tar`.
        assert_eq!(
            parse_source("docker-archive:/nonexistent/x.tar").expect("ok"),
            archive("/nonexistent/x.tar", None)
        );
        assert_eq!(
            parse_source("docker-archive:/nonexistent/x.tar:demo/app:v1").expect("ok"),
            archive("/nonexistent/x.tar", Some("demo/app:v1"))
        );
        assert!(parse_source("docker-archive:").is_err());
        assert!(parse_source("docker-archive:/nonexistent/x.tar:").is_err());

        // Existing files decide, ':' in their paths included.
        let dir = tempfile::tempdir().expect("tempdir");
        let colons = dir.path().join("a:b");
        std::fs::create_dir(&colons).expect("mkdir");
        let saved = colons.join("saved:image");
        std::fs::write(&saved, b"").expect("write");
        let saved = saved.to_str().expect("utf-8");
        assert_eq!(
            parse_source(&format!("docker-archive:{saved}")).expect("ok"),
            archive(saved, None)
        );
        assert_eq!(
            parse_source(&format!("docker-archive:{saved}:busybox:latest")).expect("ok"),
            archive(saved, Some("busybox:latest"))
        );
    }
}
