"""Paths and small helpers shared by the chart tests (a plain module: conftest names collide across dirs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "onlinemodel"
CRD_NAME = "onlinemodel.dev_onlinemodels.yaml"
CRD_SOURCE = REPO / "crds" / CRD_NAME
CRD_CHART_COPY = CHART_DIR / "files" / CRD_NAME
EXAMPLES_DIR = REPO / "examples"
DOCKER_DIR = REPO / "docker"

RELEASE = "om"
NAMESPACE = "onlinemodel-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ("1.29.0", "1.37.0")

RenderFn = Callable[..., list[dict[str, Any]]]


def load_crd_source() -> dict[str, Any]:
    return yaml.safe_load(CRD_SOURCE.read_text())


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


class KubeYamlLoader(yaml.SafeLoader):
    """YAML as Helm and the Kubernetes tools (Go) read it: `3e-05`, which Helm's toYaml writes for a small
    float, is a number (YAML 1.2), not the string PyYAML's YAML 1.1 rules make of it."""


KubeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"), list("-+0123456789."))
