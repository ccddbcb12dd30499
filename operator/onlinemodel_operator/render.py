"""Pure rendering: an OnlineModel (metadata + validated spec) -> the desired Pod, Service, PVC and API-token
Secret dicts.

No I/O here (the token itself is drawn by reconcile.py). Every object carries the OnlineModel's labels and a
controller owner reference, except the checkpoint claim (kept when the OnlineModel goes, unless
`deleteWithModel`) and an existing claim (never ours).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from onlinemodel_operator import (
    API_VERSION,
    KIND,
    LEARNER,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    ROLE_LABEL,
    SPEC_HASH_ANNOTATION,
)
from onlinemodel_operator.config_files import config_file_args, config_file_hashes, config_file_volumes
from onlinemodel_operator.models_base import Quantity
from onlinemodel_operator.models_spec import (API_TOKEN_ENV, SHM_ONE_DEVICE_GIB, SHM_PER_TP_GPU_GIB, OnlineModelSpec,
                                              SecretKeyRef)

CONTAINER_NAME = "runtime"
PORT_NAME = "http"
CHECKPOINT_DIR = "/var/lib/onlinemodel/checkpoints"
MODEL_VOLUME_DIR = "/var/lib/onlinemodel/model"
DEFAULT_CHECKPOINT_SIZE = "20Gi"
STARTUP_PROBE_PERIOD = 10
HEALTH_PATH = "/health"
API_TOKEN_KEY = "token"
# The runtime runs as this user and group (docker/runtime.Dockerfile creates them); the volumes are group-owned
# by it (fsGroup), so the checkpoints of an older pod that ran as root stay writable.
RUNTIME_UID = 65532
RUNTIME_GID = 65532
RUNTIME_USER = "onlinemodel"
# The root filesystem is read-only: HOME and every cache vLLM, Hugging Face, torch and Triton write to live
# on an emptyDir, temporary files on another.
HOME_DIR = "/var/lib/onlinemodel/home"
CACHE_DIR = f"{HOME_DIR}/.cache"
CACHE_ENV = {
    "HOME": HOME_DIR,
    "USER": RUNTIME_USER,  # getpass.getuser() (torch) needs it: a numeric UID may have no passwd entry
    "XDG_CACHE_HOME": CACHE_DIR,  # vLLM's compile cache, FlashInfer, outlines
    "HF_HOME": f"{CACHE_DIR}/huggingface",  # Hub downloads (huggingFace model sources)
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/torchinductor",
}
TMP_DIR = "/tmp"


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


def generated_token_secret_name(owner: Owner) -> str:
    return f"{owner.name}-api-token"


def token_secret_ref(owner: Owner, spec: OnlineModelSpec) -> SecretKeyRef:
    """The Secret key the pod's API token comes from: the user's, else the one the operator generates."""
    return spec.training.api_token_secret_ref or SecretKeyRef(name=generated_token_secret_name(owner),
                                                              key=API_TOKEN_KEY)


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


def spec_hash(spec: OnlineModelSpec, files: Mapping[str, str] | None = None) -> str:
    """Hash of everything in the spec that shapes the pod (suspend, the claim's deletion policy, the number
    of replicas and the lag bound do not: scaling never restarts a pod), and of the config files the pod reads
    at start (`files`: the ConfigMaps' texts by field, config_files.py): an edit of one replaces the pod like a
    spec change does."""
    data = spec.to_dict()
    data.pop("suspend", None)
    data.pop("replicas", None)
    data.get("replication", {}).pop("maxLagSeconds", None)
    data.get("checkpoint", {}).get("volume", {}).pop("deleteWithModel", None)
    data.update(config_file_hashes(files or {}))
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
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def prestop_timeout(spec: OnlineModelSpec) -> int:
    """Seconds the preStop checkpoint may take: half the grace period (SIGTERM's final one gets 30%)."""
    return max(10, spec.pod.termination_grace_period_seconds // 2)


def final_checkpoint_timeout(spec: OnlineModelSpec) -> int:
    return max(5, spec.pod.termination_grace_period_seconds * 3 // 10)


def serve_args(owner: Owner, spec: OnlineModelSpec) -> list[str]:
    """Arguments of `onlinemodel serve` (its options: README.md, "Quickstart (runtime)")."""
    checkpoint = spec.checkpoint
    args = ["--model", model_argument(spec),
            "--served-model-name", spec.model.served_name or owner.name,
            "--host", "0.0.0.0", "--port", str(spec.serving.port),
            "--checkpoint-dir", CHECKPOINT_DIR,
            "--checkpoint-keep", str(checkpoint.keep_last),
            "--checkpoint-every-steps", str(checkpoint.every_steps),
            "--checkpoint-every-seconds", _num(checkpoint.every_seconds),
            "--final-checkpoint-timeout", str(final_checkpoint_timeout(spec))]
    if checkpoint.start_over:
        args.append("--start-over")
    training = spec.training
    if not training.enabled:
        args.append("--no-training")
    else:
        args += ["--learning-rate", _num(training.learning_rate),
                 "--optimizer-rank", str(training.optimizer_rank),
                 "--max-examples", str(training.max_examples_per_request),
                 "--default-epochs", str(training.default_epochs),
                 "--replay-examples", str(training.replay_examples),
                 "--anchor-weight", _num(training.anchor_weight),
                 "--null-space-energy", _num(training.null_space_energy),
                 "--max-decode-slowdown", _num(training.max_decode_slowdown) if training.max_decode_slowdown
                 else "off"]
        if training.max_body_bytes is not None:
            args += ["--max-body-bytes", str(training.max_body_bytes)]
        args += config_file_args(spec)
        args += ["--sync-interval", _num(spec.replication.sync_interval_seconds)]
    if spec.serving.max_model_len is not None:
        args += ["--max-model-len", str(spec.serving.max_model_len)]
    if spec.serving.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", _num(spec.serving.gpu_memory_utilization)]
    if spec.resources.gpus > 1:  # one pod, each layer split over its GPUs (docs/tensor-parallel.md)
        args += ["--tensor-parallel-size", str(spec.resources.gpus)]
    extra = list(spec.serving.extra_args)
    hf = spec.model.source.hugging_face
    if hf is not None and hf.revision:
        extra = ["--revision", hf.revision, *extra]
    if extra:
        args += ["--", *extra]
    return args


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _container_env(owner: Owner, spec: OnlineModelSpec) -> list[dict[str, Any]]:
    user_env = [e.to_dict() for e in spec.pod.env]
    overridden = {e["name"] for e in user_env}
    env = [{"name": name, "value": value} for name, value in CACHE_ENV.items() if name not in overridden]
    env.append(_secret_env(API_TOKEN_ENV, token_secret_ref(owner, spec)))
    hf = spec.model.source.hugging_face
    if hf is not None and hf.token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", hf.token_secret_ref))
    return env + user_env


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


def shm_size(spec: OnlineModelSpec) -> Quantity:
    """The /dev/shm size limit: the spec's, else what one device needs plus NCCL's share per GPU under tensor
    parallelism (models_spec.SHM_PER_TP_GPU_GIB says why)."""
    res = spec.resources
    if res.shm_size is not None:
        return res.shm_size
    return f"{SHM_ONE_DEVICE_GIB + (SHM_PER_TP_GPU_GIB * res.gpus if res.gpus > 1 else 0)}Gi"


def _probe(failure_threshold: int, period: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": HEALTH_PATH, "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failure_threshold}


# The restricted Pod Security Standard, and then some: no root, no capabilities, no privilege escalation,
# the runtime's default seccomp profile, a read-only root filesystem.
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_GID,
    "fsGroup": RUNTIME_GID,
    # Re-own a (large) checkpoint volume only when its root is not ours yet, not on every start.
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}


def render_pod(owner: Owner, spec: OnlineModelSpec, files: Mapping[str, str] | None = None) -> dict[str, Any]:
    port = spec.serving.port
    mounts = [{"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
              {"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "home", "mountPath": HOME_DIR},
              {"name": "tmp", "mountPath": TMP_DIR}]
    volumes: list[dict[str, Any]] = [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoint_claim_name(owner, spec)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec)}},
        # No size limits: a Hub model is downloaded into home, and its size is the model's.
        {"name": "home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    source = spec.model.source
    if source.volume is not None:
        mounts.append({"name": "model", "mountPath": MODEL_VOLUME_DIR, "readOnly": True})
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source.volume.claim_name,
                                                                    "readOnly": True}})
    file_volumes, file_mounts = config_file_volumes(spec)
    volumes += file_volumes
    mounts += file_mounts
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["onlinemodel", "serve"],
        "args": serve_args(owner, spec),
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": _container_env(owner, spec),
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
        # What `onlinemodel serve` says when it refuses to start (a changed model) reaches the status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY_CONTEXT,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": spec.pod.termination_grace_period_seconds,
        "enableServiceLinks": False,
        # The runtime never calls the Kubernetes API: a chosen serviceAccountName gives it no token.
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY_CONTEXT,
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
            "labels": {**overrides.labels, **common_labels(owner), ROLE_LABEL: LEARNER},
            "annotations": {**overrides.annotations, SPEC_HASH_ANNOTATION: spec_hash(spec, files)},
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


def train_service_name(owner: Owner) -> str:
    return f"{owner.name}-train"


def render_train_service(owner: Owner, spec: OnlineModelSpec) -> dict[str, Any]:
    """`<name>-train`: the learner only (training routes, and followers fetching its weights); the model's
    Service reaches every replica."""
    service = render_service(owner, spec)
    service["metadata"]["name"] = train_service_name(owner)
    service["spec"]["selector"] = {**selector_labels(owner), ROLE_LABEL: LEARNER}
    return service


def render_pvc(owner: Owner, spec: OnlineModelSpec) -> dict[str, Any] | None:
    """The checkpoint claim the operator creates, or None when the spec names an existing claim."""
    volume = spec.checkpoint.volume
    if volume.existing_claim:
        return None
    meta: dict[str, Any] = {"name": checkpoint_claim_name(owner, spec), "namespace": owner.namespace,
                            "labels": common_labels(owner)}
    if volume.delete_with_model:
        meta["ownerReferences"] = [owner.reference()]
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": volume.size or DEFAULT_CHECKPOINT_SIZE}}}
    if volume.storage_class_name:
        pvc_spec["storageClassName"] = volume.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": pvc_spec}


def render_token_secret(owner: Owner, token: str) -> dict[str, Any]:
    """The Secret holding a generated API token (reconcile.py draws `token`; never logged)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": generated_token_secret_name(owner), "namespace": owner.namespace,
                         "labels": common_labels(owner), "ownerReferences": [owner.reference()]},
            "data": {API_TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


@dataclass(frozen=True)
class Desired:
    pod: dict[str, Any]
    service: dict[str, Any]
    train_service: dict[str, Any]
    pvc: dict[str, Any] | None
    spec_hash: str
    endpoint: str
    api_token: SecretKeyRef
    generates_token: bool  # the operator owns the token's Secret (no apiTokenSecretRef)


def render_all(owner: Owner, spec: OnlineModelSpec, files: Mapping[str, str] | None = None) -> Desired:
    """Everything an OnlineModel is made of; `files`: the texts of its config files' ConfigMap keys, by field
    (config_files.py)."""
    return Desired(pod=render_pod(owner, spec, files), service=render_service(owner, spec),
                   train_service=render_train_service(owner, spec), pvc=render_pvc(owner, spec),
                   spec_hash=spec_hash(spec, files), endpoint=endpoint(owner, spec),
                   api_token=token_secret_ref(owner, spec), generates_token=spec.training.api_token_secret_ref is None)
