"""Runtime settings, validated once by ``onlinemodel serve`` and handed to the plugin and the trainer.

``serve`` writes them as JSON into the environment variable ``ONLINEMODEL_RUNTIME_CONFIG`` of the vLLM
process (read when the endpoint plugin initialises, never at import time); the plugin passes the same
JSON to the trainer on its command line. Defaults and bounds come from ``limits``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from onlinemodel_protocol import limits
from onlinemodel_protocol.anchors import AnchorFile
from onlinemodel_protocol.api import TrainLimits
from onlinemodel_protocol.guard import GuardFile
from onlinemodel_protocol.replication import FOLLOWER_NAME

ENV_CONFIG = "ONLINEMODEL_RUNTIME_CONFIG"
# The bearer token of the training routes. Never part of RuntimeConfig: the config travels on the
# trainer's command line, the token only in the environment of the vLLM process.
ENV_API_TOKEN = "ONLINEMODEL_API_TOKEN"
# vLLM's own key for /v1/*; the training routes take it as their token when ENV_API_TOKEN is unset.
ENV_VLLM_API_KEY = "VLLM_API_KEY"
TRAINER_SOCKET = "trainer.sock"  # in state_dir
# The load signal the API server writes and the trainer maps read-only (in state_dir; docs/serving-first.md).
LOAD_SIGNAL_FILE = "load-signal"


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # What vLLM serves (a checkpoint directory after a resume) and where it originally came from.
    model: str
    base_model: str
    state_dir: Path
    checkpoint_dir: Path | None = None
    checkpoint_every_steps: int = Field(limits.CHECKPOINT_EVERY_STEPS_DEFAULT, ge=0,
                                        description="0: no step-based checkpoints")
    checkpoint_every_seconds: float = Field(limits.CHECKPOINT_EVERY_SECONDS_DEFAULT, ge=0, allow_inf_nan=False,
                                            description="0: no time-based checkpoints")
    checkpoint_keep: int = Field(limits.CHECKPOINT_KEEP_DEFAULT, ge=1, le=limits.CHECKPOINT_KEEP_MAX)
    final_checkpoint_timeout: float = Field(limits.FINAL_CHECKPOINT_TIMEOUT_DEFAULT, gt=0, allow_inf_nan=False)
    training_enabled: bool = True
    # --insecure-open-training: the training routes answer without a token (only when none is set).
    open_training: bool = False
    max_body_bytes: int = Field(limits.MAX_BODY_BYTES_DEFAULT, ge=limits.MAX_BODY_BYTES_MIN,
                                le=limits.MAX_BODY_BYTES_CEILING)
    learning_rate: float = Field(limits.LEARNING_RATE_DEFAULT, gt=0, le=limits.LEARNING_RATE_MAX)
    optimizer_rank: int = Field(limits.OPTIMIZER_RANK_DEFAULT, ge=1, le=limits.OPTIMIZER_RANK_MAX)
    max_examples: int = Field(limits.MAX_EXAMPLES_DEFAULT, ge=1, le=limits.MAX_EXAMPLES_CEILING)
    max_epochs: int = Field(limits.MAX_EPOCHS_DEFAULT, ge=1)
    max_queued_jobs: int = Field(limits.MAX_QUEUED_JOBS_DEFAULT, ge=1)
    default_epochs: int = Field(limits.EPOCHS_DEFAULT, ge=1)
    early_stop: bool = limits.EARLY_STOP_DEFAULT
    weight_rounding: Literal[limits.WEIGHT_ROUNDINGS] = limits.WEIGHT_ROUNDING_DEFAULT
    early_stop_margin: float = Field(limits.EARLY_STOP_MARGIN_DEFAULT, ge=0, le=limits.EARLY_STOP_MARGIN_MAX,
                                     allow_inf_nan=False)
    replay_examples: int = Field(limits.REPLAY_EXAMPLES_DEFAULT, ge=0, le=limits.REPLAY_EXAMPLES_MAX)
    replay_reservoir: int = Field(limits.REPLAY_RESERVOIR_DEFAULT, ge=0, le=limits.REPLAY_RESERVOIR_MAX)
    anchor_weight: float = Field(limits.ANCHOR_WEIGHT_DEFAULT, ge=0, le=limits.ANCHOR_WEIGHT_MAX, allow_inf_nan=False)
    null_space_energy: float = Field(limits.NULL_SPACE_ENERGY_DEFAULT, ge=0, le=limits.NULL_SPACE_ENERGY_MAX,
                                     allow_inf_nan=False)
    # --anchor-file FILE, parsed: the deployment's own anchor conversations (with or instead of the built-in ones).
    anchor_file: AnchorFile | None = None
    trainer_start_timeout: float = Field(limits.TRAINER_START_TIMEOUT_DEFAULT, gt=0)
    trainer_threads: int | None = Field(None, ge=1)
    trainer_restart_limit: int = Field(limits.TRAINER_RESTART_LIMIT_DEFAULT, ge=0)
    # Serving first: the p99 decode slowdown training may cause; DECODE_SLOWDOWN_OFF: no pacing.
    max_decode_slowdown: float = Field(limits.MAX_DECODE_SLOWDOWN_DEFAULT, ge=limits.DECODE_SLOWDOWN_OFF,
                                       le=limits.MAX_DECODE_SLOWDOWN_MAX)
    # Recompute each decoder layer's activations in backward instead of keeping them; None: on a GPU only.
    activation_recompute: bool | None = None
    # --guard FILE, parsed: probes checked after every job, which is rolled back if one regresses.
    guard: GuardFile | None = None
    # Where the trainer asks vLLM the guard's probes (the API server's own address and model name); set by
    # the endpoint plugin when it starts the trainer.
    serving_url: str | None = None
    served_model_name: str | None = None
    # Lets the trainer's local socket accept in-place test writes (never reachable over HTTP).
    debug_ops: bool = False
    # Scaled out (docs/operator.md): a follower serves the weights of the learner at this URL, no trainer.
    follow_url: str | None = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    follower_name: str | None = Field(None, pattern=FOLLOWER_NAME.pattern)  # None: the host name
    # Learner: publish a new version when a job ends and, while one runs, at most every this many seconds.
    sync_interval: float = Field(limits.SYNC_INTERVAL_DEFAULT, ge=limits.SYNC_INTERVAL_MIN,
                                 le=limits.SYNC_INTERVAL_MAX)

    @model_validator(mode="after")
    def _check(self) -> RuntimeConfig:
        if self.max_decode_slowdown != limits.DECODE_SLOWDOWN_OFF and self.max_decode_slowdown < 1:
            raise ValueError(f"max_decode_slowdown {self.max_decode_slowdown} is below 1: a budget is a factor "
                             f"of at least 1, or {limits.DECODE_SLOWDOWN_OFF:g} (off)")
        if self.follow_url is not None and self.training_enabled:
            raise ValueError("a follower (follow_url) does not train: training_enabled must be false")
        if self.anchor_file is not None and not self.anchor_weight:
            raise ValueError("anchor_file (--anchor-file) needs the anchor term, but anchor_weight "
                             "(--anchor-weight) is 0")
        if self.default_epochs > self.max_epochs:
            raise ValueError(f"default_epochs {self.default_epochs} exceeds max_epochs {self.max_epochs}")
        # Unix socket paths are limited to 107 bytes; ZMQ's own error for a longer one is obscure.
        if len(str(self.state_dir / TRAINER_SOCKET)) > 100:
            raise ValueError(f"state_dir {self.state_dir} is too long for the trainer's socket path "
                             "(at most ~88 characters)")
        return self

    def train_limits(self, max_model_len: int | None) -> TrainLimits:
        """``GET /train/limits`` of a server with this config and vLLM's `max_model_len`."""
        return TrainLimits(max_examples=self.max_examples, max_messages=limits.MAX_MESSAGES,
                           max_body_bytes=self.max_body_bytes, max_model_len=max_model_len,
                           max_chars_per_token=limits.MAX_CHARS_PER_TOKEN, default_epochs=self.default_epochs,
                           max_epochs=self.max_epochs, learning_rate=self.learning_rate,
                           learning_rate_max=limits.LEARNING_RATE_MAX, max_queued_jobs=self.max_queued_jobs)

    @property
    def trainer_endpoint(self) -> str:
        return f"ipc://{self.state_dir / TRAINER_SOCKET}"

    @property
    def load_signal_path(self) -> Path:
        return self.state_dir / LOAD_SIGNAL_FILE

    @property
    def pacing_enabled(self) -> bool:
        return self.max_decode_slowdown != limits.DECODE_SLOWDOWN_OFF

    @classmethod
    def from_env(cls) -> RuntimeConfig | None:
        raw = os.environ.get(ENV_CONFIG)
        return cls.model_validate_json(raw) if raw else None
