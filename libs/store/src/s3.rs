//! The S3 object store (AWS S3 or any compatible server: SeaweedFS, MinIO, Ceph RGW).
//!
//! Large uploads use multipart upload with a few parts in flight, each part streamed from
//! its slice of the file; a failed multipart upload is aborted so that no orphaned parts
//! keep costing storage. The content's sha256 is computed before upload and recorded as
//! object metadata (`x-amz-meta-sha256`); downloads into a file verify it.
//!
//! The HTTP client is rustls with ring (the SDK's default TLS stack needs cmake to
//! build); plain `http://` endpoints work for local servers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, StalledStreamProtectionConfig};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::digest::{sha256_file, sha256_hex, temp_beside};
use crate::key::check_prefix;
use crate::object::check_range;
use crate::{ObjectKey, ObjectMeta, ObjectStore, ObjectSummary, StoreError, MAX_RANGE_LEN};

/// The user-metadata field that records the content's sha256.
const SHA256_META: &str = "sha256";
/// S3's smallest part (except the last) and its largest part count.
const MIN_PART_SIZE: u64 = 5 << 20;
const MAX_PART_SIZE: u64 = 5 << 30;
const MAX_PARTS: u64 = 10_000;

/// Where the credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub enum S3Credentials {
    /// Fixed keys (from NanoBox's own config).
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN`,
    /// read when the store is created.
    Environment,
}

impl std::fmt::Debug for S3Credentials {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static { access_key_id, .. } => f
                .debug_struct("Static")
                .field("access_key_id", access_key_id)
                .finish_non_exhaustive(),
            Self::Environment => f.write_str("Environment"),
        }
    }
}

/// How to reach the bucket, and how to upload.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// `None` for AWS itself; `http://127.0.0.1:8333` and the like otherwise.
    pub endpoint: Option<String>,
    pub region: String,
    /// `http://host/bucket/key` instead of `http://bucket.host/key` (most self-hosted
    /// servers need this).
    pub path_style: bool,
    pub credentials: S3Credentials,
    /// Objects of at least this size are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part (raised automatically when a file would need more than 10 000).
    pub part_size: u64,
    /// Parts uploaded at the same time.
    pub upload_concurrency: usize,
    /// Connecting to the endpoint gives up after this long.
    pub connect_timeout: Duration,
}

impl S3Config {
    /// A config with the default upload tuning (16 MiB parts, 4 in flight, multipart from
    /// 16 MiB).
    pub fn new(
        bucket: impl Into<String>,
        region: impl Into<String>,
        credentials: S3Credentials,
    ) -> Self {
        Self {
            bucket: bucket.into(),
            endpoint: None,
            region: region.into(),
            path_style: false,
            credentials,
            multipart_threshold: 16 << 20,
            part_size: 16 << 20,
            upload_concurrency: 4,
            connect_timeout: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        let bad = |m: &str| Err(StoreError::Config(m.to_owned()));
        if self.bucket.is_empty() {
            return bad("the bucket name is empty");
        }
        if self.region.is_empty() {
            return bad("the region is empty");
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return bad("part_size must be between 5 MiB and 5 GiB");
        }
        if self.upload_concurrency == 0 {
            return bad("upload_concurrency must be at least 1");
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return bad("the endpoint must be an http:// or https:// URL");
            }
        }
        Ok(())
    }
}

/// An [`ObjectStore`] in one S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    config: S3Config,
}

/// Where the bytes of an upload come from.
enum Source<'a> {
    File(&'a Path),
    Bytes(&'a Bytes),
}

impl Source<'_> {
    async fn part(&self, offset: u64, len: u64) -> Result<ByteStream, StoreError> {
        match self {
            Self::File(path) => ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| {
                    StoreError::io(
                        format!("reading {}", path.display()),
                        std::io::Error::other(e),
                    )
                }),
            Self::Bytes(data) => {
                // Offsets come from the data's own length.
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = usize::try_from(offset + len)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                Ok(ByteStream::from(data.slice(start..end)))
            }
        }
    }
}

impl S3Store {
    /// Builds the client. Makes no request: see [`S3Store::check`].
    pub fn new(config: S3Config) -> Result<Self, StoreError> {
        config.validate()?;
        let credentials = match &config.credentials {
            S3Credentials::Static {
                access_key_id,
                secret_access_key,
                session_token,
            } => Credentials::new(
                access_key_id,
                secret_access_key,
                session_token.clone(),
                None,
                "nanobox-static",
            ),
            S3Credentials::Environment => {
                let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                let (Some(id), Some(secret)) =
                    (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
                else {
                    return Err(StoreError::Config(
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set".into(),
                    ));
                };
                Credentials::new(id, secret, var("AWS_SESSION_TOKEN"), None, "nanobox-env")
            }
        };
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(config.path_style)
            .http_client(http)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .build(),
            )
            // Stalled-stream protection needs a sleep implementation and judges a slow
            // local disk as a stall; the connect timeout and retries cover dead peers.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            config,
        })
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// One request that proves the endpoint, the credentials and the bucket work.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.config.bucket)
            .send()
            .await
            .map_err(|e| map_sdk_error("check", &self.config.bucket, e))?;
        Ok(())
    }

    /// Multipart uploads of this bucket that were started and neither completed nor
    /// aborted, as `(key, upload id)`. Useful to check and clean up after crashes.
    pub async fn pending_uploads(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        let mut key_marker = None;
        let mut id_marker = None;
        loop {
            let resp = self
                .client
                .list_multipart_uploads()
                .bucket(&self.config.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| map_sdk_error("list uploads", prefix, e))?;
            for upload in resp.uploads() {
                if let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) {
                    out.push((key.to_owned(), id.to_owned()));
                }
            }
            if resp.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = resp.next_key_marker().map(str::to_owned);
            id_marker = resp.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(out);
            }
        }
    }

    fn part_size_for(&self, size: u64) -> u64 {
        let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
        self.config.part_size.max(needed)
    }

    async fn upload(
        &self,
        key: &ObjectKey,
        source: Source<'_>,
        size: u64,
        sha256: String,
    ) -> Result<ObjectMeta, StoreError> {
        let etag = if size < self.config.multipart_threshold {
            let body = source.part(0, size).await?;
            let resp = self
                .client
                .put_object()
                .bucket(&self.config.bucket)
                .key(key.as_str())
                .content_length(i64::try_from(size).unwrap_or(i64::MAX))
                .metadata(SHA256_META, &sha256)
                .body(body)
                .send()
                .await
                .map_err(|e| map_sdk_error("put", key.as_str(), e))?;
            resp.e_tag().map(unquote)
        } else {
            self.upload_multipart(key, &source, size, &sha256).await?
        };
        Ok(ObjectMeta {
            key: key.clone(),
            size,
            etag,
            sha256: Some(sha256),
        })
    }

    async fn upload_multipart(
        &self,
        key: &ObjectKey,
        source: &Source<'_>,
        size: u64,
        sha256: &str,
    ) -> Result<Option<String>, StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key.as_str())
            .metadata(SHA256_META, sha256)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| map_sdk_error("start multipart upload", key.as_str(), e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(StoreError::Backend {
                operation: "start multipart upload",
                key: key.to_string(),
                message: "the server returned no upload id".into(),
                retryable: false,
            });
        };
        let result = self.upload_parts(key, source, size, &upload_id).await;
        match result {
            Ok(etag) => Ok(etag),
            Err(e) => {
                // Abort so the server drops the parts; the original error is what matters.
                if let Err(abort) = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.config.bucket)
                    .key(key.as_str())
                    .upload_id(&upload_id)
                    .send()
                    .await
                {
                    tracing::warn!(
                        key = key.as_str(),
                        upload_id,
                        error = %DisplayErrorContext(&abort),
                        "aborting a failed multipart upload failed"
                    );
                }
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &ObjectKey,
        source: &Source<'_>,
        size: u64,
        upload_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let part_size = self.part_size_for(size);
        let count = size.div_ceil(part_size).max(1);
        let mut parts: Vec<CompletedPart> = futures::stream::iter(0..count)
            .map(|index| async move {
                let offset = index * part_size;
                let len = part_size.min(size - offset);
                let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
                let body = source.part(offset, len).await?;
                let resp = self
                    .client
                    .upload_part()
                    .bucket(&self.config.bucket)
                    .key(key.as_str())
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(i64::try_from(len).unwrap_or(i64::MAX))
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| map_sdk_error("upload part", key.as_str(), e))?;
                Ok::<_, StoreError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(resp.e_tag().map(str::to_owned))
                        .set_checksum_crc32(resp.checksum_crc32().map(str::to_owned))
                        .build(),
                )
            })
            .buffer_unordered(self.config.upload_concurrency)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(key.as_str())
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| map_sdk_error("complete multipart upload", key.as_str(), e))?;
        Ok(done.e_tag().map(unquote))
    }

    async fn download(&self, key: &ObjectKey, dest: &Path) -> Result<ObjectMeta, StoreError> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|e| map_sdk_error("get", key.as_str(), e))?;
        let recorded = resp
            .metadata()
            .and_then(|m| m.get(SHA256_META))
            .map(|s| s.to_ascii_lowercase());
        let etag = resp.e_tag().map(unquote);
        let mut body = resp.body;
        let temp: PathBuf = temp_beside(dest);
        let result = async {
            let context = || format!("writing {}", temp.display());
            let mut file = tokio::fs::File::create(&temp)
                .await
                .map_err(|e| StoreError::io(context(), e))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.try_next().await.map_err(|e| StoreError::Backend {
                operation: "get",
                key: key.to_string(),
                message: DisplayErrorContext(&e).to_string(),
                retryable: true,
            })? {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| StoreError::io(context(), e))?;
            }
            file.sync_all()
                .await
                .map_err(|e| StoreError::io(context(), e))?;
            let actual = hex::encode(hasher.finalize());
            if let Some(expected) = &recorded {
                if *expected != actual {
                    return Err(StoreError::DigestMismatch {
                        key: key.to_string(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            tokio::fs::rename(&temp, dest)
                .await
                .map_err(|e| StoreError::io(format!("renaming into {}", dest.display()), e))?;
            Ok(ObjectMeta {
                key: key.clone(),
                size,
                etag,
                sha256: Some(actual),
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }

    async fn range(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        if len > MAX_RANGE_LEN {
            return Err(StoreError::RangeTooLarge {
                len,
                max: MAX_RANGE_LEN,
            });
        }
        if len == 0 {
            // HTTP cannot ask for an empty range.
            let meta = self.stat(key).await?;
            check_range(key, offset, len, meta.size)?;
            return Ok(Bytes::new());
        }
        let out_of_bounds = |size| StoreError::RangeOutOfBounds {
            key: key.to_string(),
            offset,
            len,
            size,
        };
        let resp = match self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key.as_str())
            .range(format!(
                "bytes={}-{}",
                offset,
                offset.saturating_add(len - 1)
            ))
            .send()
            .await
        {
            Ok(resp) => resp,
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(416) => {
                let size = self.stat(key).await?.size;
                return Err(out_of_bounds(size));
            }
            Err(e) => return Err(map_sdk_error("ranged get", key.as_str(), e)),
        };
        let total = resp
            .content_range()
            .and_then(|r| r.rsplit_once('/'))
            .and_then(|(_, total)| total.parse::<u64>().ok());
        let data = resp
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Backend {
                operation: "ranged get",
                key: key.to_string(),
                message: DisplayErrorContext(&e).to_string(),
                retryable: true,
            })?
            .into_bytes();
        if data.len() as u64 != len {
            // S3 clips a range that runs past the end; the contract is all or nothing.
            let size = match total {
                Some(size) => size,
                None => self.stat(key).await?.size,
            };
            return Err(out_of_bounds(size));
        }
        Ok(data)
    }

    async fn stat(&self, key: &ObjectKey) -> Result<ObjectMeta, StoreError> {
        let resp = self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|e| map_sdk_error("head", key.as_str(), e))?;
        Ok(ObjectMeta {
            key: key.clone(),
            size: resp
                .content_length()
                .and_then(|l| u64::try_from(l).ok())
                .unwrap_or_default(),
            etag: resp.e_tag().map(unquote),
            sha256: resp
                .metadata()
                .and_then(|m| m.get(SHA256_META))
                .map(|s| s.to_ascii_lowercase()),
        })
    }

    async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StoreError> {
        check_prefix(prefix)?;
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.config.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| map_sdk_error("list", prefix, e))?;
            for object in resp.contents() {
                let Some(name) = object.key() else { continue };
                match ObjectKey::new(name) {
                    Ok(key) => out.push(ObjectSummary {
                        key,
                        size: object
                            .size()
                            .and_then(|s| u64::try_from(s).ok())
                            .unwrap_or_default(),
                    }),
                    // Written by something else; NanoBox cannot address it anyway.
                    Err(e) => tracing::warn!(error = %e, "skipping an object with an invalid key"),
                }
            }
            match (resp.is_truncated(), resp.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

fn unquote(etag: &str) -> String {
    etag.trim_matches('"').to_owned()
}

/// Maps an SDK error onto [`StoreError`]: not-found and refused credentials get their own
/// variants; timeouts, dropped connections, throttling and server errors are retryable.
fn map_sdk_error<E>(
    operation: &'static str,
    key: &str,
    err: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let message = match (&code, err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.clone(),
        _ => DisplayErrorContext(&err).to_string(),
    };
    let key = key.to_owned();
    match (status, code.as_deref()) {
        (Some(404), _) | (_, Some("NoSuchKey" | "NotFound" | "NoSuchBucket")) => {
            StoreError::NotFound { key }
        }
        (Some(403), _)
        | (_, Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch")) => {
            StoreError::AccessDenied {
                operation,
                key,
                message,
            }
        }
        _ => {
            let retryable = match &err {
                SdkError::TimeoutError(_)
                | SdkError::DispatchFailure(_)
                | SdkError::ResponseError(_) => true,
                _ => {
                    matches!(status, Some(429 | 500..=599))
                        || matches!(
                            code.as_deref(),
                            Some(
                                "SlowDown"
                                    | "RequestTimeout"
                                    | "InternalError"
                                    | "ServiceUnavailable"
                            )
                        )
                }
            };
            StoreError::Backend {
                operation,
                key,
                message,
                retryable,
            }
        }
    }
}

impl ObjectStore for S3Store {
    fn put_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        async move {
            // Hashing first costs one sequential read but lets the sha256 travel as
            // metadata, so every later download can be verified.
            let (sha256, size) = sha256_file(path).await?;
            self.upload(key, Source::File(path), size, sha256).await
        }
        .boxed()
    }

    fn put_bytes<'a>(
        &'a self,
        key: &'a ObjectKey,
        data: Bytes,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        async move {
            let sha256 = sha256_hex(&data);
            let size = data.len() as u64;
            self.upload(key, Source::Bytes(&data), size, sha256).await
        }
        .boxed()
    }

    fn get_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        self.download(key, dest).boxed()
    }

    fn get_range<'a>(
        &'a self,
        key: &'a ObjectKey,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        self.range(key, offset, len).boxed()
    }

    fn head<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        self.stat(key).boxed()
    }

    fn delete<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            match self
                .client
                .delete_object()
                .bucket(&self.config.bucket)
                .key(key.as_str())
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => match map_sdk_error("delete", key.as_str(), e) {
                    StoreError::NotFound { .. } => Ok(()),
                    other => Err(other),
                },
            }
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ObjectSummary>, StoreError>> {
        self.list_all(prefix).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> S3Config {
        S3Config::new(
            "b",
            "us-east-1",
            S3Credentials::Static {
                access_key_id: "id".into(),
                secret_access_key: "very-secret".into(),
                session_token: None,
            },
        )
    }

    #[test]
    fn validates_config() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.part_size = 1 << 20;
        assert!(matches!(c.validate(), Err(StoreError::Config(_))));
        let mut c = config();
        c.endpoint = Some("127.0.0.1:9000".into());
        assert!(matches!(c.validate(), Err(StoreError::Config(_))));
        let mut c = config();
        c.bucket.clear();
        assert!(matches!(c.validate(), Err(StoreError::Config(_))));
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", config()).contains("very-secret"));
    }

    #[test]
    fn part_size_grows_for_huge_objects() {
        let store = S3Store::new(config()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.part_size_for(40 << 20), 16 << 20);
        let huge = 400u64 << 30;
        let part = store.part_size_for(huge);
        assert!(huge.div_ceil(part) <= MAX_PARTS);
        assert_eq!(part % (1 << 20), 0);
    }
}
