//! Running the external tools this crate needs (`qemu-img`, `resize2fs`) with a bound on
//! how long they may take and their stderr in the error when they fail.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::CowError;

/// How often a running tool is polled for exit. Tools here take milliseconds to seconds,
/// so 5 ms costs nothing measurable and keeps short runs short.
const POLL: Duration = Duration::from_millis(5);

/// The most stderr kept for an error message: enough for any tool's explanation, bounded
/// so that a chatty failure cannot flood a log line.
const STDERR_LIMIT: usize = 8 * 1024;

/// Runs `cmd` to completion within `timeout` (blocking). Stdout is discarded, stderr
/// captured. On a non-zero exit returns [`CowError::Tool`] with the stderr; past the
/// deadline the process is killed and [`CowError::ToolTimeout`] returned.
pub(crate) fn run(
    tool: &'static str,
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(), CowError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CowError::io(format!("starting {tool}"), e))?;
    // Drained on a thread so that a tool writing more than a pipe buffer of stderr
    // cannot block before exiting while we wait for it.
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CowError::ToolTimeout {
                    tool,
                    after: timeout,
                });
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => return Err(CowError::io(format!("waiting for {tool}"), e)),
        }
    };
    // The process has exited, so its end of the pipe is closed and the reader finishes
    // (unless the tool left a child holding it; such a tool would be a bug, and the
    // thread is then simply left behind rather than waited for).
    let stderr = stderr
        .filter(|h| {
            let start = Instant::now();
            while !h.is_finished() && start.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(POLL);
            }
            h.is_finished()
        })
        .and_then(|h| h.join().ok())
        .unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
    if stderr.len() > STDERR_LIMIT {
        let mut cut = STDERR_LIMIT;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push_str(" [...]");
    }
    Err(CowError::Tool {
        tool,
        status: status.to_string(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_stderr() {
        let err = run(
            "sh",
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom") && msg.contains('3'), "{msg}");
    }

    #[test]
    fn timeout_kills() {
        let start = Instant::now();
        let err = run(
            "sleep",
            Command::new("sleep").arg("30"),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(err, CowError::ToolTimeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn success() {
        run("true", &mut Command::new("true"), Duration::from_secs(10)).unwrap();
    }
}
