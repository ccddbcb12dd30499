"""The OnlineModel's status as frozen pydantic models: what the operator writes (`status.py` computes it)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from onlinemodel_operator.models_base import DATE_TIME, FrozenCamelModel
from onlinemodel_protocol import limits

CONDITION_TYPES = ("Ready", "Serving", "Training", "Checkpointed", "Degraded")
# Present only while spec.replicas > 1: whether every follower is within replication.maxLagSeconds.
FOLLOWERS_CONDITION = "FollowersInSync"
PHASES = ("Pending", "Loading", "Ready", "Updating", "Degraded", "Failed", "Suspended", "Invalid")


class _StatusModel(FrozenCamelModel):
    # Status is written by the operator only; reading an older operator's status must not fail.
    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_StatusModel):
    """A metav1.Condition."""

    type: str = Field(min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    observed_generation: Optional[int] = Field(None, ge=0)
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(json_schema_extra=DATE_TIME)


class JobStatus(_StatusModel):
    """One training job of the runtime's recent jobs (what its Events were posted from)."""

    id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled.")
    steps_done: int = Field(0, ge=0)
    steps_total: Optional[int] = Field(None, ge=0)
    last_loss: Optional[float] = None
    error: Optional[str] = None


class GuardStatus(_StatusModel):
    """The guard and rollbacks, as last seen by GET /train/status (its `guard` section)."""

    enabled: Optional[bool] = Field(None, description="A guard file is set.")
    rollbacks: Optional[int] = Field(None, ge=0, description="Rollbacks so far (by the guard or POST /rollback).")
    last_rollback_time: Optional[str] = Field(None, json_schema_extra=DATE_TIME)
    last_rollback_source: Optional[Literal["guard", "request"]] = None
    last_rollback_job: Optional[str] = Field(None, description="The job the guard rolled back.")
    last_rollback_checkpoint: Optional[str] = Field(None, description="The checkpoint POST /rollback restored.")
    last_rollback_reason: Optional[str] = None


class TrainingStatus(_StatusModel):
    """The trainer as last seen by GET /train/status."""

    state: Optional[str] = Field(None, description="starting, idle, training, error, or unavailable (no answer).")
    steps: Optional[int] = Field(None, ge=0)
    tokens_trained: Optional[int] = Field(None, ge=0)
    last_loss: Optional[float] = None
    weight_version: Optional[int] = Field(None, ge=0)
    last_step_time: Optional[str] = Field(None, json_schema_extra=DATE_TIME)
    trainer_restarts: Optional[int] = Field(None, ge=0, description="Restarts of the trainer process in this pod.")
    jobs: list[JobStatus] = Field(default_factory=list, description="The runtime's recent jobs, newest last.")
    guard: Optional[GuardStatus] = None


class CheckpointStatus(_StatusModel):
    """The latest checkpoint on the volume, and the last on-demand request."""

    step: Optional[int] = Field(None, ge=0)
    weight_version: Optional[int] = Field(None, ge=0)
    time: Optional[str] = Field(None, json_schema_extra=DATE_TIME)
    path: Optional[str] = None
    requested: Optional[str] = Field(None, description="Value of the checkpoint-requested annotation last handled.")
    request_result: Optional[Literal["Succeeded", "Failed"]] = None
    request_message: Optional[str] = None
    request_time: Optional[str] = Field(None, json_schema_extra=DATE_TIME)


class FailureStatus(_StatusModel):
    """The last time the container or pod failed."""

    exit_code: Optional[int] = None
    reason: Optional[str] = None
    message: Optional[str] = None
    time: Optional[str] = Field(None, json_schema_extra=DATE_TIME)


class SecretKeyStatus(_StatusModel):
    """A Secret key the pod reads."""

    name: str
    key: str


class ModelChangedStatus(_StatusModel):
    """The runtime refused the checkpoints on the volume: they were made from another model than spec.model.

    No pod is started for this spec hash until the spec changes (checkpoint.startOver, or the model back) or
    the OnlineModel is suspended and resumed."""

    spec_hash: str = Field(description="Spec hash of the pod that was refused.")
    message: str = Field("", max_length=32768, description="What the runtime said.")
    time: Optional[str] = Field(None, json_schema_extra=DATE_TIME)


class FollowerReplicaStatus(_StatusModel):
    """One follower pod, and how far behind the learner it is (as the learner last heard from it)."""

    name: str
    ready: bool = False
    weight_version: Optional[int] = Field(None, ge=0)
    lag_versions: Optional[int] = Field(None, ge=0)
    lag_seconds: Optional[float] = Field(None, ge=0)


class ReplicasStatus(_StatusModel):
    """The serving pods: the learner and its followers."""

    desired: int = Field(ge=0)
    ready: int = Field(0, ge=0, description="Pods that serve (the learner included).")
    followers: list[FollowerReplicaStatus] = Field(default_factory=list, max_length=limits.REPLICAS_MAX)
    max_lag_seconds: Optional[float] = Field(None, ge=0, description="The largest follower lag, in seconds.")


class OnlineModelStatus(_StatusModel):
    """Observed state, recomputed from the live pod and the runtime's /train/status."""

    observed_generation: Optional[int] = Field(None, ge=0)
    phase: Optional[str] = Field(None, description=f"One-word summary: {', '.join(PHASES)}.")
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    training: Optional[TrainingStatus] = None
    checkpoint: Optional[CheckpointStatus] = None
    endpoint: Optional[str] = Field(None, description="In-cluster URL of the OpenAI API.")
    pod_name: Optional[str] = None
    pod_spec_hash: Optional[str] = Field(None, description="Spec hash of the running pod.")
    last_failure: Optional[FailureStatus] = None
    api_token_secret: Optional[SecretKeyStatus] = Field(
        None, description="The Secret key holding the bearer token of the training routes (give it to clients).")
    model_changed: Optional[ModelChangedStatus] = None
    replicas: Optional[ReplicasStatus] = None


