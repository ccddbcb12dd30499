"""values.schema.json closes every level of values, and values.yaml documents every value."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import helm_python as helm
import pytest
import yaml

from chart_helpers import CHART_DIR, RELEASE

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
VALUES_TEXT = (CHART_DIR / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
NO_CRD = {"crds": {"install": False, "keep": True}}


def _object_schemas(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if schema.get("type") == "object" and "properties" in schema:
        yield path, schema
        for key, sub in schema["properties"].items():
            yield from _object_schemas(sub, f"{path}.{key}")
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        yield from _object_schemas(schema["items"], f"{path}[]")


def test_every_object_in_the_schema_is_closed():
    paths = []
    for path, schema in _object_schemas(SCHEMA):
        assert schema.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
        paths.append(path)
    assert len(paths) > 15


def test_defaults_pass_the_schema(chart):
    chart.validate_schema(None)
    chart.validate_schema(VALUES)


def _with_unknown_key(path: str) -> dict[str, Any]:
    """Values with an unknown key `bogus` inside the object at `path` ('' is the root, [] an array item)."""
    parts = [p for p in re.split(r"\.", path) if p]
    root: dict[str, Any] = {}
    node = root
    for part in parts:
        if part.endswith("[]"):
            name = part[:-2]
            item: dict[str, Any] = {}
            node[name] = [item]
            node = item
            continue
        node[part] = {}
        node = node[part]
    node["bogus"] = 1
    return root


@pytest.mark.parametrize("path", [p for p, _ in _object_schemas(SCHEMA)], ids=lambda p: p or "<root>")
def test_unknown_key_at_any_level_fails_the_render(chart, path):
    values = _with_unknown_key(path)
    with pytest.raises(helm.HelmValuesError, match="additional properties 'bogus' not allowed"):
        chart.render(values, name=RELEASE)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "watchNamespaces"),
        ({"operator": {"healthPort": 0}}, "healthPort"),
        ({"operator": {"logLevel": "chatty"}}, "logLevel"),
        ({"operator": {"pollIntervalSeconds": 0}}, "pollIntervalSeconds"),
        ({"crds": {"install": "yes"}}, "install"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.render({**NO_CRD, **values}, name=RELEASE)


def test_lint_reports_bad_values():
    report = helm.lint(CHART_DIR, {"image": {"tagg": "1.0"}}, namespace="x")
    assert any("additional properties 'tagg' not allowed" in e for e in report["errors"]), report


# Blocks whose content is a Kubernetes type (documented as a whole by the comment above the block).
KUBERNETES_TYPED = {"resources", "podSecurityContext", "securityContext", "affinity"}


def _key_lines() -> Iterator[tuple[int, int, str]]:
    for number, line in enumerate(VALUES_TEXT.splitlines()):
        match = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if match:
            yield number, len(match.group(1)), match.group(2)


def test_every_value_is_documented():
    """Each value (a key whose value is not a block of documented keys) has a comment right above it."""
    lines = VALUES_TEXT.splitlines()
    parents: list[tuple[int, str]] = []
    undocumented = []
    keys = list(_key_lines())
    for position, (number, indent, key) in enumerate(keys):
        parents = [(i, k) for i, k in parents if i < indent]
        path = ".".join([k for _, k in parents] + [key])
        parents.append((indent, key))
        if any(k in KUBERNETES_TYPED for _, k in parents[:-1]):
            continue
        following = keys[position + 1] if position + 1 < len(keys) else None
        is_block = following is not None and following[1] > indent and lines[number].rstrip().endswith(":")
        if is_block and key not in KUBERNETES_TYPED:
            continue  # a block of values, each documented
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#"):
            undocumented.append(path)
    assert not undocumented, f"values without a comment in values.yaml: {undocumented}"


def _leaf_paths(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    properties = schema.get("properties")
    if schema.get("type") == "object" and properties and path.split(".")[-1] not in KUBERNETES_TYPED:
        for key, sub in properties.items():
            yield from _leaf_paths(sub, f"{path}.{key}" if path else key)
    else:
        yield path


def test_schema_and_values_yaml_declare_the_same_values():
    def present(path: str) -> bool:
        node: Any = VALUES
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [p for p in _leaf_paths(SCHEMA) if not present(p)]
    assert not missing, f"values.schema.json declares values that values.yaml lacks: {missing}"
