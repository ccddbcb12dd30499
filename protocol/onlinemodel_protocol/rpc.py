"""Names and messages between the runtime's processes inside the pod.

- ``onlinemodel serve`` -> vLLM: the plugins it allows (``VLLM_PLUGINS``) and the worker extension class.
- vLLM's API server -> its engine workers: the ``collective_rpc`` method that exports the weights, each
  worker's answer (``WeightsExported``) and the weights manifest's format (``WEIGHTS_FORMAT_VERSION``); under
  tensor parallelism every rank exports its own shard into ``WorkerShard.state_dir``.
- vLLM's API server (``server/supervisor.py``) -> the trainer process (``trainer/server.py``): ZMQ
  requests ``{"op": OP, **args}``, answered by ``{"ok": true, "result": ...}`` or
  ``{"ok": false, "error": ..., "code": HTTP status}``. ``OPS`` gives each operation's argument and
  result models. A trainer that cannot work with this model or config exits with ``EXIT_PERMANENT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from onlinemodel_protocol.api import (CheckpointRecord, Job, JobCounts, RollbackRecord, RollbackRequest, TrainAccepted,
                                      TrainStatus)
from onlinemodel_protocol.limits import LEARNING_RATE_MAX, TENSOR_PARALLEL_SIZE_MAX
from onlinemodel_protocol.replication import Snapshot

# Entry-point names in pyproject.toml.
GENERAL_PLUGIN = "onlinemodel_weights"  # vllm.general_plugins
ENDPOINT_PLUGIN = "onlinemodel_train"  # vllm.endpoint_plugins
STAT_LOGGER_PLUGIN = "onlinemodel_token_gaps"  # vllm.stat_logger_plugins
# vLLM's --worker-extension-cls, and the method of it the API server calls through collective_rpc.
WORKER_EXTENSION_CLS = "onlinemodel_runtime.vllm_plugins.worker.WeightExportExtension"
EXPORT_WEIGHTS_METHOD = "onlinemodel_export_weights"
# The weights manifest (weights.json, weights/shared.py). 3: the worker's tensor-parallel rank and size.
WEIGHTS_FORMAT_VERSION = 3

# The trainer's exit status when restarting it will not help (unsupported model, bad config).
EXIT_PERMANENT = 2
# `onlinemodel serve`'s exit status when the checkpoint directory holds a different base model than
# --model (and --start-over was not given): the operator reports it as a condition instead of restarting.
EXIT_MODEL_CHANGED = 3
# `onlinemodel serve`'s exit status for a setting it refuses before starting vLLM (no API token for the
# training routes, a state directory others can read, a bad flag value), as argparse's own errors.
EXIT_USAGE = 2

# Label of a token without loss (transformers' ignore_index).
IGNORE_INDEX = -100


class TrainerOp(str, Enum):
    PING = "ping"
    STATUS = "status"  # TrainerService.status
    TRAIN = "train"  # TrainerService.submit
    CANCEL = "cancel"  # TrainerService.cancel
    CHECKPOINT = "checkpoint"  # TrainerService.checkpoint
    ROLLBACK = "rollback"  # TrainerService.rollback_to
    INTROSPECT = "introspect"  # where the parameters live (tests)
    DEBUG_SCALE = "debug_scale"  # scale one parameter in place (tests, behind debug_ops)
    SHUTDOWN = "shutdown"
    PUBLISH = "publish"  # TrainerService.publish: snapshot the trainable tensors for followers


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkerShard(_Message):
    """The tensor-parallel shard of the model one vLLM worker holds (and exports)."""

    tp_rank: int = Field(0, ge=0)
    tp_size: int = Field(1, ge=1, le=TENSOR_PARALLEL_SIZE_MAX)

    @model_validator(mode="after")
    def _rank_in_size(self) -> WorkerShard:
        if self.tp_rank >= self.tp_size:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} is outside size {self.tp_size}")
        return self

    def state_dir(self, state_dir: Path) -> Path:
        """Where this shard's manifest goes: the state directory itself at size 1 (as before tensor
        parallelism), else its ``rank{r}`` subdirectory."""
        return Path(state_dir) if self.tp_size == 1 else Path(state_dir) / f"rank{self.tp_rank}"


class WeightsExported(_Message):
    """One worker's answer to ``EXPORT_WEIGHTS_METHOD``."""

    shard: WorkerShard
    transport: str
    tensors: int = Field(ge=1)


def exported_tp_size(answers: Sequence[Any]) -> int:
    """The tensor-parallel size of the workers' ``EXPORT_WEIGHTS_METHOD`` answers (collective_rpc's list);
    ValueError unless every rank of that size answered exactly once."""
    exports = [WeightsExported.model_validate(a) for a in answers]
    if not exports:
        raise ValueError("no vLLM worker answered the weights export")
    size = exports[0].shard.tp_size
    ranks = sorted(e.shard.tp_rank for e in exports)
    if any(e.shard.tp_size != size for e in exports) or ranks != list(range(size)):
        raise ValueError(f"the weights export answered for ranks {ranks} (sizes "
                         f"{sorted({e.shard.tp_size for e in exports})}): expected each of ranks 0..{size - 1} once")
    return size


class EncodedExample(_Message):
    """One tokenized chat example: loss on the tokens whose label is not IGNORE_INDEX."""

    input_ids: list[int] = Field(min_length=1)
    labels: list[int]

    @model_validator(mode="after")
    def _aligned(self) -> EncodedExample:
        if len(self.labels) != len(self.input_ids):
            raise ValueError(f"{len(self.labels)} labels for {len(self.input_ids)} tokens")
        return self

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class TrainJob(_Message):
    """A ``POST /train`` as the trainer receives it: validated, tokenized, every default resolved."""

    examples: list[EncodedExample] = Field(min_length=1)
    epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0, le=LEARNING_RATE_MAX)
    guard: bool = True  # False: the job asked to skip the guard (refused unless the guard file allows it)


class CancelJob(_Message):
    job_id: str


class Publish(_Message):
    directory: str  # where the version's stream and manifest go (the learner's state directory)


class DebugScale(_Message):
    name: str
    factor: float


class Counters(_Message):
    """What a restarted trainer continues from: the counters of the last status the supervisor saw."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    steps: int = Field(0, ge=0)
    tokens_trained: int = Field(0, ge=0)
    weight_version: int = Field(0, ge=0)
    skipped_steps: int = Field(0, ge=0)
    job_counts: JobCounts = Field(default_factory=JobCounts)


@dataclass(frozen=True)
class OpSpec:
    args: type[BaseModel] | None = None  # None: no arguments
    result: type[BaseModel] | None = None  # None: free-form JSON (ping and the test operations)


OPS: dict[TrainerOp, OpSpec] = {
    TrainerOp.PING: OpSpec(),
    TrainerOp.STATUS: OpSpec(result=TrainStatus),
    TrainerOp.TRAIN: OpSpec(args=TrainJob, result=TrainAccepted),
    TrainerOp.CANCEL: OpSpec(args=CancelJob, result=Job),
    TrainerOp.CHECKPOINT: OpSpec(result=CheckpointRecord),
    TrainerOp.ROLLBACK: OpSpec(args=RollbackRequest, result=RollbackRecord),
    TrainerOp.INTROSPECT: OpSpec(),
    TrainerOp.DEBUG_SCALE: OpSpec(args=DebugScale),
    TrainerOp.SHUTDOWN: OpSpec(),
    TrainerOp.PUBLISH: OpSpec(args=Publish, result=Snapshot),
}


class TrainerReply(BaseModel):
    ok: bool
    result: Any = None
    error: str | None = None
    code: int = 500  # the HTTP status the API server answers with
