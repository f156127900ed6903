//! Image references (`[registry/]repository[:tag][@digest]`) with Docker's defaults:
//! `node:22-alpine` is `docker.io/library/node:22-alpine`, and a missing tag is `latest`.
//!
//! The first path component names a registry only when it looks like a host (has a `.`
//! or a `:`, or is `localhost`); otherwise the image is on Docker Hub. Validation is
//! strict (the grammar of the distribution spec) so that a typo is reported here rather
//! than as a confusing 404 from the registry.

use std::fmt;
use std::str::FromStr;

use super::RegistryError;

/// Docker Hub, as references name it.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
const MAX_REPOSITORY: usize = 255;
const MAX_TAG: usize = 128;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses `reference`, applying Docker's defaults.
    pub fn parse(reference: &str) -> Result<Self, RegistryError> {
        let invalid = |reason: String| RegistryError::InvalidReference {
            reference: reference.to_owned(),
            reason,
        };
        if reference.is_empty() {
            return Err(invalid("it is empty".to_owned()));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(invalid)?;
                (rest, Some(digest.to_owned()))
            }
            None => (reference, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(&rest[at + 1..]))
            }
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(invalid)?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                validate_registry(first).map_err(invalid)?;
                let registry = if first == "index.docker.io" {
                    DOCKER_HUB
                } else {
                    first
                };
                (registry.to_owned(), path.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(invalid)?;
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry as named in the reference (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host\[:port\] that serves the registry API (`registry-1.docker.io` for Docker
    /// Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/node`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one (`latest` when it names neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned (it wins
    /// over the tag), else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Only sha256 digests are supported (what every registry produces).
pub(crate) fn validate_digest(digest: &str) -> Result<(), String> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        Some(("sha256", _)) => Err(format!(
            "digest {digest:?} is not sha256 followed by 64 lowercase hex digits"
        )),
        Some((algorithm, _)) => Err(format!(
            "digest algorithm {algorithm:?} is not supported (only sha256)"
        )),
        None => Err(format!("digest {digest:?} has no algorithm (sha256:...)")),
    }
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let valid_first = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let valid = |b: u8| valid_first(b) || b == b'.' || b == b'-';
    if tag.is_empty() {
        return Err("the tag after ':' is empty".to_owned());
    }
    if tag.len() > MAX_TAG {
        return Err(format!("tag is longer than {MAX_TAG} characters"));
    }
    let bytes = tag.as_bytes();
    if !valid_first(bytes[0]) || !bytes.iter().all(|&b| valid(b)) {
        return Err(format!(
            "tag {tag:?} may only contain letters, digits, '_', '.' and '-' and must not \
             start with '.' or '-'"
        ));
    }
    Ok(())
}

fn validate_registry(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: [::1]:5000.
        let Some((addr, port)) = rest.split_once(']') else {
            return Err(format!("registry {host:?} has an unclosed '['"));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {host:?} is not a valid IPv6 address"));
        }
        (None, port.strip_prefix(':').map(Some).unwrap_or(None))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("registry {host:?} has an invalid port {port:?}"));
        }
    }
    if let Some(name) = name {
        let label_ok = |l: &str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !name.split('.').all(label_ok) {
            return Err(format!("registry host {name:?} is not a valid host name"));
        }
    }
    Ok(())
}

fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.len() > MAX_REPOSITORY {
        return Err(format!(
            "repository name is longer than {MAX_REPOSITORY} characters"
        ));
    }
    for component in repository.split('/') {
        if !component_ok(component) {
            return Err(format!(
                "repository component {component:?} must be lowercase letters and digits, \
                 separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn component_ok(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = parse("node:22-alpine");
        assert_eq!(r.to_string(), "docker.io/library/node:22-alpine");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(parse("node").to_string(), "docker.io/library/node:latest");
        assert_eq!(parse("bitnami/redis").repository(), "bitnami/redis");
        assert_eq!(
            parse("index.docker.io/library/node:1").to_string(),
            "docker.io/library/node:1"
        );
        assert_eq!(
            parse("docker.io/node").to_string(),
            "docker.io/library/node:latest"
        );
    }

    #[test]
    fn registry_hosts_are_detected_by_dot_colon_or_localhost() {
        let r = parse("127.0.0.1:5000/app:1.2");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "app", Some("1.2"))
        );
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(parse("localhost/a/b").registry(), "localhost");
        assert_eq!(parse("ghcr.io/o/p").registry(), "ghcr.io");
        assert_eq!(parse("[::1]:5000/x").registry(), "[::1]:5000");
        // No dot, colon or localhost: a Docker Hub user.
        assert_eq!(parse("myuser/app").registry(), "docker.io");
        assert_eq!(parse("localhost:5000/app").tag(), Some("latest"));
    }

    #[test]
    fn digests_pin_and_win_over_tags() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = parse(&format!("127.0.0.1:5000/app@{d}"));
        assert_eq!((r.tag(), r.digest()), (None, Some(d.as_str())));
        assert_eq!(r.manifest_reference(), d);
        let r = parse(&format!("app:1@{d}"));
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.to_string(), format!("docker.io/library/app:1@{d}"));
    }

    #[test]
    fn invalid_references_say_what_is_wrong() {
        for (bad, says) in [
            ("", "empty"),
            ("Node", "lowercase"),
            ("node:", "empty"),
            ("node:-x", "must not start"),
            ("node:a/b", "invalid port"),
            ("a//b", "lowercase"),
            ("a/b/", "lowercase"),
            ("a__-b", "lowercase"),
            ("node@sha256:abc", "64 lowercase hex"),
            ("node@md5:abc", "only sha256"),
            ("node@abc", "no algorithm"),
            ("host.io:99999/x", "invalid port"),
            ("bad_host.io/x", "valid host name"),
            ("[::zz]:5000/x", "IPv6"),
        ] {
            let err = Reference::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
            assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
        }
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(Reference::parse(&long_tag).is_err());
        let long_repo = "a".repeat(256);
        assert!(Reference::parse(&long_repo).is_err());
        assert!(Reference::parse("x/a.b__c-d--e/f_g").is_ok());
    }
}
