"""The HTTP bodies of ``POST /train``, ``GET /train/status`` and ``POST /checkpoint`` (docs/api.md).

The runtime builds every one of these answers from the models below: the trainer its status, jobs and
checkpoints, the API server the placeholder status it answers while no trainer does, so both are one
shape. Clients (the operator's ``runtime_client``) validate what they read with the same models; readers
ignore fields they do not know, so a newer runtime may add some. Times are RFC 3339 UTC, ``...Z``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TrainerState = Literal["starting", "idle", "training", "error", "disabled"]
JobState = Literal["queued", "running", "succeeded", "failed"]
CheckpointState = Literal["idle", "running", "failed"]
# How the trainer is paced while requests wait for tokens (docs/serving-first.md): "measured": its duty cycle
# follows vLLM's measured inter-token latency; "fixed": vLLM's latency histogram is not available, the duty
# cycle is derived from the budget; "off": not paced.
SchedulerMode = Literal["off", "measured", "fixed"]


def utc_timestamp(timespec: str = "seconds") -> str:
    """Now, as the API writes times: ``2026-11-26T05:00:00Z`` (``timespec`` as ``datetime.isoformat``)."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


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
    learning_rate: float
    steps: int = Field(0, ge=0)
    last_loss: float | None = None
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
    seconds: float | None = None
    content_hash: str | None = None


class CheckpointStatus(_Body):
    state: CheckpointState = "idle"
    last: CheckpointRecord | None = None
    last_error: str | None = None
    dir: str | None = None


class SchedulerStatus(_Body):
    """``scheduler`` of ``GET /train/status``: serving first, training takes what is left."""

    mode: SchedulerMode
    max_decode_slowdown: float | None = None  # the budget; null when off
    in_flight_requests: int = Field(0, ge=0)  # generation requests vLLM's API server is answering now
    duty_cycle: float = Field(1.0, ge=0, le=1)  # share of the time the trainer computes while requests wait
    measured_slowdown: float | None = None  # mean inter-token latency while training / without, last window
    baseline_itl_ms: float | None = None  # mean inter-token latency without training
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


class TrainStatus(_Body):
    """``GET /train/status``. A non-finite ``last_loss`` is written as ``null``."""

    state: TrainerState
    steps: int = Field(0, ge=0)
    tokens_trained: int = Field(0, ge=0)
    last_loss: float | None = None
    weight_version: int = Field(0, ge=0)  # +1 for every step that wrote the weights
    last_step_time: str | None = None
    last_step_seconds: float | None = None
    skipped_steps: int = Field(0, ge=0)
    queued_jobs: int = Field(0, ge=0)
    jobs: list[Job] = Field(default_factory=list)
    last_error: str | None = None
    checkpoint: CheckpointStatus | None = None
    optimizer: dict[str, Any] | None = None  # the optimizer's own summary()
    trainer_restarts: int = Field(0, ge=0)
    scheduler: SchedulerStatus | None = None
    memory: MemoryStatus | None = None

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
