"""RuntimeConfig takes its defaults and bounds from limits: the CLI accepts what the API and CRD accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from onlinemodel_protocol import limits
from onlinemodel_protocol.config import RuntimeConfig


def config(**settings) -> RuntimeConfig:
    return RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om"), **settings)


def test_defaults_are_the_limits():
    cfg = config()
    assert (cfg.learning_rate, cfg.optimizer_rank, cfg.max_examples, cfg.default_epochs, cfg.max_epochs,
            cfg.max_queued_jobs, cfg.checkpoint_keep) == (
        limits.LEARNING_RATE_DEFAULT, limits.OPTIMIZER_RANK_DEFAULT, limits.MAX_EXAMPLES_DEFAULT,
        limits.EPOCHS_DEFAULT, limits.MAX_EPOCHS_DEFAULT, limits.MAX_QUEUED_JOBS_DEFAULT,
        limits.CHECKPOINT_KEEP_DEFAULT)


@pytest.mark.parametrize("field,highest", [
    ("learning_rate", limits.LEARNING_RATE_MAX), ("optimizer_rank", limits.OPTIMIZER_RANK_MAX),
    ("max_examples", limits.MAX_EXAMPLES_CEILING), ("checkpoint_keep", limits.CHECKPOINT_KEEP_MAX)])
def test_upper_bounds_are_inclusive(field, highest):
    assert getattr(config(**{field: highest}), field) == highest
    above = highest * 2 if isinstance(highest, int) else highest * 1.5
    with pytest.raises(ValidationError, match=field):
        config(**{field: above})


@pytest.mark.parametrize("settings,message", [
    (dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(default_epochs=6, max_epochs=5), "exceeds max_epochs"),
    (dict(state_dir=Path("/tmp/" + "x" * 100)), "too long"), (dict(unknown=1), "unknown"),
    (dict(max_decode_slowdown=0.5), "below 1"), (dict(max_decode_slowdown=-1.0), "max_decode_slowdown"),
    (dict(max_decode_slowdown=limits.MAX_DECODE_SLOWDOWN_MAX * 2), "max_decode_slowdown"),
    (dict(max_decode_slowdown=float("nan")), "max_decode_slowdown"),
    (dict(anchor_weight=0.0, anchor_file={"conversations": [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]}), "anchor_weight.*is 0")])
def test_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        RuntimeConfig(**{"model": "/m", "base_model": "/m", "state_dir": Path("/tmp/om"), **settings})


def test_trainer_endpoint_and_environment(monkeypatch, tmp_path):
    cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path)
    assert cfg.trainer_endpoint == f"ipc://{tmp_path / 'trainer.sock'}"
    monkeypatch.delenv("ONLINEMODEL_RUNTIME_CONFIG", raising=False)
    assert RuntimeConfig.from_env() is None
    monkeypatch.setenv("ONLINEMODEL_RUNTIME_CONFIG", cfg.model_dump_json())
    assert RuntimeConfig.from_env() == cfg


@pytest.mark.parametrize("budget,enabled", [
    (limits.MAX_DECODE_SLOWDOWN_DEFAULT, True), (1.0, True), (limits.MAX_DECODE_SLOWDOWN_MAX, True),
    (limits.DECODE_SLOWDOWN_OFF, False)])
def test_decode_slowdown_budget(budget, enabled, tmp_path):
    cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path, max_decode_slowdown=budget)
    assert cfg.pacing_enabled is enabled and cfg.load_signal_path == tmp_path / "load-signal"
    assert config().max_decode_slowdown == limits.MAX_DECODE_SLOWDOWN_DEFAULT
