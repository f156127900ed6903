//! Secrets kept in files (`[api] api_keys_file`, `[auth] service_token_file`), read when a
//! service asks for them rather than at load, so a rotated file is picked up by reading it
//! again and the secrets are not kept in the [`crate::Config`].

use std::path::Path;

use crate::error::KeyPath;
use crate::schema::{ApiConfig, AuthConfig};
use crate::types::Secret;
use crate::validate::secret_problem;
use crate::ConfigError;

impl ApiConfig {
    /// The API keys: `api_keys`, then those in `api_keys_file` (one per line; blank lines
    /// and lines starting with `#` ignored). Empty means the API is open.
    pub fn load_api_keys(&self) -> Result<Vec<Secret>, ConfigError> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_keys_file {
            let field = KeyPath::keys(["api", "api_keys_file"]);
            let text = read(path)?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                check(&field, path, i + 1, line)?;
                keys.push(Secret::new(line));
            }
        }
        Ok(keys)
    }
}

impl AuthConfig {
    /// The service token: `service_token`, else the first line of `service_token_file`,
    /// else none.
    pub fn load_service_token(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(token) = &self.service_token {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.service_token_file else {
            return Ok(None);
        };
        let field = KeyPath::keys(["auth", "service_token_file"]);
        let text = read(path)?;
        let token = text.lines().next().unwrap_or_default().trim();
        check(&field, path, 1, token)?;
        Ok(Some(Secret::new(token)))
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn check(field: &KeyPath, path: &Path, line: usize, secret: &str) -> Result<(), ConfigError> {
    match secret_problem(secret) {
        Some(problem) => Err(ConfigError::KeyFile {
            key: field.clone(),
            path: path.to_path_buf(),
            message: format!("line {line}: {problem}"),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(
            &file,
            "# gateway keys\n\n0123456789abcdefA\n  0123456789abcdefB  \n",
        )
        .unwrap();
        let api = ApiConfig {
            api_keys: vec![Secret::new("0123456789abcdefZ")],
            api_keys_file: Some(file.clone()),
            ..ApiConfig::default()
        };
        let keys: Vec<String> = api
            .load_api_keys()
            .unwrap()
            .iter()
            .map(|k| k.expose().to_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "0123456789abcdefZ",
                "0123456789abcdefA",
                "0123456789abcdefB"
            ]
        );

        std::fs::write(&file, "0123456789abcdefA\nshort\n").unwrap();
        let e = api.load_api_keys().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: [api].api_keys_file: line 2: must be at least 16 characters",
                file.display()
            )
        );

        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let auth = AuthConfig {
            service_token: None,
            service_token_file: Some(token),
        };
        assert_eq!(
            auth.load_service_token().unwrap().unwrap().expose(),
            "0123456789abcdef0123"
        );
        let missing = AuthConfig {
            service_token: None,
            service_token_file: Some(dir.path().join("absent")),
        };
        assert!(matches!(
            missing.load_service_token(),
            Err(ConfigError::Read { .. })
        ));
        assert_eq!(AuthConfig::default().load_service_token().unwrap(), None);
    }
}
