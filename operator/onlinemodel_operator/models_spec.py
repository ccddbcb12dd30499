"""The OnlineModel's spec as frozen pydantic models: one declarative class per CRD object, the way the CRD reads.

The schema's conventions (CEL rules and their Python twins, the generated CRD) are in `models_base`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, StringConstraints, model_validator

from onlinemodel_operator.models_base import PRESERVE_UNKNOWN, QUANTITY, FrozenCamelModel, Quantity, cel
from onlinemodel_protocol import limits
from onlinemodel_protocol.config import ENV_API_TOKEN

# Flags of `onlinemodel serve` (and vLLM's) that the operator sets itself, or that onlinemodel cannot run
# (pipeline parallelism); extraArgs may not repeat them. vLLM reads `_` as `-` in a flag's name and knows
# `-tp`/`-pp` for the parallel sizes.
MANAGED_FLAGS_RE = r"^(--(model|served[-_]model[-_]name|host|port|(tensor|pipeline)[-_]parallel[-_]size)|-tp|-pp)(=.*)?$"
API_TOKEN_ENV = ENV_API_TOKEN  # the runtime reads its bearer token from it
GUARD_KEY_DEFAULT = "guard.yaml"
ANCHORS_KEY_DEFAULT = "anchors.yaml"
# /dev/shm (a memory-backed emptyDir) when resources.shmSize is unset: what one device needs, and with
# tensor parallelism (gpus > 1) this much more per GPU for NCCL's shared-memory segments (vLLM's group and
# the trainers' group) and vLLM's shared-memory broadcast to its workers (docs/operator.md).
SHM_ONE_DEVICE_GIB = 2
SHM_PER_TP_GPU_GIB = 1


class SecretKeyRef(FrozenCamelModel):
    """A key of a Secret in the OnlineModel's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field("token", min_length=1, description="Key in the Secret whose value is used.")


class HuggingFaceSource(FrozenCamelModel):
    """Download the weights from the Hugging Face Hub when the pod starts (needs egress)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*(/[-A-Za-z0-9_.]+)?$",
                    description="Model id on the Hub, e.g. Qwen/Qwen3-0.6B.")
    revision: Optional[str] = Field(None, min_length=1, description="Branch, tag or commit to download.")
    token_secret_ref: Optional[SecretKeyRef] = Field(None, description="Secret key holding a Hub token (HF_TOKEN) for gated models.")


class VolumeSource(FrozenCamelModel):
    """Weights in a directory on an existing PersistentVolumeClaim, mounted read-only."""

    claim_name: str = Field(min_length=1, max_length=253, description="Name of the PersistentVolumeClaim holding the weights.")
    path: str = Field("", pattern=r"^(|[^/].*)$", description="Directory of the model inside the claim (relative; empty: the claim's root).")


class ImageSource(FrozenCamelModel):
    """Weights baked into the container image."""

    path: str = Field(pattern=r"^/.*", description="Absolute path of the model directory inside the image.")


class ModelSource(FrozenCamelModel):
    """Where the weights come from: exactly one of huggingFace, volume, image."""

    CEL = (cel("[has(self.huggingFace), has(self.volume), has(self.image)].filter(x, x).size() == 1",
               "model.source: set exactly one of huggingFace, volume or image"),)
    hugging_face: Optional[HuggingFaceSource] = Field(None, description="A Hugging Face Hub model id.")
    volume: Optional[VolumeSource] = Field(None, description="A path on a PersistentVolumeClaim.")
    image: Optional[ImageSource] = Field(None, description="A path inside the container image.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        if sum(x is not None for x in (self.hugging_face, self.volume, self.image)) != 1:
            raise ValueError(self.CEL[0]["message"])
        return self


class ModelSpec(FrozenCamelModel):
    """The served model."""

    source: ModelSource = Field(description="Where the weights come from.")
    served_name: Optional[str] = Field(None, min_length=1, max_length=253, pattern=r"^[^\s]+$",
                                      description="Model name clients send in OpenAI requests (default: the OnlineModel's name).")


class ResourcesSpec(FrozenCamelModel):
    """Compute resources of the pod's one container."""

    gpus: int = Field(1, ge=0, le=16, description="GPUs of the pod, shared by vLLM and the trainer (0: CPU only). "
                                                 "More than 1: tensor parallelism, each layer split over the GPUs "
                                                 "(--tensor-parallel-size), on the learner and every follower.")
    gpu_resource_name: str = Field("nvidia.com/gpu", min_length=1, description="Extended resource name of the GPU.")
    cpu: Optional[Quantity] = Field(None, json_schema_extra=QUANTITY,
                                    description="CPU request (and limit when memory is set) e.g. \"8\".")
    memory: Optional[Quantity] = Field(None, json_schema_extra=QUANTITY,
                                       description="Memory request and limit, e.g. \"64Gi\".")
    shm_size: Optional[Quantity] = Field(
        None, json_schema_extra=QUANTITY,
        description=f"Size limit of the in-memory /dev/shm volume (it counts against the memory limit). Default: "
                    f"{SHM_ONE_DEVICE_GIB}Gi; with gpus > 1, {SHM_ONE_DEVICE_GIB}Gi plus {SHM_PER_TP_GPU_GIB}Gi "
                    f"per GPU.")


class ServingSpec(FrozenCamelModel):
    """vLLM serving settings."""

    CEL = (cel("self.extraArgs.all(a, !a.matches('" + MANAGED_FLAGS_RE + "'))",
               "serving.extraArgs: --model, --served-model-name, --host, --port and --tensor-parallel-size (-tp) "
               "are set by the operator, use model, serving.port and resources.gpus instead; "
               "--pipeline-parallel-size (-pp) is not supported"),)
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI API, /train, /health (container and Service).")
    max_model_len: Optional[int] = Field(None, ge=1, description="vLLM --max-model-len.")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description="vLLM --gpu-memory-utilization (fraction of GPU memory for vLLM).")
    extra_args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(default_factory=list, max_length=64, description="More vLLM arguments, passed after `--`.")
    startup_timeout_seconds: int = Field(600, ge=60, le=7200, description="How long the model may load before the pod is restarted (startup probe).")

    @model_validator(mode="after")
    def _no_managed_flags(self) -> "ServingSpec":
        if any(re.match(MANAGED_FLAGS_RE, a) for a in self.extra_args):
            raise ValueError(self.CEL[0]["message"])
        return self


def _config_map_key(default: str, what: str) -> Any:
    return Field(default, min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                 description=f"Key in the ConfigMap holding the {what}.")


class ConfigMapKeyRef(FrozenCamelModel):
    """A key of a ConfigMap in the OnlineModel's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap.")
    key: str = _config_map_key(GUARD_KEY_DEFAULT, "guard file")


class AnchorsConfigMapKeyRef(ConfigMapKeyRef):
    """A key of a ConfigMap in the OnlineModel's namespace."""

    key: str = _config_map_key(ANCHORS_KEY_DEFAULT, "anchor file")


class GuardSpec(FrozenCamelModel):
    """The guard (docs/guard.md): probes checked after every training job; a job that makes one regress is
    rolled back. The ConfigMap is validated before the pod starts and read by the runtime at start."""

    config_map_ref: ConfigMapKeyRef = Field(description="ConfigMap key holding the guard file (YAML or JSON).")


class AnchorsSpec(FrozenCamelModel):
    """The deployment's own anchor conversations (docs/learning.md, "Your own anchor conversations"): every
    training step keeps the model's replies to them, with the built-in ones or instead of them. The ConfigMap is
    validated before the pod starts and read by the runtime at start."""

    config_map_ref: AnchorsConfigMapKeyRef = Field(
        description="ConfigMap key holding the anchor file (YAML or JSON).")


class TrainingSpec(FrozenCamelModel):
    """Online training settings. Defaults and bounds are the runtime's own (onlinemodel_protocol.limits)."""

    CEL = (cel("!has(self.maxDecodeSlowdown) || double(self.maxDecodeSlowdown) == 0.0 "
               "|| double(self.maxDecodeSlowdown) >= 1.0",
               "training.maxDecodeSlowdown: a factor of at least 1, or 0 (off)"),
           cel("!has(self.anchors) || !has(self.anchorWeight) || double(self.anchorWeight) > 0.0",
               "training.anchors: anchor conversations need the anchor term (anchorWeight > 0)"))
    enabled: bool = Field(True, description="Run the trainer next to vLLM (false: serve only).")
    learning_rate: float = Field(limits.LEARNING_RATE_DEFAULT, gt=0, le=limits.LEARNING_RATE_MAX,
                                 description="Learning rate of the optimizer (a request may ask for another).")
    optimizer_rank: int = Field(limits.OPTIMIZER_RANK_DEFAULT, ge=1, le=limits.OPTIMIZER_RANK_MAX,
                                description="Rank of the 2-D matrices' low-rank optimizer state (APOLLO; 1 is "
                                            "APOLLO-Mini; MoE experts are always APOLLO-Mini).")
    max_examples_per_request: int = Field(limits.MAX_EXAMPLES_DEFAULT, ge=1, le=limits.MAX_EXAMPLES_CEILING,
                                          description="Largest number of examples one POST /train may carry.")
    default_epochs: int = Field(limits.EPOCHS_DEFAULT, ge=1, le=limits.MAX_EPOCHS_DEFAULT,
                                description="Passes over the examples when a POST /train names none (the most: "
                                            "an example stops once the model gives its answer back).")
    replay_examples: int = Field(limits.REPLAY_EXAMPLES_DEFAULT, ge=0, le=limits.REPLAY_EXAMPLES_MAX,
                                 description="Examples of earlier jobs trained again in each job, so earlier "
                                             "lessons are kept (0: no replay).")
    anchor_weight: float = Field(limits.ANCHOR_WEIGHT_DEFAULT, ge=0, le=limits.ANCHOR_WEIGHT_MAX,
                                 description="Weight of the term that keeps the untouched model's answers to "
                                             "general conversations in every training step (0: off).")
    null_space_energy: float = Field(limits.NULL_SPACE_ENERGY_DEFAULT, ge=0, le=limits.NULL_SPACE_ENERGY_MAX,
                                     description="Keep updates out of the directions that hold this share of each "
                                                 "trained matrix's inputs on the anchor conversations, so what is "
                                                 "learned changes less of the rest (0: off).")
    max_body_bytes: Optional[int] = Field(
        None, ge=1, description=f"Largest request body of the training routes, in bytes (default: the runtime's, "
                                f"{limits.MAX_BODY_BYTES_DEFAULT}); a larger one is refused with 413.")
    api_token_secret_ref: Optional[SecretKeyRef] = Field(
        None, description="Secret key holding the bearer token that POST /train, POST /checkpoint and GET "
                          "/train/status require. Absent: the operator creates the Secret <name>-api-token with a "
                          "random token (key token) and names it in status.apiTokenSecret.")
    guard: Optional[GuardSpec] = Field(None, description="Probes that every training job must keep passing.")
    anchors: Optional[AnchorsSpec] = Field(
        None, description="The deployment's own anchor conversations, whose replies every training step keeps "
                          "(with the built-in ones, or instead of them).")
    max_decode_slowdown: float = Field(
        limits.MAX_DECODE_SLOWDOWN_DEFAULT, ge=limits.DECODE_SLOWDOWN_OFF, le=limits.MAX_DECODE_SLOWDOWN_MAX,
        description="Serving first: how much slower (p99 per token) decode may get while training runs "
                    "(a factor of at least 1; 0: training is not paced).")

    @model_validator(mode="after")
    def _cel_twins(self) -> "TrainingSpec":
        if 0 < self.max_decode_slowdown < 1:
            raise ValueError(self.CEL[0]["message"])
        if self.anchors is not None and not self.anchor_weight:
            raise ValueError(self.CEL[1]["message"])
        return self


class CheckpointVolumeSpec(FrozenCamelModel):
    """The volume that holds checkpoints: an existing claim, or a claim the operator creates."""

    CEL = (cel("!has(self.existingClaim) || (!has(self.size) && !has(self.storageClassName))",
               "checkpoint.volume: existingClaim cannot be combined with size or storageClassName"),)
    existing_claim: Optional[str] = Field(None, min_length=1, max_length=253, description="Use this PersistentVolumeClaim (never deleted by the operator).")
    size: Optional[Quantity] = Field(None, json_schema_extra=QUANTITY,
                                     description="Size of the claim the operator creates (default 20Gi).")
    storage_class_name: Optional[str] = Field(None, min_length=1, description="Storage class of the claim the operator creates.")
    delete_with_model: bool = Field(False, description="Delete the created claim, and every checkpoint on it, when "
                                                       "the OnlineModel is deleted (an owner reference). By default "
                                                       "it is kept.")

    @model_validator(mode="before")
    @classmethod
    def _drop_retain(cls, data: Any) -> Any:
        # `retain: true` asked for what is now the default; the CRD no longer has the field, so the API server
        # prunes it, but an object stored before the change may still carry it (docs/operator.md, "Upgrading").
        if isinstance(data, dict) and "retain" in data:
            data = {k: v for k, v in data.items() if k != "retain"}
        return data

    @model_validator(mode="after")
    def _claim_or_size(self) -> "CheckpointVolumeSpec":
        if self.existing_claim is not None and (self.size is not None or self.storage_class_name is not None):
            raise ValueError(self.CEL[0]["message"])
        return self


class CheckpointSpec(FrozenCamelModel):
    """Checkpoints of the trained weights and optimizer state; the pod resumes from the latest one."""

    every_steps: int = Field(limits.CHECKPOINT_EVERY_STEPS_DEFAULT, ge=0,
                             description="Checkpoint after every N training steps (0: no step-based checkpoints).")
    every_seconds: float = Field(limits.CHECKPOINT_EVERY_SECONDS_DEFAULT, ge=0,
                               description="Checkpoint T seconds after the last one when the weights changed since "
                                           "(0: no time-based checkpoints).")
    keep_last: int = Field(limits.CHECKPOINT_KEEP_DEFAULT, ge=1, le=limits.CHECKPOINT_KEEP_MAX,
                           description="How many checkpoints to keep on the volume.")
    start_over: bool = Field(False, description="When the checkpoints on the volume were made from another model than "
                                                "spec.model, move them aside (never deleted) and start from spec.model; "
                                                "false: the pod refuses to start and the status says ModelChanged.")
    volume: CheckpointVolumeSpec = Field(default_factory=CheckpointVolumeSpec, description="The checkpoint volume.")


class Toleration(FrozenCamelModel):
    """A pod toleration (same fields as the Pod's)."""

    key: Optional[str] = None
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    toleration_seconds: Optional[int] = None


class EnvVar(FrozenCamelModel):
    """An environment variable of the container (same fields as the Pod's)."""

    CEL = (cel("!(has(self.value) && has(self.valueFrom))", "pod.env: set value or valueFrom, not both"),)
    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: Optional[str] = None
    value_from: Optional[dict[str, Any]] = Field(None, json_schema_extra=PRESERVE_UNKNOWN,
                                                description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef...).")

    @model_validator(mode="after")
    def _value_xor(self) -> "EnvVar":
        if self.value is not None and self.value_from is not None:
            raise ValueError(self.CEL[0]["message"])
        return self


class LocalObjectReference(FrozenCamelModel):
    name: str = Field(min_length=1)


class PodOverrides(FrozenCamelModel):
    """Pod placement and metadata overrides."""

    CEL = (
        cel(f"self.env.all(e, e.name != '{API_TOKEN_ENV}')",
            f"pod.env: {API_TOKEN_ENV} is set by the operator (training.apiTokenSecretRef, or a generated Secret)"),
        cel("self.labels.all(k, !k.startsWith('onlinemodel.dev/'))",
            "pod.labels: keys under onlinemodel.dev/ are reserved for the operator"),
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: Optional[dict[str, Any]] = Field(None, json_schema_extra=PRESERVE_UNKNOWN, description="A Kubernetes Affinity.")
    runtime_class_name: Optional[str] = Field(None, min_length=1)
    priority_class_name: Optional[str] = Field(None, min_length=1)
    service_account_name: Optional[str] = Field(None, min_length=1)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list, max_length=256)
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    termination_grace_period_seconds: int = Field(
        300, ge=30, le=3600, description="Time for the preStop checkpoint and the final checkpoint on SIGTERM.")

    @model_validator(mode="after")
    def _reserved(self) -> "PodOverrides":
        if any(e.name == API_TOKEN_ENV for e in self.env):
            raise ValueError(self.CEL[0]["message"])
        if any(k.startswith("onlinemodel.dev/") for k in self.labels):
            raise ValueError(self.CEL[1]["message"])
        return self


class ReplicationSpec(FrozenCamelModel):
    """How followers track the learner (spec.replicas > 1; docs/operator.md "Scaling out")."""

    sync_interval_seconds: float = Field(
        limits.SYNC_INTERVAL_DEFAULT, ge=limits.SYNC_INTERVAL_MIN, le=limits.SYNC_INTERVAL_MAX,
        description="The learner publishes its weights to followers when a job ends and, while one runs, at most "
                    "every this many seconds.")
    max_lag_seconds: float = Field(
        limits.MAX_FOLLOWER_LAG_DEFAULT, gt=0, le=limits.MAX_FOLLOWER_LAG_MAX,
        description="A follower further behind the learner than this sets FollowersInSync=False (FollowerBehind).")


class OnlineModelSpec(FrozenCamelModel):
    """Desired state of an OnlineModel: one pod where vLLM serves a model and a trainer updates it in place."""

    model: ModelSpec = Field(description="The model to serve and train.")
    image: str = Field(min_length=1, description="Runtime image (vLLM plus the onlinemodel runtime).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    suspend: bool = Field(False, description="Delete the pod (after a checkpoint) and keep the volume; false starts it again.")
    replicas: int = Field(limits.REPLICAS_DEFAULT, ge=1, le=limits.REPLICAS_MAX,
                          description="Serving pods: the learner (pod <name>, trains) and replicas - 1 followers "
                                      "(pods <name>-follower-N), which serve the learner's weights.")
    replication: ReplicationSpec = Field(default_factory=ReplicationSpec)
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Pod placement and metadata.")


def parse_spec(spec: Any) -> OnlineModelSpec:
    """Validate a raw spec dict (raises pydantic.ValidationError with every problem)."""
    return OnlineModelSpec.model_validate(spec if spec is not None else {})


def format_validation_error(exc: Exception) -> str:
    """One line per problem, with the camelCase field path a user wrote."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        msg = err.get("msg", "")
        if err.get("type") == "value_error":  # our own validators name the field themselves
            lines.append(msg.removeprefix("Value error, "))
        else:
            lines.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(lines)
