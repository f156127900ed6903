"""Checks of the Helm chart helm/nanobox, run by `cargo xtask check-deploy`:

  python chart.py OUT_DIR

For each set of values (the defaults; ci/external-values.yaml, external Postgres and S3;
helm/dev/values.yaml, Tilt's; and the node agent without `privileged`), it lints the
chart (helm lint --strict through the Helm SDK), renders it, validates every manifest
against the Kubernetes schemas (kubernetes-validate, offline, strict), and checks what a
schema cannot see: Services select a workload and name ports it has, probes and the
ServiceMonitor name real ports, referenced ConfigMaps and Secrets exist (or are declared
external in the values), the rendered nanobox.toml and every NANOBOX__ variable (chart
and images) name real keys with the right types, and each image's listen ports are the
ports the chart exposes. The rendered manifests of each set are written to
OUT_DIR/<set>/ for `trivy config`.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

import common
from common import Problems

VALUE_SETS: dict[str, Any] = {
    "default": {},
    "external": common.CHART / "ci" / "external-values.yaml",
    # Not "dev": trivy skips directories of that name.
    "tilt": common.ROOT / "helm" / "dev" / "values.yaml",
    "node-agent-unprivileged": {"nodeAgent": {"privileged": False}},
}


def load_values(spec: Any) -> dict[str, Any]:
    if isinstance(spec, Path):
        return yaml.safe_load(spec.read_text()) or {}
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"].get("containers", [])


def external_secrets(values: dict[str, Any], merged: dict[str, Any]) -> set[str]:
    """Secrets the values say exist outside the chart."""
    names = set()
    for key in ("database", "objectStore", "apiKeys", "serviceToken"):
        name = (merged.get(key) or {}).get("existingSecret")
        if name:
            names.add(name)
    return names


def check_render(case: str, values: dict[str, Any], out: Path) -> int:
    problems = Problems(f"chart with {case} values")
    for finding in common.lint_chart(values):
        problems.add(f"helm lint: {finding}")

    rendered = common.render_chart(values)
    out.mkdir(parents=True, exist_ok=True)
    docs: list[tuple[str, dict[str, Any]]] = []
    for template, text in sorted(rendered.items()):
        if not template.endswith(".yaml"):
            continue
        name = Path(template).name
        (out / name).write_text(text)
        docs += [(f"{case}:{name}", d) for d in common.load_docs(text, template)]
    problems.check(bool(docs), "the chart rendered nothing")

    count = common.validate_docs(docs, problems)

    with common.helm_python.Chart.load(str(common.CHART)) as chart:
        merged = chart.merge_values(values)
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    workloads = {n: w for k in common.WORKLOAD_KINDS for n, w in by_kind.get(k, {}).items()}
    configmaps = set(by_kind.get("ConfigMap", {}))
    secrets = set(by_kind.get("Secret", {})) | external_secrets(values, merged)

    # Every component is there, as the kind it should be, from its own image.
    expected_kind = {"gateway": "Deployment", "scheduler": "Deployment",
                     "template-builder": "Deployment", "node-agent": "DaemonSet"}
    for component, kind in expected_kind.items():
        name = f"nanobox-{component}"
        w = by_kind.get(kind, {}).get(name)
        if not problems.check(w is not None, f"no {kind} {name}"):
            continue
        image = containers(w)[0]["image"]
        repo = image.rsplit("/", 1)[-1].split(":")[0]
        problems.check(repo == f"nanobox-{component}",
                       f"{kind} {name} runs {image}, not the nanobox-{component} image")
        check_ports_against_image(component, w, problems)

    # Services select one workload each and name ports it has.
    for name, svc in by_kind.get("Service", {}).items():
        selector = svc["spec"].get("selector", {})
        matched = [w for w in workloads.values()
                   if selector and selector.items() <=
                   w["spec"]["template"]["metadata"].get("labels", {}).items()]
        if not problems.check(len(matched) == 1,
                              f"Service {name} selects {len(matched)} workloads, not one"):
            continue
        port_names = {p.get("name") for c in containers(matched[0]) for p in c.get("ports", [])}
        port_numbers = {p["containerPort"] for c in containers(matched[0])
                        for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            problems.check(target in port_names or target in port_numbers,
                           f"Service {name}: targetPort {target!r} is no port of "
                           f"{matched[0]['metadata']['name']}")

    # The ServiceMonitor's port is on the Services it selects.
    for name, sm in by_kind.get("ServiceMonitor", {}).items():
        sel = sm["spec"]["selector"]["matchLabels"]
        selected = [s for s in by_kind.get("Service", {}).values()
                    if sel.items() <= s["metadata"].get("labels", {}).items()]
        problems.check(len(selected) == 4,
                       f"ServiceMonitor {name} selects {len(selected)} Services, not the four")
        for ep in sm["spec"]["endpoints"]:
            for s in selected:
                problems.check(ep["port"] in {p.get("name") for p in s["spec"]["ports"]},
                               f"ServiceMonitor {name}: Service {s['metadata']['name']} has "
                               f"no port {ep['port']!r}")

    for wname, w in workloads.items():
        pod = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                problems.check(v["configMap"]["name"] in configmaps,
                               f"{wname}: volume {v['name']} uses ConfigMap "
                               f"{v['configMap']['name']}, which is not rendered")
            if "secret" in v:
                problems.check(v["secret"]["secretName"] in secrets,
                               f"{wname}: volume {v['name']} uses Secret "
                               f"{v['secret']['secretName']}, neither rendered nor external")
        for c in pod.get("containers", []):
            ports = {p.get("name") for p in c.get("ports", [])} | \
                {p["containerPort"] for p in c.get("ports", [])}
            for m in c.get("volumeMounts", []):
                problems.check(m["name"] in volumes, f"{wname}: mount of unknown volume {m['name']}")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if not problems.check(probe is not None, f"{wname}: no {probe_name}"):
                    continue
                for kind in ("grpc", "httpGet", "tcpSocket"):
                    if kind in probe:
                        problems.check(probe[kind]["port"] in ports,
                                       f"{wname}: {probe_name} probes port "
                                       f"{probe[kind]['port']!r}, which it does not expose")
            for e in c.get("env", []):
                common.check_env_name(e["name"], f"{wname}: env", problems)
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    problems.check(ref["name"] in secrets,
                                   f"{wname}: env {e['name']} reads Secret {ref['name']}, "
                                   f"neither rendered nor external")

    # nanobox.toml: valid TOML, real keys, right types.
    cm = by_kind.get("ConfigMap", {}).get("nanobox-config")
    if problems.check(cm is not None, "no ConfigMap nanobox-config"):
        try:
            config = tomllib.loads(cm["data"]["nanobox.toml"])
            common.check_config_keys(config, f"{case}: nanobox.toml", problems)
        except tomllib.TOMLDecodeError as e:
            problems.add(f"the rendered nanobox.toml is not TOML: {e}")

    problems.exit_if_any()
    print(f"chart ({case}): lint clean, {count} manifests valid for Kubernetes "
          f"{common.KUBE_VERSION}, references and nanobox.toml consistent")
    return count


def check_ports_against_image(component: str, workload: dict[str, Any],
                              problems: Problems) -> None:
    """The ports the chart exposes are the ones the image listens on (its NANOBOX__ env),
    and the image's variables name real keys."""
    path = common.dockerfile(component)
    env = common.image_env(path)
    for key in env:
        common.check_env_name(key, common.rel(path), problems)
    listen = {int(v.rsplit(":", 1)[1]) for k, v in env.items()
              if k.startswith("NANOBOX__") and k.endswith("_ADDR") and v.startswith("0.0.0.0:")}
    declared = {p["containerPort"] for p in containers(workload)[0].get("ports", [])}
    problems.check(listen == declared,
                   f"nanobox-{component}: the chart exposes {sorted(declared)}, the image "
                   f"listens on {sorted(listen)} ({common.rel(path)})")
    problems.check(common.image_exposed(path) == listen,
                   f"{common.rel(path)}: EXPOSE {sorted(common.image_exposed(path))} differs "
                   f"from its listen addresses {sorted(listen)}")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: chart.py OUT_DIR")
    out = Path(sys.argv[1])
    common.validator_self_test()
    total = 0
    for case, spec in VALUE_SETS.items():
        total += check_render(case, load_values(spec), out / case)
    print(f"chart: {len(VALUE_SETS)} value sets, {total} manifests")


if __name__ == "__main__":
    main()
