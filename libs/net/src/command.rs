//! The external tools this crate drives: `nft` (rulesets are fed on stdin so each one
//! applies as one atomic transaction) and `tc` (netlink crates do not build `tbf`
//! qdiscs). Commands for another namespace run under `nsenter --net=<path>`, which
//! enters it before exec without this process ever changing namespace. Every command has
//! a deadline ([`DEADLINE`]): a tool stuck on a lock or a wedged namespace fails the one
//! operation, killed, instead of holding a sandbox create (or the agent's start) forever.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use crate::NetError;

/// How long one `nft`, `tc` or `nsenter` run may take. They finish in milliseconds; a
/// ruleset of thousands of sandboxes in well under a second.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `program args` in the namespace `ns` (`None`: this process's own), with `stdin`
/// when given, and returns its stdout. A failure carries the command and its stderr.
pub(crate) async fn run(
    ns: Option<&Path>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    run_within(DEADLINE, ns, program, args, stdin).await
}

/// [`run`] with a deadline of `limit`: past it the program is killed and the error says
/// so.
pub(crate) async fn run_within(
    limit: Duration,
    ns: Option<&Path>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = tokio::process::Command::new("nsenter");
            cmd.arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    };
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let shown = describe(ns, program, args);
    let mut child = cmd
        .spawn()
        .map_err(|e| NetError::io(format!("starting `{shown}`"), e))?;
    let finished = tokio::time::timeout(limit, async {
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .await
                .map_err(|e| NetError::io(format!("writing to `{shown}`"), e))?;
            // Dropping the pipe closes it: the program sees the end of its input.
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| NetError::io(format!("waiting for `{shown}`"), e))
    })
    .await;
    // On the deadline the future, and with it the child, is dropped: kill_on_drop kills
    // it (and tokio reaps it).
    let out = match finished {
        Ok(out) => out?,
        Err(_) => {
            return Err(NetError::Command {
                command: shown,
                status: format!("killed after {} s", limit.as_secs_f32()),
                stderr: "the command did not finish in time".to_owned(),
            })
        }
    };
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = "(no output on stderr)".into();
        }
        if let Some(text) = stdin {
            // nft names the failing line by number: give the reader the input too.
            stderr.push_str(&format!("\ninput was:\n{text}"));
        }
        return Err(NetError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(ns: Option<&Path>, program: &str, args: &[&str]) -> String {
    let mut text = String::new();
    if let Some(ns) = ns {
        text.push_str(&format!("nsenter --net={} -- ", ns.display()));
    }
    text.push_str(program);
    for arg in args {
        text.push(' ');
        text.push_str(arg);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_carry_the_command_and_stderr() {
        let ok = run(None, "sh", &["-c", "cat"], Some("hello"))
            .await
            .unwrap();
        assert_eq!(ok, "hello");
        let err = run(None, "sh", &["-c", "echo broken >&2; exit 3"], None)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c echo broken"), "{text}");
        assert!(text.contains("broken"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
    }

    #[tokio::test]
    async fn a_command_past_its_deadline_is_killed_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
        let err = run_within(
            Duration::from_millis(300),
            None,
            "sh",
            &["-c", &script],
            None,
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("killed after 0.3 s"), "{text}");
        assert!(text.contains("sleep 30"), "{text}");
        // The program is gone (or a zombie about to be reaped), not left running.
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_owned()));
            match state {
                None => break,
                Some(s) if s.starts_with('Z') => break,
                Some(s) => assert!(
                    std::time::Instant::now() < deadline,
                    "the timed-out program still runs: {s}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
