"""Evaluates the repository's Tiltfile against stand-ins of Tilt's builtins and checks
what it declares. Run by `cargo xtask check-deploy` (no Tilt, Docker or cluster here):

  python tiltfile.py

The Tiltfile runs in a real Starlark interpreter (starlark-go). The stand-ins take the
same parameters as Tilt's functions (an unknown keyword fails as it would in Tilt),
record each call, and do the work that can be done offline: helm() renders the chart
with the Helm SDK, k8s_yaml() reads the manifests. Then the checks: every service image
is built from its Dockerfile's `prebuilt` stage with the files that stage copies in its
context, live update syncs each binary to the path the image runs it from and restarts
it, the images the manifests run are exactly the images built, the resources and their
dependencies exist, the gateway and the gRPC services are port-forwarded to ports their
containers expose, the local build command exists, and every manifest is valid.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path
from typing import Any

import starlark_go

import common
from common import Problems

TILTFILE = common.ROOT / "Tiltfile"

# Extensions the Tiltfile may load, and the symbols each provides.
EXTENSIONS = {"ext://restart_process": {"docker_build_with_restart"}}

# What must be forwarded: resource -> local port (the container port must match it).
REQUIRED_FORWARDS = {"nanobox-gateway": 8080, "nanobox-scheduler": 50051,
                     "nanobox-template-builder": 50061}


class Tilt:
    """The stand-in builtins and what the Tiltfile declared through them."""

    def __init__(self) -> None:
        self.images: dict[str, dict[str, Any]] = {}
        self.local_resources: dict[str, dict[str, Any]] = {}
        self.k8s_resources: dict[str, dict[str, Any]] = {}
        self.objects: list[tuple[str, dict[str, Any]]] = []
        self.problems = Problems("Tiltfile")

    # --- builtins -------------------------------------------------------------------

    def docker_build(self, ref, context, build_args=None, dockerfile="Dockerfile",
                     dockerfile_contents="", live_update=None, match_in_env_vars=False,
                     ignore=None, only=None, entrypoint=None, target="", ssh="",
                     network="", secret="", extra_tag="", container_args=None,
                     cache_from=None, pull=False, platform="", extra_hosts=None):
        self.problems.check(ref not in self.images, f"image {ref} is built twice")
        self.images[ref] = {
            "context": context, "build_args": dict(build_args or {}),
            "dockerfile": dockerfile, "live_update": list(live_update or []),
            "only": list(only or []), "entrypoint": entrypoint, "restart": False,
        }

    def docker_build_with_restart(self, ref, context, entrypoint, live_update,
                                  base_suffix="-tilt_docker_build_with_restart_base",
                                  restart_file="/tmp/.restart-proc", trigger=None,
                                  exit_policy="restart", **kwargs):
        # The extension builds the image, then wraps the entrypoint so that the process
        # restarts after each live update.
        self.docker_build(ref, context, live_update=live_update, **kwargs)
        self.images[ref]["restart"] = True
        self.images[ref]["entrypoint"] = entrypoint

    def sync(self, local_path, remote_path):
        return {"step": "sync", "local": local_path, "remote": remote_path}

    def run(self, cmd, trigger=None, echo_off=False):
        return {"step": "run", "cmd": cmd, "trigger": trigger or []}

    def fall_back_on(self, files):
        return {"step": "fall_back_on", "files": files}

    def local_resource(self, name, cmd="", deps=None, trigger_mode=None,
                       resource_deps=None, ignore=None, auto_init=True, serve_cmd="",
                       cmd_bat="", serve_cmd_bat="", allow_parallel=False, links=None,
                       tags=None, env=None, serve_env=None, readiness_probe=None, dir="",
                       serve_dir="", labels=None):
        self.problems.check(name not in self.local_resources, f"local_resource {name} twice")
        self.local_resources[name] = {"cmd": cmd, "deps": list(deps or []),
                                      "resource_deps": list(resource_deps or [])}

    def helm(self, paths, name="", namespace="", values=None, set=None, kube_version="",
             skip_crds=False):
        merged: dict[str, Any] = {}
        for path in values or []:
            import yaml
            merged = deep_merge(merged, yaml.safe_load((common.ROOT / path).read_text()) or {})
        self.problems.check(Path(common.ROOT / paths).resolve() == common.CHART,
                            f"helm() renders {paths}, not helm/nanobox")
        rendered = common.render_chart(merged, release=name or "nanobox",
                                       namespace=namespace or "default")
        return "\n---\n".join(text for path, text in sorted(rendered.items())
                              if path.endswith(".yaml"))

    def k8s_yaml(self, yaml_, allow_duplicates=False):
        items = yaml_ if isinstance(yaml_, list) else [yaml_]
        for item in items:
            path = common.ROOT / item
            if "\n" not in item and path.is_file():
                self.objects += [(item, d) for d in common.load_docs(path.read_text(), item)]
            else:
                self.objects += [("helm()", d) for d in common.load_docs(item, "helm()")]

    def k8s_resource(self, workload="", new_name="", port_forwards=None,
                     extra_pod_selectors=None, trigger_mode=None, resource_deps=None,
                     objects=None, auto_init=True, pod_readiness="", links=None,
                     labels=None, discovery_strategy=""):
        self.problems.check(workload not in self.k8s_resources,
                            f"k8s_resource {workload} configured twice")
        forwards = port_forwards if isinstance(port_forwards, list) else \
            ([port_forwards] if port_forwards is not None else [])
        self.k8s_resources[workload] = {
            "port_forwards": [parse_forward(f) for f in forwards],
            "resource_deps": list(resource_deps or []),
        }

    def port_forward(self, local_port, container_port=None, name=None, link_path=None,
                     host=None):
        return {"local": local_port, "container": container_port or local_port, "name": name}

    def globals(self) -> dict[str, Any]:
        names = ["docker_build", "sync", "run", "fall_back_on", "local_resource", "helm",
                 "k8s_yaml", "k8s_resource", "port_forward"]
        return {n: getattr(self, n) for n in names}


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_forward(f: Any) -> dict[str, Any]:
    if isinstance(f, dict):
        return f
    if isinstance(f, int):
        return {"local": f, "container": f, "name": None}
    local, _, container = str(f).partition(":")
    return {"local": int(local), "container": int(container or local), "name": None}


def strip_loads(source: str, tilt: Tilt) -> tuple[str, dict[str, Any]]:
    """starlark-go here has no load(): each `load('ext://...', ...)` statement is checked
    against the known extensions, blanked (line numbers stay), and its symbols provided."""
    provided: dict[str, Any] = {}
    lines = source.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^load\((.*)\)\s*$", line)
        if not m:
            continue
        args = ast.literal_eval(f"({m.group(1)},)")
        module, symbols = args[0], args[1:]
        if not tilt.problems.check(module in EXTENSIONS, f"line {i + 1}: unknown extension {module}"):
            continue
        for sym in symbols:
            if tilt.problems.check(sym in EXTENSIONS[module],
                                   f"line {i + 1}: {module} has no {sym}"):
                provided[sym] = getattr(tilt, sym)
        lines[i] = ""
    return "\n".join(lines) + "\n", provided


def check(tilt: Tilt) -> None:
    p = tilt.problems

    # Images: one per service, built from its Dockerfile's prebuilt stage.
    expected = {f"nanobox-{c}": c for c in common.COMPONENTS}
    p.check(set(tilt.images) == set(expected),
            f"images built: {sorted(tilt.images)}, expected {sorted(expected)}")
    for ref, img in tilt.images.items():
        component = expected.get(ref)
        if component is None:
            continue
        dockerfile = common.ROOT / img["dockerfile"]
        if not p.check(dockerfile == common.dockerfile(component),
                       f"{ref}: built from {img['dockerfile']}, not {common.rel(common.dockerfile(component))}"):
            continue
        args = img["build_args"]
        p.check(args.get("BINARIES") == "prebuilt", f"{ref}: BINARIES is not prebuilt")
        stage_dir = args.get("PREBUILT_DIR", "target/docker")
        only = set(img["only"])
        for src in common.prebuilt_sources(dockerfile):
            p.check(f"{stage_dir}/{src}" in only,
                    f"{ref}: the prebuilt stage copies {stage_dir}/{src}, which `only` leaves "
                    f"out of the context")
        entrypoint = common.image_entrypoint(dockerfile)
        p.check(img["entrypoint"] == entrypoint,
                f"{ref}: restarts {img['entrypoint']}, the image runs {entrypoint}")
        p.check(img["restart"], f"{ref}: live update does not restart the process")
        syncs = [s for s in img["live_update"] if s.get("step") == "sync"]
        binary = entrypoint[0] if entrypoint else ""
        synced = {s["remote"]: s["local"] for s in syncs}
        if p.check(binary in synced, f"{ref}: live update does not sync {binary}"):
            local = synced[binary]
            p.check(local == f"{stage_dir}/{os.path.basename(binary)}",
                    f"{ref}: syncs {local} to {binary}")
            p.check(local in only, f"{ref}: synced {local} is not in the build context (`only`)")
        p.check("BIN_OWNER" in args, f"{ref}: BIN_OWNER not set: live update could not "
                "replace a root-owned binary as the service's user")

    # The binaries are built by a local resource that exists and is executable.
    builders = [r for r in tilt.local_resources.values() if "docker/stage.sh" in r["cmd"]]
    if p.check(len(builders) == 1, "no local_resource runs docker/stage.sh"):
        stage = common.DOCKER / "stage.sh"
        p.check(os.access(stage, os.X_OK), "docker/stage.sh is not executable")
        for dep in builders[0]["deps"]:
            p.check((common.ROOT / dep).exists(), f"local_resource dep {dep} does not exist")

    # Manifests: valid, and they run exactly the images built.
    count = common.validate_docs(tilt.objects, p)
    workloads = {d["metadata"]["name"]: d for _, d in tilt.objects
                 if d.get("kind") in common.WORKLOAD_KINDS}
    used = set()
    for name, w in workloads.items():
        for c in w["spec"]["template"]["spec"]["containers"]:
            repo = c["image"].rsplit("/", 1)[-1].split(":")[0]
            if repo.startswith("nanobox-"):
                used.add(repo)
                p.check(repo in tilt.images, f"{name} runs {c['image']}, which Tilt does not build")
    for ref in tilt.images:
        p.check(ref in used, f"image {ref} is built but no manifest runs it")
    p.check({"Namespace"} <= {d["kind"] for _, d in tilt.objects}, "no Namespace deployed")

    # Resources, dependencies, port-forwards.
    known = set(workloads) | set(tilt.local_resources)
    for name, res in tilt.k8s_resources.items():
        p.check(name in workloads, f"k8s_resource {name}: no such workload")
        for dep in res["resource_deps"]:
            p.check(dep in known, f"k8s_resource {name}: depends on unknown resource {dep}")
        w = workloads.get(name)
        ports = {port["containerPort"] for c in (w["spec"]["template"]["spec"]["containers"] if w else [])
                 for port in c.get("ports", [])}
        for f in res["port_forwards"]:
            p.check(f["container"] in ports,
                    f"k8s_resource {name}: forwards to port {f['container']}, which it does not expose")
    for name, port in REQUIRED_FORWARDS.items():
        forwards = tilt.k8s_resources.get(name, {}).get("port_forwards", [])
        p.check(any(f["local"] == port and f["container"] == port for f in forwards),
                f"{name}: no port-forward {port}:{port}")

    p.exit_if_any()
    print(f"Tiltfile: {len(tilt.images)} images (prebuilt, live update with restart), "
          f"{len(tilt.local_resources)} local resource, {len(tilt.k8s_resources)} resources, "
          f"{sum(len(r['port_forwards']) for r in tilt.k8s_resources.values())} port-forwards, "
          f"{count} manifests valid")
    for name, res in sorted(tilt.k8s_resources.items()):
        fw = ", ".join(f"{f['local']}->{f['container']}" for f in res["port_forwards"]) or "-"
        print(f"  {name:28} forwards {fw:14} after {', '.join(res['resource_deps']) or '-'}")


def main() -> None:
    # Tilt's dialect: top-level for/if and global reassignment, sets, recursion.
    starlark_go.configure_starlark(allow_set=True, allow_global_reassign=True,
                                   allow_recursion=True)
    tilt = Tilt()
    source, provided = strip_loads(TILTFILE.read_text(), tilt)
    env = tilt.globals()
    env.update(provided)
    printed: list[str] = []
    try:
        starlark_go.Starlark(globals=env).exec(source, filename="Tiltfile",
                                               print=printed.append)
    except starlark_go.StarlarkError as e:
        raise SystemExit(f"Tiltfile: evaluation failed: {e}")
    for line in printed:
        print(f"Tiltfile print: {line}")
    check(tilt)


if __name__ == "__main__":
    main()
