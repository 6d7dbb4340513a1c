"""deploy/validate.py (run by `make lint`) passes on the real files and catches each kind of mistake.

Each broken case edits a copy of deploy/ and expects the validator's line naming the problem, so a
check that stopped checking fails here. Compose cases need `docker compose` or `docker-compose`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice_common.metrics import QueueDepthCollector
from sluice_common.runs import QueueStats

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
import validate  # noqa: E402


def run(k8s: Path, compose: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "validate.py"), "--k8s", str(k8s), "--compose", str(compose)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(DEPLOY / "k8s", tmp_path / "k8s")
    shutil.copy(DEPLOY / "compose.yaml", tmp_path / "compose.yaml")
    return tmp_path


def edit(path: Path, change: Callable[[list[dict[str, Any]]], None]) -> None:
    docs = validate.load_all(path)
    change(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


def test_the_deploy_files_pass() -> None:
    result = run(DEPLOY / "k8s", DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stderr
    assert ": ok" in result.stdout


def _unknown_field(docs: list[dict[str, Any]]) -> None:
    find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}


def _scaled_object_typo(docs: list[dict[str, Any]]) -> None:
    find(docs, "ScaledObject")["spec"]["minReplicaCunt"] = 0


def _scaled_object_type(docs: list[dict[str, Any]]) -> None:
    find(docs, "ScaledObject")["spec"]["pollingInterval"] = "often"


def _writable_root(docs: list[dict[str, Any]]) -> None:
    find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"
    ] = False


def _no_wait(docs: list[dict[str, Any]]) -> None:
    del find(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]


def _no_limit(docs: list[dict[str, Any]]) -> None:
    del find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def _one_scheduler(docs: list[dict[str, Any]]) -> None:
    find(docs, "Deployment")["spec"]["replicas"] = 1


def _no_pdb(docs: list[dict[str, Any]]) -> None:
    docs.remove(find(docs, "PodDisruptionBudget"))


def _no_scale_to_zero(docs: list[dict[str, Any]]) -> None:
    find(docs, "ScaledObject")["spec"]["minReplicaCount"] = 1


@pytest.mark.parametrize(
    ("file", "change", "expected"),
    [
        ("api.yaml", _unknown_field, "livenesProbe"),
        ("worker.yaml", _scaled_object_typo, "minReplicaCunt"),
        ("worker.yaml", _scaled_object_type, "'often' is not of type 'integer'"),
        ("api.yaml", _writable_root, "readOnlyRootFilesystem must be true"),
        ("worker.yaml", _no_wait, "wait for the migrations"),
        ("scheduler.yaml", _no_limit, "memory limit"),
        ("scheduler.yaml", _one_scheduler, "two replicas"),
        ("api.yaml", _no_pdb, "Deployment sluice-api: no PodDisruptionBudget"),
        ("worker.yaml", _no_scale_to_zero, "scaling to zero"),
    ],
)
def test_a_broken_manifest_is_named(
    copy: Path, file: str, change: Callable[[list[dict[str, Any]]], None], expected: str
) -> None:
    edit(copy / "k8s" / file, change)
    problems = list(validate.check_k8s(copy / "k8s"))
    assert any(expected in p for p in problems), problems


def test_a_manifest_the_base_does_not_list_is_named(copy: Path) -> None:
    shutil.copy(copy / "k8s" / "api.yaml", copy / "k8s" / "extra.yaml")
    problems = list(validate.check_k8s(copy / "k8s"))
    assert any("extra.yaml: not listed in kustomization.yaml" in p for p in problems), problems


def test_a_changed_vendored_schema_is_refused(copy: Path) -> None:
    schema = copy / "k8s" / "schemas" / "keda.sh_scaledobjects.yaml"
    schema.write_text(schema.read_text().replace("minReplicaCount", "minimumReplicas"))
    problems = list(validate.check_k8s(copy / "k8s"))
    assert any("not the vendored file" in p for p in problems), problems


def test_the_worker_scales_on_gauges_the_api_exports() -> None:
    """The ScaledObject's query names only metrics that the queue collector really produces."""
    worker = validate.load_all(DEPLOY / "k8s" / "worker.yaml")
    query = find(worker, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    stats = QueueStats(
        waiting=3,
        active=2,
        completed=0,
        failed=0,
        delayed=0,
        waiting_by_priority={},
        concurrency=10,
        rate_limit_per_minute=100,
        rate_used=0,
        redis=True,
    )
    collector = QueueDepthCollector(lambda: stats)
    exported = {family.name for family in collector.collect()}
    named = {word for word in _words(query) if word.startswith("sluice_")}
    assert named, query
    assert named <= exported, named - exported


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c == "_" else " " for c in text).split()


# Skipped only outside CI: there, a missing compose tool fails these tests (`.ci/run` installs one).
needs_compose = pytest.mark.skipif(
    validate.compose_command() is None and not os.environ.get("CI"),
    reason="no docker compose / docker-compose (Debian package docker-compose)",
)


@needs_compose
def test_compose_without_the_secret_key_is_refused(copy: Path) -> None:
    compose = copy / "compose.yaml"
    compose.write_text(compose.read_text().replace("${SLUICE_SECRET_KEY:?", "${SLUICE_SECRET_KEY:-"))
    problems = list(validate.check_compose(compose))
    assert any("must refuse to start without SLUICE_SECRET_KEY" in p for p in problems), problems


@needs_compose
def test_compose_schema_errors_are_named(copy: Path) -> None:
    compose = copy / "compose.yaml"
    compose.write_text(compose.read_text().replace("stop_grace_period: 60s", "stop_grace_period: [60s]"))
    problems = list(validate.check_compose(compose))
    assert any("stop_grace_period" in p for p in problems), problems


def test_compose_start_order_is_checked(copy: Path) -> None:
    compose = copy / "compose.yaml"
    spec = yaml.safe_load(compose.read_text())
    spec["services"]["worker"]["depends_on"].pop("migrate")
    spec["services"]["scheduler"].pop("read_only")
    compose.write_text(yaml.safe_dump(spec))
    problems = list(validate.check_compose(compose))
    assert any("worker must start after migrate" in p for p in problems), problems
    assert any("scheduler must run on a read-only root" in p for p in problems), problems
