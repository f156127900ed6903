//! `nanobox template build` end to end: an OCI image built with umoci (read from its
//! layout, a registry or a docker archive) becomes an ext4 rootfs that boots, with the
//! image's layers, whiteouts and config in effect.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use nanobox_testkit::GuestArtifacts;

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A two-layer image: busybox with a few applets, then a layer that adds a file and
/// deletes an applet (a whiteout); Env, WorkingDir and Cmd set in its config.
fn build_image(work: &Path) -> String {
    let layout = work.join("layout");
    let image = format!("{}:v1", layout.display());
    sh(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    sh(Command::new("umoci").args(["new", "--image", &image]));

    let bundle = work.join("bundle1");
    sh(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "echo", "cat", "pwd", "ls", "env"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    sh(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));

    let bundle = work.join("bundle2");
    sh(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    std::fs::write(root.join("etc/greeting"), "from the second layer\n").expect("write");
    std::fs::remove_file(root.join("bin/env")).expect("rm");
    sh(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));

    sh(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "GREETING=hello-from-oci",
        "--config.workingdir",
        "/etc",
        "--config.cmd",
        "sh",
    ]));
    format!("oci-layout:{image}")
}

fn nanobox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nanobox"))
        .args(args)
        .output()
        .expect("nanobox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_oci_image_becomes_a_bootable_rootfs() {
    let guest = GuestArtifacts::from_env();
    assert!(
        std::env::var_os("NANOBOX_INIT").is_some(),
        "run with `cargo xtask test` (sets NANOBOX_INIT)"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let reference = build_image(work.path());
    let out = work.path().join("app.ext4");

    let built = nanobox(&[
        "template",
        "build",
        &reference,
        "-o",
        out.to_str().expect("utf-8"),
    ]);
    assert!(
        built.status.success(),
        "template build: {}",
        text(&built.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&out)
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success(), "e2fsck: {}", text(&fsck.stdout));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{}.config.json", out.display())).expect("config beside the image"),
    )
    .expect("json");
    assert_eq!(config["working_dir"], "/etc");
    assert!(config["env"]
        .as_array()
        .expect("env")
        .iter()
        .any(|e| e == "GREETING=hello-from-oci"));

    let script =
        "echo \"$GREETING in $(pwd)\"; cat greeting; ls /bin/env 2>/dev/null || echo env-is-gone";
    let run = nanobox(&[
        "vm",
        "run",
        "--no-stdin",
        "--kernel",
        guest.kernel.to_str().expect("utf-8"),
        "--rootfs",
        out.to_str().expect("utf-8"),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(
        text(&run.stdout),
        "hello-from-oci in /etc\nfrom the second layer\nenv-is-gone\n",
        "stderr: {}",
        text(&run.stderr)
    );
    assert_eq!(run.status.code(), Some(0));
}

/// The same image saved by `skopeo copy ... docker-archive:` (the format of `docker
/// save`) into a directory whose name has a ':', built from the archive and booted.
#[test]
fn a_docker_archive_becomes_a_bootable_rootfs() {
    let guest = GuestArtifacts::from_env();
    assert!(
        std::env::var_os("NANOBOX_INIT").is_some(),
        "run with `cargo xtask test` (sets NANOBOX_INIT)"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let reference = build_image(work.path());
    let image = reference.strip_prefix("oci-layout:").expect("layout");
    let saved = work.path().join("app.tar");
    sh(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{image}"))
        .arg(format!("docker-archive:{}:demo/app:v1", saved.display())));
    // skopeo cannot write to a path with ':'; the reference parsing must cope with one.
    let dir = work.path().join("saved:images");
    std::fs::create_dir(&dir).expect("mkdir");
    let archive = dir.join("app.tar");
    std::fs::rename(&saved, &archive).expect("move the archive");
    let out = work.path().join("archive.ext4");
    let cache = work.path().join("cache");

    let built = Command::new(env!("CARGO_BIN_EXE_nanobox"))
        .env("NANOBOX_CACHE_DIR", &cache)
        .args(["template", "build"])
        .arg(format!("docker-archive:{}:demo/app:v1", archive.display()))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("nanobox");
    assert!(
        built.status.success(),
        "template build: {}",
        text(&built.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&out)
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success(), "e2fsck: {}", text(&fsck.stdout));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{}.config.json", out.display())).expect("config beside the image"),
    )
    .expect("json");
    assert_eq!(config["working_dir"], "/etc");
    // Imported into the shared blob cache, listed like a pull.
    let index = std::fs::read_to_string(cache.join("oci/index.json")).expect("cache index");
    assert!(
        index.contains("docker-archive:docker.io/demo/app:v1"),
        "{index}"
    );

    let script =
        "echo \"$GREETING in $(pwd)\"; cat greeting; ls /bin/env 2>/dev/null || echo env-is-gone";
    let run = nanobox(&[
        "vm",
        "run",
        "--no-stdin",
        "--kernel",
        guest.kernel.to_str().expect("utf-8"),
        "--rootfs",
        out.to_str().expect("utf-8"),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(
        text(&run.stdout),
        "hello-from-oci in /etc\nfrom the second layer\nenv-is-gone\n",
        "stderr: {}",
        text(&run.stderr)
    );
    assert_eq!(run.status.code(), Some(0));

    // An archive of one image refuses a tag it does not have, naming the one it has.
    let wrong = Command::new(env!("CARGO_BIN_EXE_nanobox"))
        .env("NANOBOX_CACHE_DIR", &cache)
        .args(["template", "build"])
        .arg(format!(
            "docker-archive:{}:demo/other:v1",
            archive.display()
        ))
        .arg("-o")
        .arg(work.path().join("wrong.ext4"))
        .output()
        .expect("nanobox");
    assert_eq!(wrong.status.code(), Some(1));
    let err = text(&wrong.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("demo/other:v1") && err.contains("docker.io/demo/app:v1"),
        "{err}"
    );
}

#[test]
fn bad_references_fail_with_one_line_reasons() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("x.ext4");
    let out = out.to_str().expect("utf-8");
    for (reference, want) in [
        ("oci-layout:/nonexistent/layout:v1", "/nonexistent/layout"),
        (
            "docker-archive:/nonexistent/x.tar:app:v1",
            "/nonexistent/x.tar",
        ),
        ("Not A Reference!", "image reference"),
    ] {
        let result = nanobox(&["template", "build", reference, "-o", out]);
        assert_eq!(result.status.code(), Some(1), "{reference}");
        let err = text(&result.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(err.contains(want), "{reference}: {err}");
    }
    assert!(!Path::new(out).exists(), "a failed build left an image");
}

#[test]
fn an_image_pulled_from_a_registry_boots() {
    use nanobox_testkit::registry::{PushFormat, Registry};
    let guest = GuestArtifacts::from_env();
    let work = tempfile::tempdir().expect("tempdir");
    let reference = build_image(work.path());
    let layout = reference
        .strip_prefix("oci-layout:")
        .and_then(|r| r.rsplit_once(':'))
        .map(|(dir, _)| dir.to_owned())
        .expect("layout dir");
    let registry = Registry::start();
    registry.push(Path::new(&layout), "v1", "apps/demo", "v1", PushFormat::Oci);
    let image = format!("{}/apps/demo:v1", registry.host);
    let out = work.path().join("pulled.ext4");
    let cache = work.path().join("cache");
    let build = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nanobox"))
            .env("NANOBOX_CACHE_DIR", &cache)
            .args(["template", "build", &image, "-o"])
            .arg(&out)
            .args(extra)
            .output()
            .expect("nanobox")
    };

    // Plain HTTP is an explicit opt-in, even for a loopback registry.
    let refused = build(&[]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        text(&refused.stderr).trim_end().lines().count(),
        1,
        "{}",
        text(&refused.stderr)
    );

    let built = build(&["--plain-http"]);
    assert!(
        built.status.success(),
        "template build: {}",
        text(&built.stderr)
    );
    let run = nanobox(&[
        "vm",
        "run",
        "--no-stdin",
        "--kernel",
        guest.kernel.to_str().expect("utf-8"),
        "--rootfs",
        out.to_str().expect("utf-8"),
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; cat greeting",
    ]);
    assert_eq!(
        text(&run.stdout),
        "hello-from-oci\nfrom the second layer\n",
        "{}",
        text(&run.stderr)
    );

    // A second build of the same image takes its layers from the cache.
    let blob_gets = registry.requests("GET", "/blobs/");
    let again = build(&["--plain-http"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        registry.requests("GET", "/blobs/"),
        blob_gets,
        "layers were downloaded again"
    );
}

/// The realistic image: Debian bookworm with Node.js, two layers, pushed to a real
/// registry, warmed into a template and booted; node runs in it.
#[test]
fn a_debian_node_image_from_the_registry_runs_node() {
    use nanobox_testkit::images::{debian_node_layout, DEBIAN_NODE_TAG};
    use nanobox_testkit::registry::{PushFormat, Registry};
    let guest = GuestArtifacts::from_env();
    let layout = debian_node_layout();
    let registry = Registry::start();
    registry.push(
        &layout,
        DEBIAN_NODE_TAG,
        "library/node",
        "22-bookworm",
        PushFormat::Oci,
    );
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("node.ext4");
    let image = format!("{}/library/node:22-bookworm", registry.host);
    let built = Command::new(env!("CARGO_BIN_EXE_nanobox"))
        .env("NANOBOX_CACHE_DIR", work.path().join("cache"))
        .args(["template", "build", &image, "--plain-http", "-o"])
        .arg(&out)
        .output()
        .expect("nanobox");
    assert!(
        built.status.success(),
        "template build: {}",
        text(&built.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&out)
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success(), "e2fsck: {}", text(&fsck.stdout));

    let vm = |cmd: &[&str]| {
        let mut args = vec![
            "vm",
            "run",
            "--no-stdin",
            "--memory-mb",
            "512",
            "--kernel",
            guest.kernel.to_str().expect("utf-8"),
            "--rootfs",
            out.to_str().expect("utf-8"),
            "--",
        ];
        args.extend_from_slice(cmd);
        nanobox(&args)
    };
    let run = vm(&["node", "-e", "console.log(JSON.stringify({ok:true}))"]);
    assert_eq!(
        text(&run.stdout),
        "{\"ok\":true}\n",
        "{}",
        text(&run.stderr)
    );
    assert_eq!(run.status.code(), Some(0));
    // The image's WorkingDir and Env apply to execs.
    let run = vm(&["node", "index.js"]);
    let said = text(&run.stdout);
    assert!(
        said.starts_with("node v") && said.ends_with("in /app says hello\n"),
        "{said}: {}",
        text(&run.stderr)
    );
}
