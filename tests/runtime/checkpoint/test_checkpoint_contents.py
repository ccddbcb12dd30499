"""checkpoint/contents.py on its own: the optimizer state is written only if torch.load(weights_only=True) reads
it back, the trainer state must be JSON, and a checkpoint used as a base passes its recorded base model on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onlinemodel_runtime.checkpoint import CheckpointError
from onlinemodel_runtime.checkpoint.contents import (base_model_of, load_training_state, trainer_state_json,
                                                     write_bytes, write_optimizer_state)
from onlinemodel_runtime.checkpoint.format import META_DIR, META_FILE, TRAINER_STATE_FILE


class Opaque:
    """Picklable, but not something torch.load(weights_only=True) accepts."""


def test_optimizer_and_trainer_state_round_trip(tmp_path: Path) -> None:
    (tmp_path / META_DIR).mkdir()
    size, sha = write_optimizer_state({"state": {0: {"m": torch.ones(3)}}, "lr": 1e-3}, tmp_path)
    assert size > 0 and len(sha) == 64
    write_bytes(tmp_path / META_DIR / TRAINER_STATE_FILE, trainer_state_json({"step": 4}, "trainer_state").encode())
    optimizer, trainer = load_training_state(tmp_path)
    assert trainer == {"step": 4} and optimizer["lr"] == 1e-3
    assert torch.equal(optimizer["state"][0]["m"], torch.ones(3))


def test_what_weights_only_or_json_cannot_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / META_DIR).mkdir()
    with pytest.raises(CheckpointError, match="weights_only"):
        write_optimizer_state({"x": Opaque()}, tmp_path)
    with pytest.raises(CheckpointError, match="JSON"):
        trainer_state_json({"step": Opaque()}, "trainer_state")


def test_a_checkpoint_as_base_passes_its_base_model_on(tmp_path: Path) -> None:
    assert base_model_of(tmp_path) == str(tmp_path.resolve())
    (tmp_path / META_DIR).mkdir()
    (tmp_path / META_DIR / META_FILE).write_text(json.dumps({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert base_model_of(tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
