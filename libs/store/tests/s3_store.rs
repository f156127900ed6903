//! The S3 store against a real SeaweedFS server started by the test kit: the
//! conformance suite, plus credentials, multipart and error mapping.

use std::path::Path;

use nanobox_store::conformance::Harness;
use nanobox_store::{ObjectKey, ObjectStore, S3Config, S3Credentials, S3Store, StoreError};
use nanobox_testkit::s3::S3Server;

struct S3 {
    store: S3Store,
    server: S3Server,
    scratch: tempfile::TempDir,
}

impl Harness for S3 {
    fn store(&self) -> &dyn ObjectStore {
        &self.store
    }
    fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

fn config_for(server: &S3Server, secret: &str) -> S3Config {
    let mut config = S3Config::new(
        &server.bucket,
        &server.region,
        S3Credentials::Static {
            access_key_id: server.access_key.clone(),
            secret_access_key: secret.to_owned(),
            session_token: None,
        },
    );
    config.endpoint = Some(server.endpoint.clone());
    config.path_style = true;
    config
}

async fn setup() -> S3 {
    let server = S3Server::start().await;
    let store =
        S3Store::new(config_for(&server, &server.secret_key)).unwrap_or_else(|e| panic!("{e}"));
    store.check().await.unwrap_or_else(|e| panic!("{e}"));
    S3 {
        store,
        server,
        scratch: tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
    }
}

nanobox_store::conformance_tests!(setup);

fn key(s: &str) -> ObjectKey {
    ObjectKey::new(s).unwrap_or_else(|e| panic!("{e}"))
}

/// A wrong secret is refused by the server and reported as AccessDenied, not retryable.
#[tokio::test]
async fn wrong_secret_is_rejected() {
    let h = setup().await;
    let bad =
        S3Store::new(config_for(&h.server, "not-the-secret")).unwrap_or_else(|e| panic!("{e}"));
    for result in [
        bad.check().await.map(|_| ()),
        bad.put_bytes(&key("denied/obj"), bytes::Bytes::from_static(b"x"))
            .await
            .map(|_| ()),
        bad.list("").await.map(|_| ()),
    ] {
        match result {
            Err(e @ StoreError::AccessDenied { .. }) => assert!(!e.is_retryable()),
            other => panic!("expected AccessDenied, got {other:?}"),
        }
    }
    // Nothing was written.
    assert!(h.store.head(&key("denied/obj")).await.is_err());
}

/// An access key the server does not know is refused too.
#[tokio::test]
async fn unknown_access_key_is_rejected() {
    let h = setup().await;
    let mut config = config_for(&h.server, &h.server.secret_key);
    config.credentials = S3Credentials::Static {
        access_key_id: "AKNOBODY".into(),
        secret_access_key: h.server.secret_key.clone(),
        session_token: None,
    };
    let bad = S3Store::new(config).unwrap_or_else(|e| panic!("{e}"));
    match bad.head(&key("anything")).await {
        Err(StoreError::AccessDenied { .. }) => {}
        other => panic!("expected AccessDenied, got {other:?}"),
    }
}

/// Credentials from the environment are read when the store is created; missing ones
/// are a configuration error. (Each test runs in its own process under nextest, so
/// changing the environment here affects no other test.)
#[tokio::test]
async fn environment_credentials() {
    let h = setup().await;
    let mut config = config_for(&h.server, "unused");
    config.credentials = S3Credentials::Environment;
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    assert!(matches!(
        S3Store::new(config.clone()),
        Err(StoreError::Config(_))
    ));
    std::env::set_var("AWS_ACCESS_KEY_ID", &h.server.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &h.server.secret_key);
    let store = S3Store::new(config).unwrap_or_else(|e| panic!("{e}"));
    store.check().await.unwrap_or_else(|e| panic!("{e}"));
}

/// The sha256 recorded at upload comes back from head, and a multipart upload leaves no
/// pending upload behind.
#[tokio::test]
async fn multipart_records_digest_and_completes() {
    let h = setup().await;
    let src = h.scratch.path().join("mp.in");
    let data = nanobox_store::conformance::pattern(5, (17 << 20) + 3);
    std::fs::write(&src, &data).unwrap_or_else(|e| panic!("{e}"));
    let k = key("mp/obj");
    let put = h
        .store
        .put_file(&k, &src)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = h.store.head(&k).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(head.sha256, put.sha256);
    assert_eq!(
        head.sha256.as_deref(),
        Some(nanobox_store::sha256_hex(&data).as_str())
    );
    assert!(head.etag.is_some());
    let pending = h
        .store
        .pending_uploads("mp/")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(pending.is_empty(), "pending uploads: {pending:?}");
}

/// A multipart upload that fails after it started is aborted: no object and no pending
/// upload stay behind. The source is a FIFO: hashing reads 20 MiB from it (so the upload
/// goes multipart), but its parts cannot be read back.
#[tokio::test]
async fn failed_multipart_upload_is_aborted() {
    let h = setup().await;
    let fifo = h.scratch.path().join("source.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap_or_else(|e| panic!("mkfifo: {e}"));
    assert!(status.success(), "mkfifo failed");
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            // Blocks until the upload opens the FIFO to hash it.
            let data = nanobox_store::conformance::pattern(8, 20 << 20);
            std::fs::write(&fifo, data).unwrap_or_else(|e| panic!("writing the FIFO: {e}"));
        })
    };
    let k = key("abort/obj");
    let result = h.store.put_file(&k, &fifo).await;
    writer
        .join()
        .unwrap_or_else(|_| panic!("FIFO writer panicked"));
    assert!(
        result.is_err(),
        "upload from an unreadable source succeeded"
    );
    let pending = h
        .store
        .pending_uploads("abort/")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        pending.is_empty(),
        "multipart upload not aborted: {pending:?}"
    );
    assert!(matches!(
        h.store.head(&k).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// A server that is not there is a retryable backend error.
#[tokio::test]
async fn unreachable_server_is_retryable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    drop(listener);
    let mut config = S3Config::new(
        "bucket",
        "us-east-1",
        S3Credentials::Static {
            access_key_id: "a".into(),
            secret_access_key: "b".into(),
            session_token: None,
        },
    );
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.path_style = true;
    let store = S3Store::new(config).unwrap_or_else(|e| panic!("{e}"));
    match store.head(&key("x")).await {
        Err(e @ StoreError::Backend { .. }) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected a retryable Backend error, got {other:?}"),
    }
}
