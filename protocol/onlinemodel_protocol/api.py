"""The HTTP bodies of ``POST /train``, ``GET /train/status``, ``DELETE /train/jobs/{id}`` and
``POST /checkpoint`` (docs/api.md).

The runtime builds every one of these answers from the models below: the trainer its status, jobs and
checkpoints, the API server the placeholder status it answers while no trainer does, so both are one
shape. Clients (the operator's ``runtime_client``) validate what they read with the same models; readers
ignore fields they do not know, so a newer runtime may add some. Times are RFC 3339 UTC, ``...Z``.
Every float field is finite or ``null``: JSON has no NaN, so a non-finite value becomes ``None`` when a
model is built, whoever builds it.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

TrainerState = Literal["starting", "idle", "training", "error", "disabled"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_JOB_STATES = ("succeeded", "failed", "cancelled")
CheckpointState = Literal["idle", "running", "failed"]
# How the trainer is paced while requests wait for tokens (docs/serving-first.md): "measured": its duty cycle
# follows vLLM's measured inter-token latency; "fixed": vLLM's latency histogram is not available, the duty
# cycle is derived from the budget; "off": not paced.
SchedulerMode = Literal["off", "measured", "fixed"]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


FiniteOrNone = Annotated[float | None, AfterValidator(_finite_or_none)]


def utc_timestamp(timespec: str = "seconds") -> str:
    """Now, as the API writes times: ``2026-11-26T05:00:00Z`` (``timespec`` as ``datetime.isoformat``)."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


class _Body(BaseModel):
    # validate_assignment: the trainer updates its jobs in place; a NaN loss assigned becomes None too.
    model_config = ConfigDict(extra="ignore", validate_assignment=True)


class TrainAccepted(_Body):
    """``202`` answer of ``POST /train``."""

    job_id: str
    state: JobState
    examples: int = Field(ge=1)
    tokens: int = Field(ge=0)


class Job(_Body):
    """One training job as ``GET /train/status`` lists it; the trainer updates it while it runs."""

    id: str
    state: JobState
    examples: int = Field(ge=1)
    epochs: int = Field(ge=1)
    learning_rate: float = Field(allow_inf_nan=False)
    steps: int = Field(0, ge=0)
    replay_steps: int = Field(0, ge=0)  # of `steps`, those on examples of earlier jobs (replay)
    last_loss: FiniteOrNone = None
    error: str | None = None
    created_at: str
    finished_at: str | None = None


class CheckpointRecord(_Body):
    """A complete checkpoint: the answer of ``POST /checkpoint`` and ``checkpoint.last`` of the status.

    The runtime fills every field; a reader needs only ``path`` and ``step`` and takes the rest if given.
    """

    path: str
    step: int = Field(ge=0)
    weight_version: int | None = Field(None, ge=0)
    time: str | None = None
    size_bytes: int | None = Field(None, ge=0)
    seconds: FiniteOrNone = None
    content_hash: str | None = None
    # False: the weights were not finite or the loss was diverging (docs/checkpoints.md): the checkpoint
    # was kept aside as `unhealthy-step-...` and `latest` still names the previous one.
    healthy: bool = True
    unhealthy_reason: str | None = None


class CheckpointStatus(_Body):
    state: CheckpointState = "idle"
    last: CheckpointRecord | None = None  # the newest healthy checkpoint: what `latest` names
    last_unhealthy: CheckpointRecord | None = None  # the newest checkpoint refused as unhealthy, if any
    last_error: str | None = None
    dir: str | None = None


class JobCounts(_Body):
    """Jobs since the first start of this checkpoint directory's trainer (continued across trainer restarts):
    every 202 of ``POST /train`` (replays of an Idempotency-Key excluded) is one ``submitted`` job, and
    ends as exactly one of the others. A job lost with a crashed trainer counts as failed."""

    submitted: int = Field(0, ge=0)
    succeeded: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    cancelled: int = Field(0, ge=0)


class SchedulerStatus(_Body):
    """``scheduler`` of ``GET /train/status``: serving first, training takes what is left."""

    mode: SchedulerMode
    max_decode_slowdown: FiniteOrNone = None  # the budget; null when off
    in_flight_requests: int = Field(0, ge=0)  # generation requests vLLM's API server is answering now
    duty_cycle: float = Field(1.0, ge=0, le=1)  # share of the time the trainer computes while requests wait
    measured_slowdown: FiniteOrNone = None  # mean inter-token latency while training / without, last window
    baseline_itl_ms: FiniteOrNone = None  # mean inter-token latency without training
    paced_seconds: float = Field(0.0, ge=0)  # time the trainer has waited for serving since it started
    note: str | None = None  # why the mode is what it is, when that is not the normal case


class MemoryStatus(_Body):
    """``memory`` of ``GET /train/status``: the trainer process's memory beyond the weights it shares.

    On a GPU, from torch's allocator (the shared weights belong to vLLM's process and are not counted):
    allocated now, the peak since the trainer started and the peak of the last step, plus the device's
    free and total memory. On CPU, the process's resident memory (it includes the pages of the shared
    weights file the trainer has touched).
    """

    device: str
    allocated_bytes: int | None = Field(None, ge=0)
    reserved_bytes: int | None = Field(None, ge=0)
    peak_allocated_bytes: int | None = Field(None, ge=0)
    last_step_peak_bytes: int | None = Field(None, ge=0)
    device_free_bytes: int | None = Field(None, ge=0)
    device_total_bytes: int | None = Field(None, ge=0)
    rss_bytes: int | None = Field(None, ge=0)
    peak_rss_bytes: int | None = Field(None, ge=0)


class ReplayStatus(_Body):
    """``replay`` of ``GET /train/status``: the reservoir of earlier examples that jobs replay."""

    examples: int = Field(0, ge=0)  # kept now
    tokens: int = Field(0, ge=0)
    seen: int = Field(0, ge=0)  # examples offered since the first start (each kept with equal probability)
    capacity: int = Field(0, ge=0)


class TrainStatus(_Body):
    """``GET /train/status``. A non-finite ``last_loss`` is written as ``null``."""

    state: TrainerState
    steps: int = Field(0, ge=0)
    tokens_trained: int = Field(0, ge=0)
    last_loss: FiniteOrNone = None
    weight_version: int = Field(0, ge=0)  # +1 for every step that wrote the weights
    last_step_time: str | None = None
    last_step_seconds: FiniteOrNone = None
    skipped_steps: int = Field(0, ge=0)
    queued_jobs: int = Field(0, ge=0)
    jobs: list[Job] = Field(default_factory=list)
    job_counts: JobCounts = Field(default_factory=JobCounts)
    last_error: str | None = None
    checkpoint: CheckpointStatus | None = None
    # The optimizer's own summary(), free-form: its non-finite floats become null too.
    optimizer: Annotated[dict[str, Any] | None, AfterValidator(finite_json)] = None
    trainer_restarts: int = Field(0, ge=0)
    scheduler: SchedulerStatus | None = None
    memory: MemoryStatus | None = None
    replay: ReplayStatus | None = None

    @classmethod
    def placeholder(cls, state: TrainerState, last: TrainStatus | None = None, last_error: str | None = None,
                    restarts: int = 0) -> TrainStatus:
        """The answer while no trainer answers (starting, error) or none exists (disabled): the last
        counters seen, nothing queued."""
        return (last or cls(state=state)).model_copy(
            update={"state": state, "queued_jobs": 0, "last_error": last_error, "trainer_restarts": restarts})


class ErrorDetail(_Body):
    message: str
    type: str | None = None  # the runtime always names one
    param: str | None = None
    code: str | None = None


class ErrorBody(_Body):
    """Every 4xx/5xx of the training routes, in OpenAI's error shape."""

    error: ErrorDetail
