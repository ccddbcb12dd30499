"""Fixtures of the Helm chart tests: the real Helm engine (helm-python-sdk) loads and renders the chart."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
import yaml

from chart_helpers import CHART_DIR, NAMESPACE, RELEASE, KubeYamlLoader, RenderFn


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart) -> RenderFn:
    """Render the chart with Helm's engine; returns its manifests (NOTES.txt left out) as objects."""

    def _render(values: dict[str, Any] | None = None, **options: Any) -> list[dict[str, Any]]:
        options.setdefault("name", RELEASE)
        options.setdefault("namespace", NAMESPACE)
        rendered = chart.render(values, **options)
        manifests: list[dict[str, Any]] = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            manifests.extend(doc for doc in yaml.load_all(text, KubeYamlLoader) if doc)
        return manifests

    return _render
