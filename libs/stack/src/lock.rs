//! One `nanobox up` per data directory: an exclusive `flock(2)` on `<data>/up.lock`, held
//! for the life of the process. The kernel drops it when the process dies, however it
//! dies, so a `kill -9` never leaves a stale lock behind; the pid written into the file
//! only serves the message a second `nanobox up` prints.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use crate::StackError;

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct UpLock {
    _file: Flock<File>,
}

impl UpLock {
    /// Takes the lock of `data_dir`, or says who holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, StackError> {
        let path = data_dir.join("up.lock");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StackError::io("opening the lock file", &path, e))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StackError::AlreadyRunning {
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                    data_dir: data_dir.to_owned(),
                });
            }
            Err((_, errno)) => {
                return Err(StackError::io("locking", &path, errno.into()));
            }
        };
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        written.map_err(|e| StackError::io("writing the lock file", &path, e))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = UpLock::acquire(dir.path()).unwrap();
        let err = UpLock::acquire(dir.path()).unwrap_err();
        let pid = std::process::id().to_string();
        assert!(
            matches!(&err, StackError::AlreadyRunning { pid: p, .. } if *p == pid),
            "{err}"
        );
        drop(first);
        UpLock::acquire(dir.path()).unwrap();
    }
}
