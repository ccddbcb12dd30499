"""The CRD and the pydantic models agree (one source of truth); schema and CEL refuse bad specs alike.

(That every manifest in examples/ validates is tests/charts/test_example_manifests.py.)"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from onlinemodel_operator.crd import CRD_FILENAME, build_crd, render_crd_yaml
from onlinemodel_operator.models import OnlineModel
from onlinemodel_operator.models_spec import parse_spec
from onlinemodel_operator.models_status import ModelChangedStatus, OnlineModelStatus, SecretKeyStatus
from onlinemodel_protocol import limits

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / CRD_FILENAME


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_file_is_generated_from_the_models() -> None:
    assert CRD_PATH.read_text() == render_crd_yaml(), (
        "crds/ is stale: run `PYTHONPATH=operator python -m onlinemodel_operator.crd crds/" + CRD_FILENAME + "`")


def _model_of(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...], else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _model_of(arg)
        if inner is not None:
            return inner
    return None


def _compare(cls: type[BaseModel], schema: dict[str, Any], path: str) -> None:
    props = schema.get("properties", {})
    aliases = {f.alias or n: f for n, f in cls.model_fields.items()}
    if cls is OnlineModel:
        props = {k: v for k, v in props.items() if k != "metadata"}
        aliases.pop("metadata")
    assert set(props) == set(aliases), f"{path}: CRD {sorted(props)} vs model {sorted(aliases)}"
    required = {a for a, f in aliases.items() if f.is_required()}
    assert set(schema.get("required", [])) == required, path
    for alias, field in aliases.items():
        sub = props[alias]
        nested = _model_of(field.annotation)
        if nested is not None:
            _compare(nested, sub["items"] if sub.get("type") == "array" else sub, f"{path}.{alias}")


def test_crd_schema_and_models_agree_field_by_field() -> None:
    _compare(OnlineModel, crd_schema(), "")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The API server's structural defaulting (defaults of absent properties, recursively)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def test_crd_defaults_equal_model_defaults() -> None:
    spec_schema = crd_schema()["properties"]["spec"]
    minimal = {"model": {"source": {"image": {"path": "/m"}}}, "image": "i"}
    assert apply_defaults(spec_schema, minimal) == parse_spec(minimal).to_dict()


def validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 bounds (boolean exclusiveMinimum) are draft-4 JSON Schema; x-kubernetes-* keys are ignored.
    return jsonschema.Draft4Validator(crd_schema())


def cel_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    found = [(path, schema, rule) for rule in schema.get("x-kubernetes-validations", [])]
    for key, sub in schema.get("properties", {}).items():
        found += cel_rules(sub, f"{path}.{key}")
    if "items" in schema:
        found += cel_rules(schema["items"], f"{path}[]")
    return found


def _values_at(obj: Any, path: str) -> list[Any]:
    values = [obj]
    for part in [p for p in path.replace("[]", ".[]").split(".") if p]:
        nxt: list[Any] = []
        for v in values:
            if part == "[]":
                nxt.extend(v if isinstance(v, list) else [])
            elif isinstance(v, dict) and part in v:
                nxt.append(v[part])
        values = nxt
    return values


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """Messages of the CEL rules `obj` (after defaulting) breaks, evaluated like the API server does."""
    env = celpy.Environment()
    errors = []
    for path, _, rule in cel_rules(crd_schema()):
        program = env.program(env.compile(rule["rule"]))
        for value in _values_at(obj, path):
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                errors.append(rule["message"])
    return errors


def full_object(spec: dict[str, Any], name: str = "m") -> dict[str, Any]:
    obj = {"apiVersion": "onlinemodel.dev/v1alpha1", "kind": "OnlineModel", "metadata": {"name": name},
           "spec": spec}
    return apply_defaults(crd_schema(), obj)


def api_server_refuses(spec: dict[str, Any], name: str = "m") -> list[str]:
    obj = full_object(spec, name)
    return [e.message for e in validator().iter_errors(obj)] + cel_errors(obj)


def operator_refuses(spec: dict[str, Any], name: str = "m") -> bool:
    try:
        OnlineModel.model_validate({"metadata": {"name": name}, "spec": spec})
    except ValidationError:
        return True
    return False


GOOD = {"model": {"source": {"image": {"path": "/m"}}}, "image": "i"}


def with_(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    spec.update(changes)
    return spec


BAD_SPECS = {
    "two sources": with_(model={"source": {"image": {"path": "/m"}, "huggingFace": {"id": "a/b"}}}),
    "no source": with_(model={"source": {}}),
    "relative image path": with_(model={"source": {"image": {"path": "m"}}}),
    "managed flag in extraArgs": with_(serving={"extraArgs": ["--port=9000"]}),
    "managed flag --model": with_(serving={"extraArgs": ["--model", "x"]}),
    "managed flag with vLLM's underscores": with_(serving={"extraArgs": ["--served_model_name", "x"]}),
    # resources.gpus sets the tensor parallel size; pipeline parallelism is not supported.
    "tensor parallel size in extraArgs": with_(serving={"extraArgs": ["--tensor-parallel-size", "2"]}),
    "tensor parallel size with =": with_(serving={"extraArgs": ["--tensor-parallel-size=2"]}),
    "tensor parallel size with underscores": with_(serving={"extraArgs": ["--tensor_parallel_size=2"]}),
    "-tp": with_(serving={"extraArgs": ["--enforce-eager", "-tp", "2"]}),
    "-tp=": with_(serving={"extraArgs": ["-tp=2"]}),
    "pipeline parallel size": with_(serving={"extraArgs": ["--pipeline-parallel-size", "2"]}),
    "-pp": with_(serving={"extraArgs": ["-pp", "2"]}),
    "gpus above 16": with_(resources={"gpus": 17}),
    "claim and size": with_(checkpoint={"volume": {"existingClaim": "c", "size": "1Gi"}}),
    "claim and class": with_(checkpoint={"volume": {"existingClaim": "c", "storageClassName": "fast"}}),
    "token env": with_(pod={"env": [{"name": "ONLINEMODEL_API_TOKEN", "value": "x"}]}),
    "value and valueFrom": with_(pod={"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {}}}]}),
    "reserved label": with_(pod={"labels": {"onlinemodel.dev/name": "x"}}),
    "negative lr": with_(training={"learningRate": -1}),
    "lr zero": with_(training={"learningRate": 0}),
    "lr above the runtime's bound": with_(training={"learningRate": limits.LEARNING_RATE_MAX * 1.5}),
    "rank above the runtime's bound": with_(training={"optimizerRank": limits.OPTIMIZER_RANK_MAX + 1}),
    "examples above the runtime's ceiling": with_(training={"maxExamplesPerRequest": limits.MAX_EXAMPLES_CEILING + 1}),
    "default epochs above the runtime's max": with_(training={"defaultEpochs": limits.MAX_EPOCHS_DEFAULT + 1}),
    "body size 0": with_(training={"maxBodyBytes": 0}),
    "keepLast above the runtime's max": with_(checkpoint={"keepLast": limits.CHECKPOINT_KEEP_MAX + 1}),
    "negative everySteps": with_(checkpoint={"everySteps": -1}),
    "negative everySeconds": with_(checkpoint={"everySeconds": -1}),
    "gpu fraction > 1": with_(serving={"gpuMemoryUtilization": 1.5}),
    "port 0": with_(serving={"port": 0}),
    "bad quantity": with_(resources={"memory": "lots"}),
    "bad pull policy": with_(imagePullPolicy="Sometimes"),
    "keepLast 0": with_(checkpoint={"keepLast": 0}),
    "no image": {"model": GOOD["model"]},
    "short startup": with_(serving={"startupTimeoutSeconds": 10}),
    "slowdown below 1": with_(training={"maxDecodeSlowdown": 0.5}),
    "negative slowdown": with_(training={"maxDecodeSlowdown": -1}),
    "slowdown too large": with_(training={"maxDecodeSlowdown": 1000}),
    "anchors without the anchor term": with_(training={"anchorWeight": 0, "anchors": {"configMapRef": {"name": "a"}}}),
    "anchors without a ConfigMap name": with_(training={"anchors": {"configMapRef": {"key": "a.yaml"}}}),
    "anchors with a bad key": with_(training={"anchors": {"configMapRef": {"name": "a", "key": "a/b"}}}),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_refused_by_api_server_and_operator_alike(case: str) -> None:
    spec = BAD_SPECS[case]
    assert api_server_refuses(spec), f"the CRD accepts {case}"
    assert operator_refuses(spec), f"the operator accepts {case}"


def test_cel_messages_are_clear() -> None:
    assert cel_errors(full_object(BAD_SPECS["two sources"])) == [
        "model.source: set exactly one of huggingFace, volume or image"]
    assert any("existingClaim cannot be combined" in m for m in cel_errors(full_object(BAD_SPECS["claim and size"])))
    (tp,) = cel_errors(full_object(BAD_SPECS["-tp"]))
    assert "--tensor-parallel-size (-tp)" in tp and "resources.gpus" in tp


@pytest.mark.parametrize("name,ok", [("m", True), ("qwen3-0-6b", True), ("Bad", False), ("1abc", False),
                                     ("a" * 64, False), ("a.b", False)])
def test_name_rule(name: str, ok: bool) -> None:
    assert bool(cel_errors(full_object(GOOD, name))) is not ok
    assert operator_refuses(GOOD, name) is not ok


def test_good_specs_pass_both() -> None:
    specs = [GOOD, with_(model={"source": {"huggingFace": {"id": "Qwen/Qwen3-0.6B", "revision": "main"}},
                                "servedName": "qwen"},
                         resources={"gpus": 2, "memory": "64Gi", "cpu": 8, "shmSize": "16Gi"},
                         serving={"port": 9000, "maxModelLen": 4096, "gpuMemoryUtilization": 0.8,
                                  "extraArgs": ["--enforce-eager", "--portable", "--model-impl", "vllm",
                                                "--enable-expert-parallel", "-O3"]},
                         training={"learningRate": limits.LEARNING_RATE_MAX, "optimizerRank": 1,
                                   "maxExamplesPerRequest": 64, "defaultEpochs": limits.MAX_EPOCHS_DEFAULT,
                                   "maxBodyBytes": 1024, "apiTokenSecretRef": {"name": "tok"},
                                   "maxDecodeSlowdown": 1.5},
                         checkpoint={"everySteps": 0, "everySeconds": 0, "keepLast": 5, "startOver": True,
                                     "volume": {"size": "100Gi", "storageClassName": "fast",
                                                "deleteWithModel": True}},
                         suspend=True,
                         pod={"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                              "tolerations": [{"operator": "Exists"}], "labels": {"team": "ml"}})]
    specs += [with_(training={"maxDecodeSlowdown": 0}), with_(training={"maxDecodeSlowdown": 1}),
              with_(training={"anchors": {"configMapRef": {"name": "a"}}}),
              with_(training={"anchorWeight": 8, "anchors": {"configMapRef": {"name": "a", "key": "k.json"}}})]
    for spec in specs:
        assert api_server_refuses(spec) == []
        assert not operator_refuses(spec)


EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_both(path: Path) -> None:
    (document,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert api_server_refuses(document["spec"], document["metadata"]["name"]) == []
    assert not operator_refuses(document["spec"], document["metadata"]["name"])


def test_the_examples_are_found() -> None:
    assert {p.name for p in EXAMPLES} >= {"minimal.yaml", "huggingface-gpu.yaml", "tensor-parallel-gpu.yaml"}


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for part in path.split("."):
        schema = schema["properties"][part]
    return schema


# CRD field -> (the runtime's default, its lowest value, its highest value), all from protocol.limits: what
# `onlinemodel serve` (RuntimeConfig) accepts, the CRD accepts, and a spec without the field gets its default.
LIMITS = {
    "training.learningRate": (limits.LEARNING_RATE_DEFAULT, 0, limits.LEARNING_RATE_MAX),
    "training.optimizerRank": (limits.OPTIMIZER_RANK_DEFAULT, 1, limits.OPTIMIZER_RANK_MAX),
    "training.maxExamplesPerRequest": (limits.MAX_EXAMPLES_DEFAULT, 1, limits.MAX_EXAMPLES_CEILING),
    "training.defaultEpochs": (limits.EPOCHS_DEFAULT, 1, limits.MAX_EPOCHS_DEFAULT),
    "training.replayExamples": (limits.REPLAY_EXAMPLES_DEFAULT, 0, limits.REPLAY_EXAMPLES_MAX),
    "training.anchorWeight": (limits.ANCHOR_WEIGHT_DEFAULT, 0, limits.ANCHOR_WEIGHT_MAX),
    "training.nullSpaceEnergy": (limits.NULL_SPACE_ENERGY_DEFAULT, 0, limits.NULL_SPACE_ENERGY_MAX),
    "checkpoint.keepLast": (limits.CHECKPOINT_KEEP_DEFAULT, 1, limits.CHECKPOINT_KEEP_MAX),
    "checkpoint.everySteps": (limits.CHECKPOINT_EVERY_STEPS_DEFAULT, 0, None),
    "checkpoint.everySeconds": (limits.CHECKPOINT_EVERY_SECONDS_DEFAULT, 0, None),
    # 0 is off; (0, 1) is refused by a CEL rule ("slowdown below 1" in BAD_SPECS)
    "training.maxDecodeSlowdown": (limits.MAX_DECODE_SLOWDOWN_DEFAULT, limits.DECODE_SLOWDOWN_OFF,
                                   limits.MAX_DECODE_SLOWDOWN_MAX),
    "replicas": (limits.REPLICAS_DEFAULT, 1, limits.REPLICAS_MAX),
    "replication.syncIntervalSeconds": (limits.SYNC_INTERVAL_DEFAULT, limits.SYNC_INTERVAL_MIN,
                                        limits.SYNC_INTERVAL_MAX),
}


@pytest.mark.parametrize("path", sorted(LIMITS))
def test_crd_bounds_and_defaults_are_the_protocol_limits(path: str) -> None:
    default, lowest, highest = LIMITS[path]
    field = _at(crd_schema()["properties"]["spec"], path)
    assert field["default"] == default
    assert field["minimum"] == lowest
    assert field.get("maximum") == highest
    assert not field.get("exclusiveMaximum")  # every upper bound is inclusive, as RuntimeConfig's
    # The learning rate is the one open lower bound (> 0), as in RuntimeConfig and the API.
    assert bool(field.get("exclusiveMinimum")) is (path == "training.learningRate")


def test_the_body_size_default_is_the_runtimes() -> None:
    field = _at(crd_schema()["properties"]["spec"], "training.maxBodyBytes")
    assert "default" not in field and str(limits.MAX_BODY_BYTES_DEFAULT) in field["description"]


def test_the_highest_values_are_accepted_by_the_runtime_config() -> None:
    """The CRD's upper bounds, rendered into `onlinemodel serve` flags, pass RuntimeConfig (no crash loop)."""
    from onlinemodel_protocol.config import RuntimeConfig

    cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om"),
                        **{name: LIMITS[path][2] for name, path in (
                            ("learning_rate", "training.learningRate"), ("optimizer_rank", "training.optimizerRank"),
                            ("max_examples", "training.maxExamplesPerRequest"),
                            ("default_epochs", "training.defaultEpochs"), ("checkpoint_keep", "checkpoint.keepLast"),
                            ("replay_examples", "training.replayExamples"),
                            ("anchor_weight", "training.anchorWeight"),
                            ("null_space_energy", "training.nullSpaceEnergy"),
                            ("max_decode_slowdown", "training.maxDecodeSlowdown"))})
    assert cfg.learning_rate == limits.LEARNING_RATE_MAX


def test_status_schema_accepts_what_the_operator_writes() -> None:
    from datetime import datetime, timezone

    from onlinemodel_operator.status import compute_status

    body = {"metadata": {"name": "m", "generation": 2}, "spec": GOOD, "status": {}}
    status = compute_status(body, None, None, datetime.now(timezone.utc), endpoint="http://m.ns.svc:8000",
                            desired_hash="h", api_token_secret=SecretKeyStatus(name="m-api-token", key="token"),
                            model_changed=ModelChangedStatus(spec_hash="h", message="another base model",
                                                             time="2026-11-26T05:00:00Z")).to_dict()
    assert {"apiTokenSecret", "modelChanged"} <= set(status)
    obj = full_object(GOOD)
    obj["status"] = status
    assert [e.message for e in validator().iter_errors(obj)] == []
    assert OnlineModelStatus.model_validate(status).conditions[0].type == "Ready"


def test_build_crd_shape() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "onlinemodels.onlinemodel.dev"
    assert crd["spec"]["names"]["shortNames"] == ["om"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Reason", "Steps", "Loss", "Last checkpoint", "Replicas", "Lag", "Age",
                             "Endpoint", "Pod"]
    assert columns["Lag"]["jsonPath"] == ".status.replicas.maxLagSeconds"
    assert columns["Endpoint"]["priority"] == 1 and columns["Pod"]["priority"] == 1
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
