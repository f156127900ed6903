//! `nanobox vm run` as a user runs it: a real guest, real output, the command's status.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use nanobox_testkit::GuestArtifacts;

fn nanobox(args: &[&str], stdin: &[u8]) -> Output {
    let guest = GuestArtifacts::from_env();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanobox"))
        .args(["vm", "run", "--rootfs"])
        .arg(&guest.rootfs)
        .arg("--kernel")
        .arg(&guest.kernel)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nanobox");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("nanobox output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn runs_a_command_and_exits_with_its_status() {
    let out = nanobox(&["--", "sh", "-c", "echo out; echo err >&2; exit 3"], b"");
    assert_eq!(text(&out.stdout), "out\n", "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn forwards_stdin_env_and_cwd() {
    let out = nanobox(
        &[
            "-e",
            "GREETING=hi there",
            "--cwd",
            "/etc",
            "--",
            "sh",
            "-c",
            "printf '%s|%s|' \"$GREETING\" \"$(pwd)\"; cat",
        ],
        b"from stdin",
    );
    assert_eq!(
        text(&out.stdout),
        "hi there|/etc|from stdin",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn timeout_and_signals_map_to_shell_statuses() {
    let out = nanobox(&["--timeout", "1", "--", "sleep", "60"], b"");
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );

    let out = nanobox(&["--", "sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("signal 15"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn nanobox_failures_are_status_125_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_nanobox"))
        .args([
            "vm",
            "run",
            "--rootfs",
            "/nonexistent/root.ext4",
            "--",
            "true",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/root.ext4"), "{err}");

    // A command the guest cannot find is the shell's 127, not a NanoBox failure.
    let out = nanobox(&["--", "/no/such/binary"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn persist_writes_through_and_the_default_overlay_does_not() {
    let guest = GuestArtifacts::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.ext4");
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(&guest.rootfs)
        .arg(&disk)
        .status()
        .expect("cp");
    assert!(status.success());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nanobox"))
            .args(["vm", "run", "--no-stdin", "--kernel"])
            .arg(&guest.kernel)
            .arg("--rootfs")
            .arg(&disk)
            .args(args)
            .output()
            .expect("nanobox")
    };
    // Without --persist the image is untouched...
    let out = run(&["--", "sh", "-c", "echo scratch > /root/scratch"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // ...with it, the guest syncs and powers off, and the write is there next boot.
    let out = run(&["--persist", "--", "sh", "-c", "echo kept > /root/kept"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(&[
        "--",
        "sh",
        "-c",
        "cat /root/kept; ls /root/scratch 2>/dev/null || echo no-scratch",
    ]);
    assert_eq!(
        text(&out.stdout),
        "kept\nno-scratch\n",
        "{}",
        text(&out.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&disk)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "image not clean after --persist: {}",
        text(&fsck.stdout)
    );
}
