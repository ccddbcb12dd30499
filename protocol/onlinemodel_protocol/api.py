"""The HTTP bodies of ``POST /train``, ``GET /train/status``, ``GET /train/limits``, ``GET`` and ``DELETE
/train/jobs/{id}``, ``POST /checkpoint`` and ``POST /rollback`` (docs/api.md).

The runtime builds every one of these answers from the models below: the trainer its status, jobs and
checkpoints, the API server the placeholder status it answers while no trainer does, so both are one
shape. Clients (``onlinemodel_protocol.client``, which the CLI and the operator use) validate what they read with the same models; readers
ignore fields they do not know, so a newer runtime may add some. Times are RFC 3339 UTC, ``...Z``.
Every float field is finite or ``null``: JSON has no NaN, so a non-finite value becomes ``None`` when a
model is built, whoever builds it.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field, field_validator

from onlinemodel_protocol.replication import ReplicationStatus

TrainerState = Literal["starting", "idle", "training", "error", "disabled", "following"]
# rolled_back: the guard found a regression and restored the weights of before the job (docs/guard.md).
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "rolled_back"]
FINISHED_JOB_STATES = ("succeeded", "failed", "cancelled", "rolled_back")
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


class GuardVerdict(_Body):
    """One evaluation of the guard's probes after (part of) a job, compared with before it."""

    time: str
    weight_version: int = Field(ge=0)  # the weights evaluated
    passed: bool  # nothing regressed
    regressed: list[str] = Field(default_factory=list)  # probe names, and "heldout" for the held-out loss
    failing: list[str] = Field(default_factory=list)  # probes failing now (those failing before included)
    heldout_loss_before: FiniteOrNone = None
    heldout_loss: FiniteOrNone = None
    seconds: FiniteOrNone = None


class Job(_Body):
    """One training job as ``GET /train/status`` lists it; the trainer updates it while it runs.

    Progress: ``steps`` (also written as ``steps_done``) of ``steps_total``, the most steps the job can
    take: (examples + replayed earlier examples) x epochs, set when it starts (examples x epochs while
    queued); it ends sooner once every example is learned (early stop), or if cancelled or failed.
    ``eta_seconds`` is the time the remaining steps take at the job's mean step time so far (an upper
    bound under early stop; null before its first step and once it finished).
    """

    id: str
    state: JobState
    examples: int = Field(ge=1)
    epochs: int = Field(ge=1)
    learning_rate: float = Field(allow_inf_nan=False)
    steps: int = Field(0, ge=0)
    steps_total: int | None = Field(None, ge=0)  # None only from a runtime older than this field
    replay_steps: int = Field(0, ge=0)  # of `steps`, those on examples of earlier jobs (replay)
    last_loss: FiniteOrNone = None
    error: str | None = None  # why it failed, or why it was rolled back
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    eta_seconds: FiniteOrNone = None
    guarded: bool = False  # the guard checks this job
    guard: GuardVerdict | None = None  # the guard's last verdict on this job

    @computed_field
    @property
    def steps_done(self) -> int:
        return self.steps


def job_eta_seconds(job: Job, elapsed_seconds: float) -> float | None:
    """Seconds the rest of a running `job` takes at its mean step time after `elapsed_seconds` running."""
    if job.state != "running" or not job.steps or job.steps_total is None:
        return None
    return round(max(job.steps_total - job.steps, 0) * elapsed_seconds / job.steps, 1)


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
    rolled_back: int = Field(0, ge=0)


class RollbackRequest(_Body):
    """``POST /rollback``: a checkpoint's step, its directory name (``step-00000012``), or "latest"."""

    model_config = ConfigDict(extra="forbid")

    to: int | str

    @field_validator("to", mode="before")
    @classmethod
    def _step_or_name(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError('"to" is a checkpoint step (an integer), a checkpoint name, or "latest"')
        if isinstance(value, int) and value < 0:
            raise ValueError('"to" must not be negative')
        return value


class RollbackRecord(_Body):
    """One rollback: the answer of ``POST /rollback`` and ``guard.last_rollback`` of the status."""

    time: str
    source: Literal["guard", "request"]
    weight_version: int = Field(ge=0)  # the version serving the restored weights (always a new one)
    job_id: str | None = None  # the job the guard rolled back
    checkpoint: str | None = None  # the checkpoint restored (source "request")
    step: int | None = Field(None, ge=0)  # that checkpoint's step
    regressed: list[str] = Field(default_factory=list)
    reason: str = ""
    seconds: FiniteOrNone = None


class ProbeResult(_Body):
    name: str
    passed: bool
    answer: str


class GuardStatus(_Body):
    """``guard`` of ``GET /train/status``. Rollbacks are counted with or without a guard file (``POST
    /rollback`` works without one)."""

    enabled: bool = False  # a guard file is set
    probes: list[ProbeResult] = Field(default_factory=list)  # the last evaluation, probe by probe
    heldout_loss: FiniteOrNone = None  # of the last evaluation
    every_steps: int = Field(0, ge=0)
    last_evaluation: GuardVerdict | None = None
    rollbacks: int = Field(0, ge=0)  # since the checkpoint directory's first trainer started
    last_rollback: RollbackRecord | None = None
    snapshot_bytes: int = Field(0, ge=0)  # host memory holding the weights of before the running job
    last_snapshot_seconds: FiniteOrNone = None


class SchedulerStatus(_Body):
    """``scheduler`` of ``GET /train/status``: serving first, training takes what is left."""

    mode: SchedulerMode
    max_decode_slowdown: FiniteOrNone = None  # the budget; null when off
    in_flight_requests: int = Field(0, ge=0)  # generation requests vLLM's API server is answering now
    duty_cycle: float = Field(1.0, ge=0, le=1)  # share of the time the trainer computes while requests wait
    # The budget bounds the p99 gap between tokens (limits.DECODE_SLOWDOWN_QUANTILE), measured per token by
    # vLLM's API server over the newest gaps at the current duty cycle; the means are reported beside it.
    measured_p99_slowdown: FiniteOrNone = None  # p99 gap while training / p99 without: what the budget bounds
    baseline_p99_itl_ms: FiniteOrNone = None  # p99 gap without training
    p99_itl_ms: FiniteOrNone = None  # p99 of the newest gaps, training or not
    measured_slowdown: FiniteOrNone = None  # mean gap while training / mean without, same tokens as the p99's
    baseline_itl_ms: FiniteOrNone = None  # mean gap without training
    slice_ms: FiniteOrNone = None  # the trainer's compute between rests while requests wait; null when off
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


class AnchorStatus(_Body):
    """``anchor`` of ``GET /train/status``: the KL term to the untouched model on the anchor conversations."""

    weight: float = Field(0.0, ge=0)  # 0: off
    conversations: int = Field(0, ge=0)
    from_file: int = Field(0, ge=0)  # of `conversations`, from the anchor file (--anchor-file)
    recorded: bool = False  # every conversation's distributions are recorded (at the first job)
    # Conversations recorded from the untouched model, and from trained weights (new after a restart).
    recorded_untouched: int = Field(0, ge=0)
    recorded_trained: int = Field(0, ge=0)
    record_bytes: int = Field(0, ge=0)


class NullSpaceStatus(_Body):
    """``null_space`` of ``GET /train/status``: updates kept out of the anchor conversations' input directions."""

    energy: float = Field(0.0, ge=0)  # 0: off
    enabled: bool = False  # false once `reason` says why it is off
    matrices: int = Field(0, ge=0)  # trained matrices whose gradients are projected (built at the first job)
    # of them, those whose optimizer scales the update per input column: their whole update is projected too
    updates_projected: int = Field(0, ge=0)
    directions: int = Field(0, ge=0)  # kept out of updates, over all the distinct bases
    basis_bytes: int = Field(0, ge=0)
    passes: int = Field(0, ge=0)  # over the anchor conversations, each gathering at most limits.NULL_SPACE_MAX_BYTES
    skipped: int = Field(0, ge=0)  # matrices left unprojected: their inputs' second moment alone exceeds that
    reason: str | None = None


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
    guard: GuardStatus | None = None
    # Scaled out (onlinemodel_protocol.replication): the learner's followers, or a follower's learner.
    replication: ReplicationStatus | None = None
    replay: ReplayStatus | None = None
    anchor: AnchorStatus | None = None
    null_space: NullSpaceStatus | None = None

    @classmethod
    def placeholder(cls, state: TrainerState, last: TrainStatus | None = None, last_error: str | None = None,
                    restarts: int = 0) -> TrainStatus:
        """The answer while no trainer answers (starting, error) or none exists (disabled): the last
        counters seen, nothing queued."""
        return (last or cls(state=state)).model_copy(
            update={"state": state, "queued_jobs": 0, "last_error": last_error, "trainer_restarts": restarts})


class TrainLimits(_Body):
    """``GET /train/limits``: what one ``POST /train`` may hold and the defaults it gets, so a client splits
    and checks its examples as this server will (``onlinemodel train`` does)."""

    max_examples: int = Field(ge=1)  # examples per request (--max-examples)
    max_messages: int = Field(ge=1)  # messages per example
    max_body_bytes: int = Field(ge=1)  # request body (--max-body-bytes)
    max_model_len: int | None = Field(None, ge=1)  # tokens per example (vLLM's --max-model-len)
    max_chars_per_token: int = Field(ge=1)  # characters per token of max_model_len, checked before rendering
    default_epochs: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0)  # the default
    learning_rate_max: float = Field(gt=0)
    max_queued_jobs: int = Field(ge=1)  # more queued jobs than this are refused with 429


class ErrorDetail(_Body):
    message: str
    type: str | None = None  # the runtime always names one
    param: str | None = None
    code: str | None = None


class ErrorBody(_Body):
    """Every 4xx/5xx of the training routes, in OpenAI's error shape."""

    error: ErrorDetail
