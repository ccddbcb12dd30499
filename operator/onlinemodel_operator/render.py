"""Pure rendering: an OnlineModel (metadata + validated spec) -> the desired Pod, Service and PVC dicts.

No I/O here. Every object carries the OnlineModel's labels and a controller owner reference, except a
checkpoint claim with `retain: true` (it must outlive the resource) and an existing claim (never ours).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from onlinemodel_operator import (
    API_VERSION,
    KIND,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    SPEC_HASH_ANNOTATION,
)
from onlinemodel_operator.models import API_TOKEN_ENV, OnlineModelSpec

CONTAINER_NAME = "runtime"
PORT_NAME = "http"
CHECKPOINT_DIR = "/var/lib/onlinemodel/checkpoints"
MODEL_VOLUME_DIR = "/var/lib/onlinemodel/model"
DEFAULT_CHECKPOINT_SIZE = "20Gi"
STARTUP_PROBE_PERIOD = 10
HEALTH_PATH = "/health"


@dataclass(frozen=True)
class Owner:
    """The identity of the OnlineModel that owns the rendered objects."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> "Owner":
        meta = body.get("metadata", {})
        return cls(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""))

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def pod_name(owner: Owner) -> str:
    return owner.name


def service_name(owner: Owner) -> str:
    return owner.name


def checkpoint_claim_name(owner: Owner, spec: OnlineModelSpec) -> str:
    return spec.checkpoint.volume.existing_claim or f"{owner.name}-checkpoints"


def endpoint(owner: Owner, spec: OnlineModelSpec) -> str:
    return f"http://{service_name(owner)}.{owner.namespace}.svc:{spec.serving.port}"


def selector_labels(owner: Owner) -> dict[str, str]:
    return {NAME_LABEL: owner.name}


def made_for(obj: Mapping[str, Any], name: str) -> bool:
    """Whether `obj` carries the label this module puts on what it renders for the OnlineModel `name`."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(NAME_LABEL) == name


def common_labels(owner: Owner) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "onlinemodel",
        "app.kubernetes.io/instance": owner.name,
        MANAGED_BY_LABEL: MANAGED_BY,
        **selector_labels(owner),
    }


def spec_hash(spec: OnlineModelSpec) -> str:
    """Hash of everything in the spec that shapes the pod (suspend and volume retention do not)."""
    data = spec.to_dict()
    data.pop("suspend", None)
    data.get("checkpoint", {}).get("volume", {}).pop("retain", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_argument(spec: OnlineModelSpec) -> str:
    source = spec.model.source
    if source.hugging_face is not None:
        return source.hugging_face.id
    if source.volume is not None:
        return posixpath.join(MODEL_VOLUME_DIR, source.volume.path) if source.volume.path else MODEL_VOLUME_DIR
    assert source.image is not None  # ModelSource validates exactly one
    return source.image.path


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(value)


def prestop_timeout(spec: OnlineModelSpec) -> int:
    """Seconds the preStop checkpoint may take: half the grace period (SIGTERM's final one gets 30%)."""
    return max(10, spec.pod.termination_grace_period_seconds // 2)


def final_checkpoint_timeout(spec: OnlineModelSpec) -> int:
    return max(5, spec.pod.termination_grace_period_seconds * 3 // 10)


def serve_args(owner: Owner, spec: OnlineModelSpec) -> list[str]:
    """Arguments of `onlinemodel serve` (its options: README.md, "Quickstart (runtime)")."""
    args = ["--model", model_argument(spec),
            "--served-model-name", spec.model.served_name or owner.name,
            "--host", "0.0.0.0", "--port", str(spec.serving.port),
            "--checkpoint-dir", CHECKPOINT_DIR,
            "--checkpoint-keep", str(spec.checkpoint.keep_last),
            "--final-checkpoint-timeout", str(final_checkpoint_timeout(spec))]
    if spec.checkpoint.every_steps is not None:
        args += ["--checkpoint-every-steps", str(spec.checkpoint.every_steps)]
    if spec.checkpoint.every_seconds is not None:
        args += ["--checkpoint-every-seconds", str(spec.checkpoint.every_seconds)]
    training = spec.training
    if not training.enabled:
        args.append("--no-training")
    else:
        if training.learning_rate is not None:
            args += ["--learning-rate", _num(training.learning_rate)]
        if training.optimizer_rank is not None:
            args += ["--optimizer-rank", str(training.optimizer_rank)]
        if training.max_examples_per_request is not None:
            args += ["--max-examples", str(training.max_examples_per_request)]
        if training.max_decode_slowdown is not None:
            args += ["--max-decode-slowdown", _num(training.max_decode_slowdown) if training.max_decode_slowdown
                     else "off"]
    if spec.serving.max_model_len is not None:
        args += ["--max-model-len", str(spec.serving.max_model_len)]
    if spec.serving.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", _num(spec.serving.gpu_memory_utilization)]
    extra = list(spec.serving.extra_args)
    hf = spec.model.source.hugging_face
    if hf is not None and hf.revision:
        extra = ["--revision", hf.revision, *extra]
    if extra:
        args += ["--", *extra]
    return args


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _container_env(spec: OnlineModelSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if spec.training.api_token_secret_ref is not None:
        env.append(_secret_env(API_TOKEN_ENV, spec.training.api_token_secret_ref))
    hf = spec.model.source.hugging_face
    if hf is not None and hf.token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", hf.token_secret_ref))
    env.extend(e.to_dict() for e in spec.pod.env)
    return env


def _resources(spec: OnlineModelSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.gpus:
        limits[res.gpu_resource_name] = res.gpus
    if res.cpu is not None:
        requests["cpu"] = res.cpu
    if res.memory is not None:
        requests["memory"] = res.memory
        limits["memory"] = res.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(failure_threshold: int, period: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": HEALTH_PATH, "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failure_threshold}


def render_pod(owner: Owner, spec: OnlineModelSpec) -> dict[str, Any]:
    port = spec.serving.port
    mounts = [{"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoint_claim_name(owner, spec)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
    ]
    source = spec.model.source
    if source.volume is not None:
        mounts.append({"name": "model", "mountPath": MODEL_VOLUME_DIR, "readOnly": True})
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source.volume.claim_name,
                                                                    "readOnly": True}})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["onlinemodel", "serve"],
        "args": serve_args(owner, spec),
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": _container_env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # Loading (and compiling) a model takes minutes: only the startup probe may wait that long.
        "startupProbe": _probe(math.ceil(spec.serving.startup_timeout_seconds / STARTUP_PROBE_PERIOD),
                               STARTUP_PROBE_PERIOD, 5),
        "readinessProbe": _probe(3, 10, 5),
        # Generous: a busy engine answers /health late, and a restart costs a model load.
        "livenessProbe": _probe(6, 30, 10),
        # The preStop hook takes a checkpoint before SIGTERM (which takes a final one too); both fit in
        # the grace period, which the kubelet enforces on the hook and the process together.
        "lifecycle": {"preStop": {"exec": {"command": [
            "onlinemodel", "checkpoint", "--url", f"http://127.0.0.1:{port}",
            "--timeout", str(prestop_timeout(spec))]}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": spec.pod.termination_grace_period_seconds,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
    }
    overrides = spec.pod
    if overrides.node_selector:
        pod_spec["nodeSelector"] = dict(overrides.node_selector)
    if overrides.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in overrides.tolerations]
    if overrides.affinity:
        pod_spec["affinity"] = dict(overrides.affinity)
    for key, value in (("runtimeClassName", overrides.runtime_class_name),
                       ("priorityClassName", overrides.priority_class_name),
                       ("serviceAccountName", overrides.service_account_name)):
        if value:
            pod_spec[key] = value
    if overrides.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.to_dict() for s in overrides.image_pull_secrets]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(owner),
            "namespace": owner.namespace,
            "labels": {**overrides.labels, **common_labels(owner)},
            "annotations": {**overrides.annotations, SPEC_HASH_ANNOTATION: spec_hash(spec)},
            "ownerReferences": [owner.reference()],
        },
        "spec": pod_spec,
    }


def render_service(owner: Owner, spec: OnlineModelSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(owner), "namespace": owner.namespace,
                     "labels": common_labels(owner), "ownerReferences": [owner.reference()]},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner),
            "ports": [{"name": PORT_NAME, "port": spec.serving.port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def render_pvc(owner: Owner, spec: OnlineModelSpec) -> dict[str, Any] | None:
    """The checkpoint claim the operator creates, or None when the spec names an existing claim."""
    volume = spec.checkpoint.volume
    if volume.existing_claim:
        return None
    meta: dict[str, Any] = {"name": checkpoint_claim_name(owner, spec), "namespace": owner.namespace,
                            "labels": common_labels(owner)}
    if not volume.retain:
        meta["ownerReferences"] = [owner.reference()]
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": volume.size or DEFAULT_CHECKPOINT_SIZE}}}
    if volume.storage_class_name:
        pvc_spec["storageClassName"] = volume.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}


@dataclass(frozen=True)
class Desired:
    pod: dict[str, Any]
    service: dict[str, Any]
    pvc: dict[str, Any] | None
    spec_hash: str
    endpoint: str


def render_all(owner: Owner, spec: OnlineModelSpec) -> Desired:
    return Desired(pod=render_pod(owner, spec), service=render_service(owner, spec), pvc=render_pvc(owner, spec),
                   spec_hash=spec_hash(spec), endpoint=endpoint(owner, spec))
