//! Object store locations as one string, for configuration files and command lines:
//! `file:///var/lib/nanobox/objects` (or a plain absolute path) for the local store,
//! `s3://bucket?endpoint=http://127.0.0.1:8333&region=us-east-1&path_style=true` for S3
//! (credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).

use std::sync::Arc;

use crate::{LocalFsStore, ObjectStore, S3Config, S3Credentials, S3Store, StoreError};

/// Opens the store that `location` names.
pub fn open_object_store(location: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    if let Some(rest) = location.strip_prefix("s3://") {
        return Ok(Arc::new(S3Store::new(parse_s3(rest)?)?));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    if !path.starts_with('/') {
        return Err(StoreError::Config(format!(
            "object store {location:?}: expected file:///absolute/path, an absolute path, \
             or s3://bucket?endpoint=...&region=...&path_style=true"
        )));
    }
    Ok(Arc::new(LocalFsStore::open(path)?))
}

fn parse_s3(rest: &str) -> Result<S3Config, StoreError> {
    let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
    let bucket = bucket.trim_end_matches('/');
    if bucket.is_empty() || bucket.contains('/') {
        return Err(StoreError::Config(format!(
            "s3://{rest}: expected s3://<bucket>[?options]"
        )));
    }
    let mut config = S3Config::new(bucket, "us-east-1", S3Credentials::Environment);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "endpoint" => config.endpoint = Some(value.to_owned()),
            "region" => config.region = value.to_owned(),
            "path_style" => {
                config.path_style = match value {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(StoreError::Config(format!(
                            "s3 option path_style={other:?}: expected true or false"
                        )))
                    }
                }
            }
            other => {
                return Err(StoreError::Config(format!(
                    "unknown s3 option {other:?} (known: endpoint, region, path_style)"
                )))
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_locations() {
        let c = parse_s3("bucket?endpoint=http://127.0.0.1:8333&region=eu-west-1&path_style=true")
            .expect("valid");
        assert_eq!(c.bucket, "bucket");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(c.region, "eu-west-1");
        assert!(c.path_style);
        assert!(parse_s3("").is_err());
        assert!(parse_s3("a/b").is_err());
        assert!(parse_s3("b?colour=red").is_err());
        assert!(parse_s3("b?path_style=maybe").is_err());
    }

    #[test]
    fn local_locations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        assert!(open_object_store(&url).is_ok());
        assert!(open_object_store(&dir.path().display().to_string()).is_ok());
        assert!(open_object_store("relative/path").is_err());
    }
}
