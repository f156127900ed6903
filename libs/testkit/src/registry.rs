//! A private OCI registry for tests: Debian's `docker-registry` (CNCF distribution)
//! serving plain HTTP (or HTTPS with a certificate from a private CA) on 127.0.0.1 with
//! filesystem storage in a temporary directory,
//! optionally behind htpasswd basic auth. Dropping the [`Registry`] kills the process and
//! removes its directory. Images are pushed with `skopeo copy` from OCI layout
//! directories ([`Registry::push`]).
//!
//! `docker-registry`, `skopeo` and `htpasswd` (apache2-utils) are installed by
//! `cargo xtask setup`; `NANOBOX_DOCKER_REGISTRY` overrides the registry binary.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the registry may take to answer `GET /v2/`. A hang guard: it is up in a few
/// tens of milliseconds on an idle machine.
pub const REGISTRY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The manifest format `skopeo copy` writes into the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushFormat {
    /// OCI manifests (and indexes), as in the source layout.
    Oci,
    /// Docker schema 2 (`skopeo --format v2s2`).
    DockerV2s2,
}

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:PORT`, as image references name it.
    pub host: String,
    /// The user and password when started with [`Registry::start_with_auth`].
    pub credentials: Option<(String, String)>,
    /// The CA certificate (PEM) that signed the server's, when started with
    /// [`Registry::start_tls`].
    pub certificate: Option<Vec<u8>>,
    /// The token service, when started with [`Registry::start_with_token_auth`].
    token_server: Option<token::TokenServer>,
    child: Child,
    dir: tempfile::TempDir,
}

/// How the registry is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Anonymous,
    Basic,
    Token,
    Tls,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> Self {
        Self::start_inner(None, Mode::Anonymous)
    }

    /// Starts a registry that requires basic auth with `user` and `password`.
    pub fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Some((user.to_owned(), password.to_owned())), Mode::Basic)
    }

    /// Starts a registry that requires bearer tokens, from a token service on 127.0.0.1
    /// that hands them out (signed JWTs the registry verifies) for `user` and `password`.
    pub fn start_with_token_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Some((user.to_owned(), password.to_owned())), Mode::Token)
    }

    /// How many tokens the token service handed out (0 without one).
    pub fn tokens_issued(&self) -> usize {
        self.token_server.as_ref().map_or(0, |t| t.issued())
    }

    /// Starts an anonymous registry serving HTTPS with a fresh certificate for 127.0.0.1
    /// from a fresh CA (in [`Registry::certificate`]; made with the `openssl` CLI).
    pub fn start_tls() -> Self {
        Self::start_inner(None, Mode::Tls)
    }

    fn start_inner(credentials: Option<(String, String)>, mode: Mode) -> Self {
        let mut last_failure = String::new();
        // A port picked free can be taken before the registry binds it: retry.
        for _ in 0..3 {
            match Self::try_start(credentials.clone(), mode) {
                Ok(registry) => return registry,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("docker-registry did not start: {last_failure}");
    }

    fn try_start(credentials: Option<(String, String)>, mode: Mode) -> Result<Self, String> {
        let binary = std::env::var_os("NANOBOX_DOCKER_REGISTRY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"));
        if !binary.is_file() {
            panic!(
                "{} not found: run `cargo xtask setup` (it installs Debian's docker-registry) \
                 or set NANOBOX_DOCKER_REGISTRY",
                binary.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("nanobox-registry-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?
            .port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let mut token_server = None;
        let auth = match &credentials {
            Some((user, password)) if mode == Mode::Token => {
                let server = token::TokenServer::start(dir.path(), user, password)?;
                let config = server.registry_config();
                token_server = Some(server);
                config
            }
            Some((user, password)) => {
                let htpasswd = dir.path().join("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .map_err(|e| {
                        format!("htpasswd (apache2-utils; run `cargo xtask setup`): {e}")
                    })?;
                if !out.status.success() {
                    return Err(format!(
                        "htpasswd failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                std::fs::write(&htpasswd, &out.stdout).map_err(|e| format!("htpasswd: {e}"))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: nanobox-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let (certificate, tls_config) = if mode == Mode::Tls {
            let (ca, cert, key) = make_certificate(dir.path())?;
            let config = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            (Some(ca), config)
        } else {
            (None, String::new())
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls_config}{auth}",
            data.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| format!("config.yml: {e}"))?;
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let child = Command::new(&binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", binary.display()))?;
        let mut registry = Self {
            host: format!("127.0.0.1:{port}"),
            credentials,
            certificate,
            token_server,
            child,
            dir,
        };
        let deadline = Instant::now() + REGISTRY_START_TIMEOUT;
        loop {
            // 200 anonymous, 401 with auth: either way the API is up. Over TLS, the port
            // accepting connections is what this client can check.
            let up = if registry.certificate.is_some() {
                TcpStream::connect(&registry.host).is_ok()
            } else {
                matches!(registry.get_status("/v2/"), Ok(200 | 401))
            };
            if up {
                return Ok(registry);
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Err(format!(
                    "docker-registry exited with {status}: {}",
                    registry.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "GET /v2/ did not answer within {REGISTRY_START_TIMEOUT:?}; log: {}",
                    registry.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The HTTP status of an anonymous GET of `path` (HTTP/1.0, so the server closes).
    pub fn get_status(&self, path: &str) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(&self.host)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.host)?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP status line"))
    }

    /// Pushes the image tagged `tag` in the OCI layout `layout` as `name:dest_tag`
    /// (`skopeo copy --all`, so an index is pushed with all its platforms).
    pub fn push(&self, layout: &Path, tag: &str, name: &str, dest_tag: &str, format: PushFormat) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if format == PushFormat::DockerV2s2 {
            cmd.args(["--format", "v2s2"]);
        } else {
            cmd.arg("--preserve-digests");
        }
        if let Some((user, password)) = &self.credentials {
            cmd.arg(format!("--dest-creds={user}:{password}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{name}:{dest_tag}", self.host));
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("skopeo (run `cargo xtask setup`): {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}\nregistry log: {}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// One anonymous HTTP/1.0 request with a body; returns the status, the `Location`
    /// header (empty if none) and the response body.
    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, String, String) {
        let mut stream = TcpStream::connect(&self.host)
            .unwrap_or_else(|e| panic!("connecting to the registry: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{e}"));
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .unwrap_or_else(|e| panic!("sending {method} {path}: {e}"));
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .unwrap_or_else(|e| panic!("reading the reply to {method} {path}: {e}"));
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let status = reply
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let location = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        (status, location, body.to_owned())
    }

    /// Uploads `data` as a blob of repository `name`; returns its digest.
    pub fn put_blob(&self, name: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", sha256_hex(data));
        // Start an upload, then finish it in one PUT (the monolithic upload every
        // distribution version takes).
        let (status, location, body) = self.send(
            "POST",
            &format!("/v2/{name}/blobs/uploads/"),
            "application/octet-stream",
            b"",
        );
        assert_eq!(status, 202, "starting a blob upload: {body}");
        let path = match location.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_owned(),
            None => location,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, _, body) = self.send(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            "application/octet-stream",
            data,
        );
        assert_eq!(status, 201, "uploading a blob: {body}");
        digest
    }

    /// Stores `manifest` (any JSON, of `media_type`) as `name:tag`, bypassing skopeo's
    /// checks: for images that a well-behaved tool would refuse to make.
    pub fn put_manifest(&self, name: &str, tag: &str, media_type: &str, manifest: &[u8]) {
        let (status, _, body) = self.send(
            "PUT",
            &format!("/v2/{name}/manifests/{tag}"),
            media_type,
            manifest,
        );
        assert_eq!(status, 201, "putting a manifest: {body}");
    }

    /// Where the registry stores a blob (to corrupt it in a test).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The end of the registry's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// How many `method` requests for paths containing `fragment` the registry's access
    /// log holds (one line per request: `... "GET /v2/app/blobs/sha256:... HTTP/1.1" 200`).
    pub fn requests(&self, method: &str, fragment: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        let start = format!("\"{method} /");
        log.lines()
            .filter(|l| l.contains(&start) && l.contains(fragment))
            .count()
    }
}

/// A CA (its PEM is returned) and a server certificate for 127.0.0.1 signed by it
/// (webpki refuses a self-signed CA certificate as a server's own).
fn make_certificate(dir: &Path) -> Result<(Vec<u8>, PathBuf, PathBuf), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &["-days", "2", "-subj", "/CN=nanobox-test-ca"],
    ]
    .concat()
    .into_iter()
    .chain(["-keyout", "ca.key", "-out", "ca.pem"])
    .collect::<Vec<_>>())?;
    run(&[&["req"], &ec[..], &["-subj", "/CN=127.0.0.1"]]
        .concat()
        .into_iter()
        .chain(["-keyout", "key.pem", "-out", "server.csr"])
        .collect::<Vec<_>>())?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| format!("server.ext: {e}"))?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "cert.pem",
    ])?;
    let ca = std::fs::read(dir.join("ca.pem")).map_err(|e| format!("ca.pem: {e}"))?;
    Ok((ca, dir.join("cert.pem"), dir.join("key.pem")))
}

mod token;

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
