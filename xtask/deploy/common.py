"""Shared pieces of the deployment checks (`cargo xtask check-deploy`): rendering the chart
with the Helm SDK, validating manifests offline, reading the images' Dockerfiles and the
example nanobox.toml, and reporting problems.

Run with the virtualenv's python that xtask/src/deploy.rs prepares (the versions are
pinned in requirements.txt beside this file).
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "nanobox"
DOCKER = ROOT / "docker"
EXAMPLE_CONFIG = ROOT / "libs" / "config" / "nanobox.example.toml"

# The Kubernetes version manifests are validated against: the chart's floor is 1.27
# (native gRPC probes); 1.30 also has hostUsers (templateBuilder.hostUsers).
KUBE_VERSION = "1.30.0"

# Kinds that kubernetes-validate has no schema for, with the structural check used instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}

# The four images, named after their Dockerfiles (docker/<component>.Dockerfile) and
# their repositories (nanobox-<component>).
COMPONENTS = ["gateway", "scheduler", "template-builder", "node-agent"]


class Problems:
    """Collects every problem of a check, so that one run reports them all."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.add(message)
        return ok

    def exit_if_any(self) -> None:
        if self.items:
            print(f"{self.what}: {len(self.items)} problem(s):", file=sys.stderr)
            for item in self.items:
                print(f"  - {item}", file=sys.stderr)
            sys.exit(1)


def load_docs(text: str, origin: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of `text`."""
    try:
        return [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        raise SystemExit(f"{origin}: not valid YAML: {e}")


def render_chart(values: dict[str, Any], release: str = "nanobox",
                 namespace: str = "nanobox") -> dict[str, str]:
    """The chart rendered offline: template path -> text (NOTES.txt included)."""
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.render(values=values, name=release, namespace=namespace,
                            is_install=True)


def lint_chart(values: dict[str, Any]) -> list[str]:
    """helm lint --strict: warnings and errors (info messages such as "icon is
    recommended" are not problems)."""
    report = helm_python.lint(str(CHART), values, strict=True,
                              kube_version="v" + KUBE_VERSION)
    found = [f"{m['path']}: {m['error']}" for m in report.get("messages", [])
             if m.get("severity", 0) >= 2]
    found += list(report.get("errors", []))
    return found


def validate_docs(docs: Iterable[tuple[str, dict[str, Any]]], problems: Problems) -> int:
    """Validates each (origin, manifest) against the Kubernetes schemas (strict: unknown
    fields are errors). Returns how many were validated."""
    count = 0
    for origin, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if key in CUSTOM_KINDS:
            check_service_monitor(origin, doc, problems)
            count += 1
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            count += 1
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.add(f"{origin}: {name}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.add(f"{origin}: {name}: {e.message}")
    return count


def check_service_monitor(origin: str, doc: dict[str, Any], problems: Problems) -> None:
    """The fields of a ServiceMonitor the Prometheus Operator needs, typed."""
    spec = doc.get("spec", {})
    name = f"ServiceMonitor/{doc.get('metadata', {}).get('name')}"
    problems.check(isinstance(spec.get("selector", {}).get("matchLabels"), dict),
                   f"{origin}: {name}: spec.selector.matchLabels missing")
    endpoints = spec.get("endpoints")
    if problems.check(isinstance(endpoints, list) and endpoints,
                      f"{origin}: {name}: spec.endpoints missing"):
        for ep in endpoints:
            problems.check(isinstance(ep.get("port"), str),
                           f"{origin}: {name}: every endpoint needs a port name")
            for k in ("interval", "scrapeTimeout"):
                if k in ep:
                    problems.check(bool(re.fullmatch(r"(\d+(ms|s|m|h))+", str(ep[k]))),
                                   f"{origin}: {name}: {k} {ep[k]!r} is not a duration")


def validator_self_test() -> None:
    """kubernetes-validate must reject a broken manifest, or every pass means nothing."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {},
                    "bogus": True}}
    try:
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError:
        return
    raise SystemExit("kubernetes-validate accepted a broken Deployment: the tool is not working")


# --- nanobox.toml -------------------------------------------------------------------

def example_config() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE_CONFIG.read_text())


def toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def check_config_keys(config: dict[str, Any], origin: str, problems: Problems) -> None:
    """Every key of a rendered nanobox.toml is one the example (which a test keeps
    complete) has, with a value of the same TOML type: the services reject unknown keys,
    and Helm's own toToml would have turned integers into floats."""
    example = example_config()

    def walk(have: dict[str, Any], want: dict[str, Any], path: str) -> None:
        for key, value in have.items():
            where = f"{path}.{key}" if path else key
            if key not in want:
                problems.add(f"{origin}: [{path or '(top)'}] {key}: not a nanobox.toml key "
                             f"(libs/config/nanobox.example.toml has no such key)")
                continue
            expected = want[key]
            if isinstance(expected, list) and expected and isinstance(expected[0], dict):
                if problems.check(isinstance(value, list),
                                  f"{origin}: {where}: must be an array of tables"):
                    for i, item in enumerate(value):
                        walk(item, expected[0], f"{where}[{i}]")
                continue
            if isinstance(expected, dict):
                if problems.check(isinstance(value, dict), f"{origin}: {where}: must be a table"):
                    walk(value, expected, where)
                continue
            problems.check(toml_type(value) == toml_type(expected),
                           f"{origin}: {where} = {value!r}: {article(toml_type(value))}, but "
                           f"the key takes {article(toml_type(expected))}")

    walk(config, example, "")


def check_env_name(name: str, origin: str, problems: Problems) -> None:
    """NANOBOX__SECTION__KEY names a key of the example configuration."""
    if not name.startswith("NANOBOX__"):
        return
    parts = name[len("NANOBOX__"):].lower().split("__")
    example = example_config()
    if not problems.check(len(parts) == 2,
                          f"{origin}: {name}: expected NANOBOX__<SECTION>__<KEY>"):
        return
    section, key = parts
    problems.check(isinstance(example.get(section), dict) and key in example[section],
                   f"{origin}: {name}: [{section}] {key} is not a nanobox.toml key "
                   f"(libs/config/nanobox.example.toml); the service would refuse to start")


# --- Dockerfiles --------------------------------------------------------------------

def dockerfile(component: str) -> Path:
    return DOCKER / f"{component}.Dockerfile"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that ships)."""
    instructions = dockerfile_instructions(path)
    last = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    return instructions[last:]


def image_env(path: Path) -> dict[str, str]:
    """The ENV of the shipped stage (KEY=value pairs; values without spaces)."""
    env: dict[str, str] = {}
    for word, rest in final_stage(path):
        if word == "ENV":
            for item in rest.split():
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_entrypoint(path: Path) -> list[str]:
    import json
    for word, rest in reversed(final_stage(path)):
        if word == "ENTRYPOINT":
            return json.loads(rest)
    return []


def image_exposed(path: Path) -> set[int]:
    ports: set[int] = set()
    for word, rest in final_stage(path):
        if word == "EXPOSE":
            ports |= {int(p.split("/")[0]) for p in rest.split()}
    return ports


def prebuilt_sources(path: Path) -> list[str]:
    """Files the `prebuilt` stage copies from ${PREBUILT_DIR} in the context."""
    files: list[str] = []
    stage = None
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            stage = rest.split()[-1] if " AS " in rest.upper() else None
        elif word == "COPY" and stage == "prebuilt":
            args = [a for a in rest.split() if not a.startswith("--")]
            for src in args[:-1]:
                files.append(src.replace("${PREBUILT_DIR}/", ""))
    return files


def rel(path: Path | str) -> str:
    try:
        return os.path.relpath(path, ROOT)
    except ValueError:
        return str(path)
