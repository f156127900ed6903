//! The API key clients use and the token the services present to each other: generated
//! on the first `nanobox up`, kept in the data directory (mode 0600) and reused, so a
//! client configured once keeps working across restarts.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use crate::StackError;

/// Random bytes in a secret: 32, i.e. 256 bits.
const SECRET_BYTES: usize = 32;

/// The secret in `path`, created with `prefix` and 256 random bits when the file does
/// not exist yet.
pub(crate) fn load_or_create(path: &Path, prefix: &str) -> Result<String, StackError> {
    match std::fs::read_to_string(path) {
        Ok(text) if valid(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StackError::io("reading a secret", path, e)),
    }
    let bytes: [u8; SECRET_BYTES] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = format!("{prefix}{hex}");
    // Written to a temporary name and renamed: a crash leaves the old file or the new one.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StackError::io("writing a secret", &tmp, e))?;
    writeln!(file, "{secret}")
        .and_then(|()| file.sync_all())
        .map_err(|e| StackError::io("writing a secret", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StackError::io("writing a secret", path, e))?;
    Ok(secret)
}

/// What the services accept: at least 16 characters, printable ASCII without spaces.
fn valid(secret: &str) -> bool {
    secret.len() >= nanobox_config::MIN_SECRET_LEN && secret.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_secret_is_made_once_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-key");
        let first = load_or_create(&path, "nbx_").unwrap();
        assert!(
            first.starts_with("nbx_") && first.len() == 4 + 64,
            "{first}"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(&path, "nbx_").unwrap(), first);
        // A damaged file is replaced rather than handed to the services.
        std::fs::write(&path, "short\n").unwrap();
        let second = load_or_create(&path, "nbx_").unwrap();
        assert_ne!(second, first);
        assert_eq!(second.len(), first.len());
    }
}
