"""Every additionalPrinterColumn of the CRD, evaluated as kubectl does against statuses the real status
functions render for representative cases: no column is empty where it should have a value, and each
value has the column's type. Also what `kubectl wait --for=condition=Ready` needs."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Optional

import pytest

from onlinemodel_operator.crd import PRINTER_COLUMNS, build_crd
from onlinemodel_operator.models_status import CheckpointStatus
from onlinemodel_operator.status import RuntimeUnavailable, compute_status
from onlinemodel_operator.models_spec import parse_spec
from onlinemodel_operator.replicas import replicas_status
from test_operator_replicas import OWNER, UP, base, learner_status, seen
from test_operator_status import HASH, NOW, om, pod, runtime

_FILTER = re.compile(r'^\[\?\(@\.(\w+)=="([^"]*)"\)\]')
_FIELD = re.compile(r"^\.(\w+)")


def jsonpath(obj: Any, path: str) -> Any:
    """kubectl's JSONPath for the forms printer columns use: `.a.b` and `.a[?(@.k=="v")].c`. None: empty."""
    rest = path
    while rest:
        if obj is None:
            return None
        match = _FILTER.match(rest)
        if match:
            key, value = match.groups()
            obj = next((item for item in obj if isinstance(item, dict) and str(item.get(key)) == value), None)
        else:
            match = _FIELD.match(rest)
            assert match, f"unsupported JSONPath {path!r} at {rest!r}"
            obj = obj.get(match.group(1)) if isinstance(obj, dict) else None
        rest = rest[match.end():]
    return obj


def resource(status, **spec: Any) -> dict[str, Any]:
    body = om(**spec)
    body["metadata"]["creationTimestamp"] = "2026-11-26T04:00:00Z"
    return {**body, "status": status.to_dict()}


TRAINED = runtime("training", checkpoint={"state": "idle", "last": {"path": "/ck/step-00000012", "step": 12,
                                                                   "time": "2026-11-26T04:58:00Z"}})
SCALED = learner_status(seen("chat-follower-1", 9, 0.0), seen("chat-follower-2", 7, 42.5))
SCALED_SPEC = base(replicas=3)


def scaled_out():
    body = {"metadata": {"name": "chat", "namespace": "ml", "generation": 3}, "spec": SCALED_SPEC}
    return compute_status(body, pod(), SCALED, NOW, desired_hash=HASH, endpoint="http://chat.ml.svc:8000",
                          replicas=replicas_status(parse_spec(SCALED_SPEC), pod(), {1: UP, 2: UP}, SCALED, OWNER))


ONE_REPLICA = {"Replicas", "Lag"}  # one replica: no status.replicas (the learner serves alone)
CASES = {
    # case: (status, the columns that are rightly empty)
    "ready, training, checkpointed": (lambda: compute_status(om(), pod(), TRAINED, NOW, desired_hash=HASH,
                                                             endpoint="http://m.ns.svc:8000"), ONE_REPLICA),
    "ready, scaled out, followers reporting": (scaled_out, {"Last checkpoint", "Loss"}),  # not trained yet
    "ready, no checkpoint yet": (lambda: compute_status(om(), pod(), runtime(), NOW, desired_hash=HASH,
                                                        endpoint="http://m.ns.svc:8000"),
                                 {"Last checkpoint"} | ONE_REPLICA),
    "pod pending, never trained": (lambda: compute_status(om(), pod(phase="Pending", ready=False), None, NOW,
                                                          desired_hash=HASH, endpoint="http://m.ns.svc:8000"),
                                   {"Steps", "Loss", "Last checkpoint"} | ONE_REPLICA),
    "runtime unreachable, numbers kept": (
        lambda: compute_status(om(status=compute_status(om(), pod(), TRAINED, NOW, desired_hash=HASH).to_dict()),
                               pod(), RuntimeUnavailable("timeout"), NOW, desired_hash=HASH,
                               endpoint="http://m.ns.svc:8000"), ONE_REPLICA),
    "invalid spec": (lambda: compute_status(om(), None, None, NOW, spec_error="spec.image: required"),
                     {"Steps", "Loss", "Last checkpoint", "Endpoint", "Pod"} | ONE_REPLICA),
    "suspended with a checkpoint": (
        lambda: compute_status(om(suspend=True, status={"checkpoint": CheckpointStatus(
            step=3, time="2026-11-26T03:00:00Z", path="/ck/3").to_dict()}), None, None, NOW, desired_hash=HASH,
            endpoint="http://m.ns.svc:8000"), {"Steps", "Loss", "Pod"} | ONE_REPLICA),
}


def _typed(column: dict[str, Any], value: Any) -> bool:
    kind = column["type"]
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "date":
        return isinstance(value, str) and dt.datetime.fromisoformat(value.replace("Z", "+00:00")) is not None
    return isinstance(value, str) and value != ""


def test_the_crd_serves_the_columns_tested_here():
    (version,) = build_crd()["spec"]["versions"]
    assert version["additionalPrinterColumns"] == PRINTER_COLUMNS


@pytest.mark.parametrize("case", CASES)
def test_every_column_resolves_against_a_rendered_status(case):
    make, empty = CASES[case]
    obj = resource(make())
    values = {column["name"]: jsonpath(obj, column["jsonPath"]) for column in PRINTER_COLUMNS}
    assert {name for name, value in values.items() if value is None} == empty, values
    for column in PRINTER_COLUMNS:
        if values[column["name"]] is not None:
            assert _typed(column, values[column["name"]]), (column, values[column["name"]])
    assert values["Ready"] in ("True", "False", "Unknown") and values["Reason"]


@pytest.mark.parametrize("case", CASES)
def test_kubectl_wait_for_ready_sees_the_generation_it_was_computed_for(case):
    status = resource(CASES[case][0]())["status"]
    ready = jsonpath({"status": status}, '.status.conditions[?(@.type=="Ready")]')
    assert ready["observedGeneration"] == status["observedGeneration"] == 3
    assert ready["status"] == ("True" if case.startswith("ready") else "False")


def test_jsonpath_reads_filters_and_missing_fields():
    obj: dict[str, Optional[Any]] = {"status": {"conditions": [{"type": "A", "status": "x"}]}}
    assert jsonpath(obj, '.status.conditions[?(@.type=="A")].status') == "x"
    assert jsonpath(obj, '.status.conditions[?(@.type=="B")].status') is None
    assert jsonpath(obj, ".status.training.steps") is None
