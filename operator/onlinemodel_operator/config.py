"""Operator settings (not per-resource): timings and where to watch. Read when the operator starts."""

from __future__ import annotations

from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "ONLINEMODEL_OPERATOR_"


class OperatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval: float = Field(10.0, gt=0, description="Seconds between two polls of each pod's /train/status.")
    retry_delay: float = Field(5.0, gt=0, description="Seconds before a handler retries something not ready yet.")
    runtime_timeout: float = Field(5.0, gt=0, description="Timeout of GET /train/status.")
    checkpoint_timeout: float = Field(600.0, gt=0, description="How long a POST /checkpoint may take.")
    namespaces: tuple[str, ...] = Field((), description="Namespaces to watch; empty: all of them.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: object) -> "OperatorConfig":
        """Settings from ONLINEMODEL_OPERATOR_* variables (e.g. ONLINEMODEL_OPERATOR_POLL_INTERVAL=2), then overrides."""
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            values[name] = tuple(n.strip() for n in raw.split(",") if n.strip()) if name == "namespaces" else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
