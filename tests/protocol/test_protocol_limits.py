"""One contract for limits: `onlinemodel serve`'s flags, RuntimeConfig and the POST /train parser take every
default and bound from onlinemodel_protocol.limits, and accept exactly what it allows (the CRD's side is in
tests/operator)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from onlinemodel_protocol import limits
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.rpc import EncodedExample, TrainJob
from onlinemodel_runtime import cli
from onlinemodel_runtime.server.train_request import ExampleError, parse_train_request

# serve flag (argparse dest) -> its default in limits
FLAG_DEFAULTS = {
    "learning_rate": limits.LEARNING_RATE_DEFAULT,
    "optimizer_rank": limits.OPTIMIZER_RANK_DEFAULT,
    "max_examples": limits.MAX_EXAMPLES_DEFAULT,
    "default_epochs": limits.EPOCHS_DEFAULT,
    "early_stop": limits.EARLY_STOP_DEFAULT,
    "early_stop_margin": limits.EARLY_STOP_MARGIN_DEFAULT,
    "replay_examples": limits.REPLAY_EXAMPLES_DEFAULT,
    "replay_reservoir": limits.REPLAY_RESERVOIR_DEFAULT,
    "anchor_weight": limits.ANCHOR_WEIGHT_DEFAULT,
    "null_space_energy": limits.NULL_SPACE_ENERGY_DEFAULT,
    "checkpoint_keep": limits.CHECKPOINT_KEEP_DEFAULT,
    "checkpoint_every_steps": limits.CHECKPOINT_EVERY_STEPS_DEFAULT,
    "checkpoint_every_seconds": limits.CHECKPOINT_EVERY_SECONDS_DEFAULT,
    "final_checkpoint_timeout": limits.FINAL_CHECKPOINT_TIMEOUT_DEFAULT,
    "max_body_bytes": limits.MAX_BODY_BYTES_DEFAULT,
    "max_decode_slowdown": limits.MAX_DECODE_SLOWDOWN_DEFAULT,
    "sync_interval": limits.SYNC_INTERVAL_DEFAULT,
}
# RuntimeConfig field -> (lowest accepted, highest accepted) per limits
BOUNDS = {
    "learning_rate": (math.nextafter(0.0, 1.0), limits.LEARNING_RATE_MAX),
    "optimizer_rank": (1, limits.OPTIMIZER_RANK_MAX),
    "max_examples": (1, limits.MAX_EXAMPLES_CEILING),
    "replay_examples": (0, limits.REPLAY_EXAMPLES_MAX),
    "replay_reservoir": (0, limits.REPLAY_RESERVOIR_MAX),
    "anchor_weight": (0.0, limits.ANCHOR_WEIGHT_MAX),
    "null_space_energy": (0.0, limits.NULL_SPACE_ENERGY_MAX),
    "early_stop_margin": (0.0, limits.EARLY_STOP_MARGIN_MAX),
    "checkpoint_keep": (1, limits.CHECKPOINT_KEEP_MAX),
    "max_body_bytes": (limits.MAX_BODY_BYTES_MIN, limits.MAX_BODY_BYTES_CEILING),
    "checkpoint_every_steps": (0, None),
    "checkpoint_every_seconds": (0.0, None),
    # off, or a factor in [1, max]: the gap between is RuntimeConfig's own check (test_protocol_config)
    "max_decode_slowdown": (limits.DECODE_SLOWDOWN_OFF, limits.MAX_DECODE_SLOWDOWN_MAX),
    "sync_interval": (limits.SYNC_INTERVAL_MIN, limits.SYNC_INTERVAL_MAX),
}


def config(**settings) -> RuntimeConfig:
    return RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om"), **settings)


def serve_args(*argv: str):
    parser = cli.argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_known_args(["serve", "--model", "/m", *argv])[0]


def test_serve_flags_and_runtime_config_default_to_the_limits():
    args, cfg = serve_args(), config()
    for name, default in FLAG_DEFAULTS.items():
        assert getattr(args, name) == default, name
        assert getattr(cfg, name) == default, name
    assert cli.build_config(args, Path("/tmp/om")) == cfg


def _step(value, direction):
    return math.nextafter(value, direction) if isinstance(value, float) else value + (1 if direction > 0 else -1)


@pytest.mark.parametrize("field", list(BOUNDS))
def test_runtime_config_accepts_exactly_the_limits(field):
    low, high = BOUNDS[field]
    accepted, refused = [low], [_step(low, -math.inf)]
    if high is not None:
        accepted.append(high)
        refused.append(_step(high, math.inf))
    for value in accepted:
        assert getattr(config(**{field: value}), field) == value
    for value in refused:
        with pytest.raises(ValidationError, match=field):
            config(**{field: value})


def _body(examples=1, messages=2, **extra):
    turns = [{"role": ("user", "assistant")[i % 2], "content": "x"} for i in range(messages)]
    return {"examples": [{"messages": turns}] * examples, **extra}


def test_the_request_parser_accepts_exactly_the_limits():
    cfg = config()
    parse_train_request(_body(learning_rate=limits.LEARNING_RATE_MAX, epochs=cfg.max_epochs,
                              examples=cfg.max_examples, messages=limits.MAX_MESSAGES), cfg)
    for refused, status in ((_body(learning_rate=math.nextafter(limits.LEARNING_RATE_MAX, 2)), 400),
                            (_body(learning_rate=0.0), 400),
                            (_body(epochs=cfg.max_epochs + 1), 400),
                            (_body(examples=cfg.max_examples + 1), 413),
                            (_body(messages=limits.MAX_MESSAGES + 1), 413)):
        with pytest.raises(ExampleError) as err:
            parse_train_request(refused, cfg)
        assert err.value.http_status == status
    assert config(max_epochs=limits.MAX_EPOCHS_DEFAULT).max_epochs == cfg.max_epochs


def test_the_trainer_accepts_what_the_api_accepts():
    example = EncodedExample(input_ids=[1, 2], labels=[-100, 2])
    assert TrainJob(examples=[example], epochs=1, learning_rate=limits.LEARNING_RATE_MAX).learning_rate == 1.0
    with pytest.raises(ValidationError):
        TrainJob(examples=[example], epochs=1, learning_rate=math.nextafter(limits.LEARNING_RATE_MAX, 2))


def test_a_follower_config():
    args = serve_args("--follow", "http://chat-train.ml.svc:8000", "--follower-name", "chat-follower-1")
    cfg = cli.build_config(args, Path("/tmp/om"))
    assert cfg.follow_url == "http://chat-train.ml.svc:8000" and not cfg.training_enabled
    assert cfg.follower_name == "chat-follower-1"
    for bad in ({"follow_url": "ftp://x"}, {"follow_url": "http://"}, {"follower_name": "Bad_Name"},
                {"follow_url": "http://x:8000", "training_enabled": True}):
        with pytest.raises(ValidationError):
            config(**{"training_enabled": False, **bad})
