"""Every manifest in examples/ is one `kubectl apply` would accept: OnlineModels validate against the
CRD's structural schema (unknown fields rejected, as kubectl's default --validate=strict does), other
objects against the Kubernetes schemas."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from chart_helpers import EXAMPLES_DIR, KUBE_VERSIONS, load_crd_source
from onlinemodel_operator.models import OnlineModel
from onlinemodel_operator.models_spec import parse_spec
from onlinemodel_operator.render import Owner, render_all, render_token_secret

EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.yaml"))
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 structural schema (as in a CRD) as a JSON Schema with the API server's rules:
    unknown fields are errors unless x-kubernetes-preserve-unknown-fields, `nullable` allows null,
    x-kubernetes-int-or-string allows both. x-kubernetes-validations (CEL) are checked elsewhere."""
    schema = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-validations")}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key == "not":
            out[key] = to_json_schema(value)
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = out.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    if (schema.get("type") == "object" and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
            and not schema.get("x-kubernetes-embedded-resource")):
        out["additionalProperties"] = False
    # OpenAPI 3.0 writes exclusive bounds as booleans beside minimum/maximum; JSON Schema as numbers.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), bool):
            if out.pop(exclusive) and bound in out:
                out[exclusive] = out.pop(bound)
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(version: str) -> jsonschema.Validator:
    schema = copy.deepcopy(crd_schema(version))
    # The API server validates metadata itself; the CRD schema may leave these out.
    schema.setdefault("properties", {})
    for field in ("apiVersion", "kind"):
        schema["properties"].setdefault(field, {"type": "string"})
    schema["properties"]["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    converted = to_json_schema(schema)
    jsonschema.Draft202012Validator.check_schema(converted)
    return jsonschema.Draft202012Validator(converted)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The API server's structural defaulting: a missing property with a `default` gets it, then its
    own properties are defaulted in turn (CEL rules see the defaulted object)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(schema["additionalProperties"], value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value[:] = [apply_defaults(schema["items"], item) for item in value]
    return value


@functools.cache
def _cel_program(rule: str):
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Messages of the x-kubernetes-validations rules that `value` breaks (evaluated with cel-python)."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not bool(_cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})):
            failures.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in value:
                failures += cel_failures(sub, value[name], f"{path}.{name}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            failures += cel_failures(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{index}]")
    return failures


@functools.cache
def crd_schema(version: str) -> dict[str, Any]:
    (served,) = [v for v in load_crd_source()["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in EXAMPLE_FILES:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                documents.append((f"{path.name}#{index}", doc))
    return documents


def test_there_are_examples():
    names = {p.name for p in EXAMPLE_FILES}
    assert {"minimal.yaml", "huggingface-gpu.yaml", "existing-pvc.yaml"} <= names, names


def test_converter_rejects_unknown_fields_and_accepts_int_or_string():
    schema = to_json_schema({
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "port": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
            "fraction": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
        },
    })
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"a": {"b": 1}, "free": {"x": 1}, "port": "http", "maybe": None})
    assert validator.is_valid({"port": 8000})
    assert not validator.is_valid({"a": {"c": 1}})
    assert not validator.is_valid({"extra": 1})
    assert validator.is_valid({"fraction": 1}) and not validator.is_valid({"fraction": 0})


@pytest.mark.parametrize("where, document", example_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_example_would_be_accepted(where, document):
    api_version = document.get("apiVersion", "")
    if api_version.startswith("onlinemodel.dev/"):
        assert document["kind"] == "OnlineModel"
        version = api_version.split("/", 1)[1]
        errors = sorted(crd_validator(version).iter_errors(document), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)
        name = document["metadata"]["name"]
        # The operator names the Service after the OnlineModel, and Service names are DNS-1035 labels.
        assert DNS_1035_LABEL.match(name) and len(name) <= 63, name
        assert "status" not in document
        defaulted = apply_defaults(crd_schema(version), copy.deepcopy(document))
        assert not cel_failures(crd_schema(version), defaulted)
        # The operator validates specs the same way (for API servers and fakes that skip CEL).
        OnlineModel.model_validate(document)
    else:
        for kube_version in KUBE_VERSIONS:
            kubernetes_validate.validate(document, kube_version, strict=True)


@pytest.mark.parametrize("where, document", [(w, d) for w, d in example_documents() if d.get("kind") == "OnlineModel"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_what_the_operator_makes_of_an_example_is_valid(where, document):
    """The Pod, Service, PVC and API-token Secret the operator renders for each example pass the Kubernetes
    schemas."""
    body = copy.deepcopy(document)
    body["metadata"].update(namespace="default", uid="0f5c7d9e-1111-2222-3333-444455556666")
    owner = Owner.from_body(body)
    desired = render_all(owner, parse_spec(body["spec"]))
    objects = [desired.pod, desired.service] + ([desired.pvc] if desired.pvc else [])
    if desired.generates_token:
        objects.append(render_token_secret(owner, "a-random-token"))
    for obj in objects:
        for kube_version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, kube_version, strict=True)
    (container,) = desired.pod["spec"]["containers"]
    # The runtime image's ENTRYPOINT is `onlinemodel serve`; the operator states it explicitly as well.
    assert container["command"] == ["onlinemodel", "serve"]


def test_cel_check_catches_a_bad_spec():
    """The CEL evaluation above is not vacuous: a spec with two model sources breaks a rule."""
    schema = crd_schema("v1alpha1")
    (where, document) = next((w, d) for w, d in example_documents() if w.startswith("minimal.yaml"))
    bad = copy.deepcopy(document)
    bad["spec"]["model"]["source"]["image"] = {"path": "/models/x"}
    assert cel_failures(schema, apply_defaults(schema, bad))
    assert not cel_failures(schema, apply_defaults(schema, copy.deepcopy(document)))


def test_examples_cover_the_documented_cases():
    models = {where.split("#")[0]: doc for where, doc in example_documents() if doc.get("kind") == "OnlineModel"}
    assert set(models) >= {"minimal.yaml", "huggingface-gpu.yaml", "existing-pvc.yaml"}
    minimal = models["minimal.yaml"]
    assert set(minimal["spec"]) <= {"model", "image"}, "the minimal example sets only what has no default"
