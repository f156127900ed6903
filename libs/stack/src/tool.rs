//! External tools (`ip`, `nft`, `sysctl`, `pg_ctl`, `runuser`) run with a deadline: a hung
//! tool must not hang `nanobox up` or its shutdown.

use std::process::Stdio;
use std::time::Duration;

use crate::StackError;

/// How long a quick tool (`ip`, `nft`, `sysctl`) may take.
pub(crate) const QUICK: Duration = Duration::from_secs(20);

/// Runs `program args` and returns its stdout; a failure carries its stderr.
pub(crate) async fn run(
    program: &str,
    args: &[&str],
    limit: Duration,
) -> Result<String, StackError> {
    run_with_stdin(program, args, None, limit).await
}

/// [`run`] with `stdin` fed to the tool (rulesets for `nft -f -`).
pub(crate) async fn run_with_stdin(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<String, StackError> {
    use tokio::io::AsyncWriteExt as _;

    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StackError::Tool {
            command: command.clone(),
            message: format!("cannot start it: {e}"),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| StackError::Tool {
                command: command.clone(),
                message: format!("writing its input: {e}"),
            })?;
    }
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.map_err(|e| StackError::Tool {
            command: command.clone(),
            message: e.to_string(),
        })?,
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => return Err(StackError::ToolTimeout { command, limit }),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(StackError::Tool {
            command,
            message: if stderr.is_empty() {
                out.status.to_string()
            } else {
                stderr
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
