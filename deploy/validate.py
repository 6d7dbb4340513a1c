"""Offline checks of deploy/: what `make lint` runs on the Kubernetes manifests and the compose file.

- Kubernetes: every manifest the Kustomize base lists (and no other) is validated against the
  Kubernetes schemas of the oldest and the newest version we support (`kubernetes-validate`,
  strict: an unknown field is an error); KEDA's ScaledObject, which those schemas do not know,
  against KEDA's own CRD schema, vendored in deploy/k8s/schemas at a pinned version and checksum.
  Then the rules each workload keeps: non-root, read-only root, no privilege escalation, no
  capabilities, resources requested, probes, new pods held until the migrations are in, a
  PodDisruptionBudget per Deployment, autoscaling for the API and the worker, two schedulers.
- Compose: `docker compose config` (or Debian's `docker-compose`) parses and validates the file,
  once with the secret key set and once without, which must fail; and the start order holds: a
  migration service that runs once, the services after it, each on a read-only root.

Exit status 1 with one line per problem. `python deploy/validate.py --k8s DIR --compose FILE`
checks other copies (the tests break copies on purpose).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

HERE = Path(__file__).resolve().parent
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
# Custom resources: (apiVersion, kind) -> (vendored CRD file, its sha256).
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): (
        "keda.sh_scaledobjects.yaml",
        "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80",
    ),
}
IMAGES = {"sluice-api", "sluice-worker", "sluice-scheduler"}
SERVICES = ("api", "worker", "scheduler")

Doc = dict[str, Any]


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# Kubernetes ------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schema(schemas: Path, api_version: str, kind: str) -> Any:
    filename, sha256 = CRDS[(api_version, kind)]
    data = (schemas / filename).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{filename}: not the vendored file (sha256 differs)")
    crd = yaml.safe_load(data)
    version = api_version.split("/")[1]
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(found["schema"]["openAPIV3Schema"])
    # The Kubernetes API server fills these in for every object; the CRD does not describe them.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"]["apiVersion"] = {"type": "string"}
    schema["properties"]["kind"] = {"type": "string"}
    return schema


def validate_schemas(where: str, doc: Doc, schemas: Path) -> Iterator[str]:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            key = (doc.get("apiVersion", ""), doc.get("kind", ""))
            if key not in CRDS:
                yield f"{where}: no schema for {key[0]} {key[1]} (neither Kubernetes {version} nor vendored)"
                return
            try:
                jsonschema.validate(doc, crd_schema(schemas, *key))
            except (jsonschema.ValidationError, ValueError) as exc:
                path = "/".join(str(p) for p in getattr(exc, "absolute_path", ()))
                yield f"{where}: {getattr(exc, 'message', exc)}" + (f" (at {path})" if path else "")
            return
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            yield f"{where}: Kubernetes {version}: {exc.message}" + (f" (at {path})" if path else "")


def pod_rules(where: str, doc: Doc) -> Iterator[str]:
    spec = doc["spec"]["template"]["spec"]
    if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
        yield f"{where}: the pod must set securityContext.runAsNonRoot: true"
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    for c in containers:
        name = f"{where} container {c.get('name')}"
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            yield f"{name}: readOnlyRootFilesystem must be true"
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"{name}: allowPrivilegeEscalation must be false"
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            yield f"{name}: capabilities must drop ALL"
        res = c.get("resources", {})
        if not {"cpu", "memory"} <= set(res.get("requests", {})) or "memory" not in res.get("limits", {}):
            yield f"{name}: needs requests for cpu and memory and a memory limit"
        if c.get("image", "").split(":")[0] not in IMAGES:
            yield f"{name}: image {c.get('image')!r} is not one of {sorted(IMAGES)} (the base's images: field)"
    if doc["kind"] == "Deployment":
        inits = [c.get("command", []) for c in spec.get("initContainers", [])]
        if ["sluice", "migrate", "--wait"] not in [cmd[:3] for cmd in inits]:
            yield f"{where}: new pods must wait for the migrations (an init container `sluice migrate --wait`)"
        for c in spec.get("containers", []):
            if "livenessProbe" not in c:
                yield f"{where} container {c.get('name')}: needs a livenessProbe"


def selects(selector: Doc, labels: Doc) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def check_k8s(k8s: Path) -> Iterator[str]:
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml"}
    for name in sorted(present - listed):
        yield f"{k8s / name}: not listed in kustomization.yaml's resources"
    for name in sorted(listed - present):
        yield f"kustomization.yaml: lists {name}, which does not exist"

    docs: list[tuple[str, Doc]] = []
    for name in sorted(listed & present):
        for doc in load_all(k8s / name):
            where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            docs.append((where, doc))
            yield from validate_schemas(where, doc, k8s / "schemas")
            if doc.get("kind") in ("Deployment", "Job"):
                yield from pod_rules(where, doc)

    by_kind: dict[str, list[Doc]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc.get("kind", ""), []).append(doc)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    for service in SERVICES:
        if f"sluice-{service}" not in deployments:
            yield f"no Deployment sluice-{service}"
    if not by_kind.get("Job"):
        yield "no migration Job"
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if not any(selects(p["spec"]["selector"], labels) for p in by_kind.get("PodDisruptionBudget", [])):
            yield f"Deployment {name}: no PodDisruptionBudget selects its pods"
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    if "sluice-api" not in hpa_targets:
        yield "the API needs a HorizontalPodAutoscaler"
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind.get("ScaledObject", [])}
    worker = scaled.get("sluice-worker")
    if worker is None:
        yield "the worker needs a KEDA ScaledObject"
    elif worker["spec"].get("minReplicaCount", 1) != 0:
        yield "the worker's ScaledObject must allow scaling to zero (minReplicaCount: 0)"
    for name in ("sluice-api", "sluice-worker"):
        if name in deployments and "replicas" in deployments[name]["spec"]:
            yield f"Deployment {name}: leave replicas to its autoscaler (each apply would reset it)"
    scheduler = deployments.get("sluice-scheduler")
    if scheduler is not None and scheduler["spec"].get("replicas", 1) < 2:
        yield "the scheduler runs two replicas (one leads, the other takes over)"


# Compose ---------------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def check_compose(path: Path) -> Iterator[str]:
    spec = yaml.safe_load(path.read_text())
    services = spec.get("services", {})
    if "migrate" not in services:
        yield f"{path}: no migrate service"
    for name in SERVICES:
        svc = services.get(name)
        if svc is None:
            yield f"{path}: no {name} service"
            continue
        if svc.get("depends_on", {}).get("migrate", {}).get("condition") != "service_completed_successfully":
            yield f"{path}: {name} must start after migrate has completed successfully"
        if svc.get("read_only") is not True:
            yield f"{path}: {name} must run on a read-only root (read_only: true)"

    command = compose_command()
    if command is None:
        message = "no `docker compose` nor `docker-compose`: the compose file was not validated"
        if os.environ.get("CI"):
            yield message
        else:
            print(f"validate: {message} (Debian package docker-compose; CI installs it)")
        return
    base = [*command, "--project-directory", str(path.parent), "-f", str(path), "config", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_SECRET_KEY"}
    ok = subprocess.run(base, env={**env, "SLUICE_SECRET_KEY": "validate"}, capture_output=True, text=True)
    if ok.returncode != 0:
        yield f"{path}: {' '.join(command[-2:])} config: {(ok.stderr or ok.stdout).strip()}"
    missing = subprocess.run(base, env=env, capture_output=True, text=True)
    if missing.returncode == 0 or "SLUICE_SECRET_KEY" not in missing.stderr + missing.stdout:
        yield f"{path}: must refuse to start without SLUICE_SECRET_KEY"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k8s", type=Path, default=HERE / "k8s")
    parser.add_argument("--compose", type=Path, default=HERE / "compose.yaml")
    args = parser.parse_args()
    problems = [*check_k8s(args.k8s), *check_compose(args.compose)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"validate: {args.k8s} (Kubernetes {', '.join(K8S_VERSIONS)}) and {args.compose}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
