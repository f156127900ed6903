//! `cargo xtask check-deploy`: the deployment artefacts (docker/, helm/, the Tiltfile)
//! checked with the real tools, offline, each step timed:
//!
//! - hadolint and `trivy config` on every Dockerfile;
//! - the chart, through the Helm SDK: lint and render with the default, external
//!   (Postgres and S3 outside the cluster), development and unprivileged values, every
//!   manifest validated against the Kubernetes schemas, references and the rendered
//!   `nanobox.toml` checked, then `trivy config` on the rendered manifests;
//! - the Tiltfile, evaluated by a Starlark interpreter against stand-ins of Tilt's
//!   builtins, and what it declares checked;
//! - two images built for real with buildah (vfs storage, chroot isolation, no daemon)
//!   from a Debian base made here with debootstrap (there is no Docker Hub): the gateway,
//!   then run (its /healthz and /metrics answer), and the node agent, whose tools and
//!   files are checked inside it.
//!
//! The Python tools are pinned in `xtask/deploy/requirements.txt` and installed into a
//! virtualenv under `<cache>/deploy/`, keyed by that file and the Python version; the
//! scripts driving them are beside it. The Debian base is cached there too, keyed by its
//! recipe. Every step runs even when an earlier one failed, and the failures are named
//! together at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sha2::Digest as _;

use crate::setup;

mod images;

const REQUIREMENTS: &str = "xtask/deploy/requirements.txt";
const CHART_SCRIPT: &str = "xtask/deploy/chart.py";
const TILTFILE_SCRIPT: &str = "xtask/deploy/tiltfile.py";
const CHART_TRIVY_IGNORE: &str = "helm/nanobox/ci/trivyignore.yaml";

pub fn check() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut steps = Steps::default();
    let Some(tools) = steps.run("tools: pinned PyPI packages in a cached virtualenv", || {
        Tools::ensure().map(|t| {
            let summary = format!("virtualenv {}", t.venv.display());
            (t, summary)
        })
    }) else {
        steps.report(started.elapsed());
        anyhow::bail!("check-deploy failed: the tools could not be installed");
    };
    let out = tempdir("check-deploy")?;
    let rendered = out.join("chart");

    steps.run("hadolint: docker/*.Dockerfile", || {
        hadolint(&tools).map(|s| ((), s))
    });
    steps.run("trivy config: docker/*.Dockerfile", || {
        trivy_canary(&tools, &out)?;
        trivy(&tools, Path::new("docker"), None).map(|s| ((), s))
    });
    steps.run(
        "chart: helm lint, render, kubernetes-validate, consistency",
        || {
            tools
                .python(CHART_SCRIPT, &[rendered.as_os_str()])
                .map(|s| ((), s))
        },
    );
    steps.run("trivy config: the rendered chart (every value set)", || {
        anyhow::ensure!(
            rendered.is_dir(),
            "nothing rendered to scan (the chart step failed)"
        );
        trivy(&tools, &rendered, Some(Path::new(CHART_TRIVY_IGNORE))).map(|s| ((), s))
    });
    steps.run(
        "Tiltfile: evaluated against stand-ins of Tilt's builtins",
        || tools.python(TILTFILE_SCRIPT, &[]).map(|s| ((), s)),
    );
    steps.run(
        "images: buildah, a local Debian base, gateway and node agent",
        || images::check().map(|s| ((), s)),
    );

    let _ = std::fs::remove_dir_all(&out);
    steps.report(started.elapsed());
    let failed = steps.failed();
    anyhow::ensure!(
        failed.is_empty(),
        "check-deploy failed: {}",
        failed.join("; ")
    );
    Ok(())
}

/// The steps run so far, with their durations and results.
#[derive(Default)]
struct Steps {
    done: Vec<(String, Duration, Result<(), String>)>,
}

impl Steps {
    /// Runs one step, printing what it reports; `None` if it failed.
    fn run<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<(T, String)>) -> Option<T> {
        setup::step(name);
        let t0 = Instant::now();
        let result = f();
        let took = t0.elapsed();
        match result {
            Ok((value, summary)) => {
                if !summary.trim().is_empty() {
                    eprintln!("{}", summary.trim_end());
                }
                self.done.push((name.to_owned(), took, Ok(())));
                Some(value)
            }
            Err(e) => {
                eprintln!("FAILED: {e:#}");
                self.done
                    .push((name.to_owned(), took, Err(format!("{e:#}"))));
                None
            }
        }
    }

    fn failed(&self) -> Vec<String> {
        self.done
            .iter()
            .filter(|(_, _, r)| r.is_err())
            .map(|(name, _, _)| name.clone())
            .collect()
    }

    fn report(&self, total: Duration) {
        eprintln!("\ncheck-deploy:");
        for (name, took, result) in &self.done {
            let verdict = if result.is_ok() { "ok" } else { "FAILED" };
            eprintln!("  {:>6.1} s  {verdict:<6}  {name}", took.as_secs_f64());
        }
        eprintln!("  {:>6.1} s          total", total.as_secs_f64());
    }
}

fn deploy_cache() -> PathBuf {
    setup::cache_dir().join("deploy")
}

fn tempdir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("nanobox-{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs `cmd`; its output (stdout then stderr) if it succeeds, else an error holding it.
fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "{} ({}):\n{}",
        program(cmd),
        out.status,
        text.trim_end()
    );
    Ok(text)
}

fn program(cmd: &Command) -> String {
    let name = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("{name} {}", args.join(" "))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Installs Debian packages that are missing (apt-get, through sudo when not root).
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    let apt = || {
        let mut cmd = if is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    capture(apt().args(["update", "-qq"]))?;
    capture(
        apt()
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )?;
    Ok(())
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Holds an exclusive lock on `path` (created if needed) until dropped, so that two
/// checks on one machine (CI's clone beside a developer's tree) do not build the same
/// cached thing at once.
fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// The virtualenv with the pinned tools.
struct Tools {
    venv: PathBuf,
}

impl Tools {
    fn ensure() -> anyhow::Result<Self> {
        let requirements =
            std::fs::read(REQUIREMENTS).with_context(|| format!("reading {REQUIREMENTS}"))?;
        let python = find_python()?;
        let version =
            capture(Command::new(&python).args(["-c", "import sys; print(sys.version)"]))?;
        let key = short_hash(&[
            &requirements,
            version.as_bytes(),
            python.as_os_str().as_encoded_bytes(),
        ]);
        let cache = deploy_cache();
        let venv = cache.join(format!("venv-{key}"));
        let done = venv.join(".complete");
        let _lock = lock(&cache.join(".venv.lock"))?;
        if !done.is_file() {
            eprintln!(
                "creating {} with {} (pip install -r {REQUIREMENTS})",
                venv.display(),
                python.display()
            );
            let _ = std::fs::remove_dir_all(&venv);
            capture(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
            capture(
                Command::new(venv.join("bin/python"))
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "--no-input",
                        "--requirement",
                        REQUIREMENTS,
                    ])
                    .env_remove("PIP_REQUIRE_VIRTUALENV"),
            )?;
            std::fs::write(&done, &requirements)?;
            prune_venvs(&cache, &venv);
        }
        Ok(Self { venv })
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.venv.join("bin").join(name)
    }

    fn python(&self, script: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<String> {
        capture(
            Command::new(self.bin("python"))
                .arg(script)
                .args(args)
                .env("PYTHONDONTWRITEBYTECODE", "1"),
        )
    }
}

/// A Python 3.11+ that can make virtualenvs: `python3` from PATH, else Debian's, with
/// python3-venv installed when it lacks `venv` (Debian splits it out).
fn find_python() -> anyhow::Result<PathBuf> {
    let usable = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    for candidate in ["python3", "/usr/bin/python3"] {
        if usable(Path::new(candidate)) {
            return Ok(PathBuf::from(candidate));
        }
    }
    apt_install(&["python3", "python3-venv"])?;
    let debian = PathBuf::from("/usr/bin/python3");
    anyhow::ensure!(
        usable(&debian),
        "no Python 3.11+ with venv (tried python3 and /usr/bin/python3)"
    );
    Ok(debian)
}

/// Old virtualenvs (other pins, another Python) are removed a day after they were made,
/// so that another checkout still using one keeps it meanwhile.
fn prune_venvs(cache: &Path, current: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(24 * 3600));
        if path != current && entry.file_name().to_string_lossy().starts_with("venv-") && old {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

fn dockerfiles() -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("docker")
        .context("reading docker/")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".Dockerfile"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no docker/*.Dockerfile");
    Ok(files)
}

fn hadolint(tools: &Tools) -> anyhow::Result<String> {
    // The linter must see a known problem, or a pass would mean nothing.
    let mut canary = Command::new(tools.bin("hadolint"));
    canary
        .args(["--no-color", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = canary.spawn().context("running hadolint")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin.write_all(b"FROM debian:bookworm\nRUN apt-get install curl\n")?;
    }
    anyhow::ensure!(
        !child.wait()?.success(),
        "hadolint accepted a Dockerfile with known problems: the tool is not working"
    );

    let files = dockerfiles()?;
    let mut problems = Vec::new();
    for file in &files {
        if let Err(e) = capture(
            Command::new(tools.bin("hadolint"))
                .arg("--no-color")
                .arg(file),
        ) {
            problems.push(format!("{e:#}"));
        }
    }
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(format!("{} Dockerfiles clean", files.len()))
}

/// `trivy config` on `target` (offline, with the checks embedded in the binary); every
/// finding not accepted in `ignore` fails.
fn trivy(tools: &Tools, target: &Path, ignore: Option<&Path>) -> anyhow::Result<String> {
    let mut cmd = Command::new(tools.bin("trivy"));
    cmd.args([
        "config",
        "--skip-check-update",
        "--quiet",
        "--format",
        "json",
    ])
    .arg("--cache-dir")
    .arg(deploy_cache().join("trivy"));
    if let Some(ignore) = ignore {
        cmd.arg("--ignorefile").arg(ignore);
    }
    let out = capture(cmd.arg(target))?;
    let start = out.find('{').context("trivy printed no JSON report")?;
    let report: serde_json::Value =
        serde_json::from_str(out[start..].trim()).context("reading trivy's JSON report")?;
    let results = report["Results"].as_array().cloned().unwrap_or_default();
    // Trivy skips some files silently (a directory named `dev`, for one): every file
    // that holds something to scan must be in the report.
    let scanned: std::collections::BTreeSet<&str> = results
        .iter()
        .filter_map(|r| r["Target"].as_str())
        .collect();
    let unscanned: Vec<String> = scannable(target)?
        .into_iter()
        .filter(|f| !scanned.contains(f.as_str()))
        .collect();
    anyhow::ensure!(
        unscanned.is_empty(),
        "trivy did not scan {} in {}",
        unscanned.join(", "),
        target.display()
    );
    let mut findings = Vec::new();
    let mut passed = 0;
    for result in &results {
        passed += result["MisconfSummary"]["Successes"].as_u64().unwrap_or(0);
        for m in result["Misconfigurations"].as_array().into_iter().flatten() {
            if m["Status"].as_str() == Some("FAIL") {
                findings.push(format!(
                    "{}:{}: {} ({}) {}: {}",
                    result["Target"].as_str().unwrap_or("?"),
                    m["CauseMetadata"]["StartLine"],
                    m["ID"].as_str().unwrap_or("?"),
                    m["Severity"].as_str().unwrap_or("?"),
                    m["Title"].as_str().unwrap_or(""),
                    m["Message"].as_str().unwrap_or(""),
                ));
            }
        }
    }
    anyhow::ensure!(
        findings.is_empty(),
        "trivy config found {} problem(s) (fix them, or accept one with its reason{}):\n{}",
        findings.len(),
        ignore
            .map(|i| format!(" in {}", i.display()))
            .unwrap_or_else(|| " in an inline `# trivy:ignore:<ID>` comment".to_owned()),
        findings.join("\n")
    );
    Ok(format!(
        "{} files, {passed} checks passed, no findings",
        results.len()
    ))
}

/// trivy must find a root user in a Dockerfile that has one, or a pass would mean nothing.
fn trivy_canary(tools: &Tools, scratch: &Path) -> anyhow::Result<()> {
    let dir = scratch.join("trivy-canary");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM debian:bookworm-slim\nUSER root\nENTRYPOINT [\"/bin/true\"]\n",
    )?;
    anyhow::ensure!(
        trivy(tools, &dir, None).is_err(),
        "trivy accepted a Dockerfile that runs as root: the tool is not working"
    );
    Ok(())
}

/// The files under `dir` (relative to it) that trivy should report on: Dockerfiles, and
/// YAML files holding a Kubernetes object.
fn scannable(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let wanted = name.ends_with(".Dockerfile")
                || name == "Dockerfile"
                || (name.ends_with(".yaml")
                    && std::fs::read_to_string(&path)
                        .is_ok_and(|t| t.lines().any(|l| l.starts_with("kind:"))));
            if wanted {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                found.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    Ok(found)
}
