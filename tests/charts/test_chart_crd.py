"""The chart's copy of the CRD is the CRD in crds/, and the CRD is a valid Kubernetes object."""

from __future__ import annotations

import shutil
import subprocess
import sys

import kubernetes_validate
import pytest

from chart_helpers import CRD_CHART_COPY, CRD_SOURCE, KUBE_VERSIONS, REPO, load_crd_source

SYNC_SCRIPT = REPO / "scripts" / "sync_crd.py"


def test_chart_copy_equals_the_crd():
    assert CRD_CHART_COPY.is_file(), "the chart has no copy of the CRD: run python scripts/sync_crd.py"
    assert CRD_CHART_COPY.read_bytes() == CRD_SOURCE.read_bytes(), (
        "charts/onlinemodel/files/ holds a stale CRD: run python scripts/sync_crd.py"
    )


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_crd_validates_against_the_kubernetes_schema(kube_version):
    kubernetes_validate.validate(load_crd_source(), kube_version, strict=True)


def test_crd_names_and_subresources():
    crd = load_crd_source()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "onlinemodels.onlinemodel.dev"
    assert spec["group"] == "onlinemodel.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "OnlineModel"
    assert spec["names"]["plural"] == "onlinemodels"
    assert "om" in spec["names"].get("shortNames", [])
    served = {v["name"]: v for v in spec["versions"] if v["served"]}
    assert "v1alpha1" in served and served["v1alpha1"]["storage"]
    assert "status" in served["v1alpha1"].get("subresources", {})


def _fake_repo(tmp_path, with_source: bool):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SYNC_SCRIPT, tmp_path / "scripts" / "sync_crd.py")
    if with_source:
        (tmp_path / "crds").mkdir()
        (tmp_path / "crds" / CRD_SOURCE.name).write_text("kind: CustomResourceDefinition\n")
    return tmp_path


def _sync(repo, *args):
    return subprocess.run([sys.executable, str(repo / "scripts" / "sync_crd.py"), *args],
                          capture_output=True, text=True, timeout=30)


def test_sync_script_copies_and_checks(tmp_path):
    repo = _fake_repo(tmp_path, with_source=True)
    copy = repo / "charts" / "onlinemodel" / "files" / CRD_SOURCE.name
    assert _sync(repo, "--check").returncode == 1
    assert _sync(repo).returncode == 0
    assert copy.read_text() == "kind: CustomResourceDefinition\n"
    assert _sync(repo, "--check").returncode == 0
    (repo / "crds" / CRD_SOURCE.name).write_text("kind: CustomResourceDefinition  # changed\n")
    stale = _sync(repo, "--check")
    assert stale.returncode == 1 and "stale" in stale.stderr


def test_sync_script_refuses_without_a_crd(tmp_path):
    result = _sync(_fake_repo(tmp_path, with_source=False))
    assert result.returncode == 2 and "does not exist" in result.stderr
