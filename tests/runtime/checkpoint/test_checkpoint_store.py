"""CheckpointStore with a real (tiny) transformers model: round trip, resume, pruning, fallback."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from ckpt_worker import make_base_dir, make_tensors, optimizer_state, save
from ckpt_helpers import CHAT_TEMPLATE, build_tiny_model
from onlinemodel_runtime.checkpoint import (CheckpointBusy, CheckpointError, CheckpointStore, hf_weight_tensors,
                                            specs_of)


class Opaque:
    """Picklable, but not something torch.load(weights_only=True) accepts."""


def _save_model(store: CheckpointStore, model, base: Path, step: int, **kwargs):
    pairs = hf_weight_tensors(model)
    return store.save(iter(pairs), specs_of(pairs), base_model_dir=base,
                      trainer_state={"step": step, "tokens_trained": 7 * step, "weight_version": step + 100},
                      optimizer_state=optimizer_state(step), **kwargs)


def test_round_trip_loads_in_plain_transformers(tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_model()
    with torch.no_grad():  # "training": the live weights differ from the base dir's
        for p in model.parameters():
            p.add_(0.25)
    store = CheckpointStore(tmp_path / "ckpt", max_shard_bytes=40_000)  # several shards
    info = _save_model(store, model, tiny_base, 12, extra_metadata={"job": "unit"})

    assert info.path == tmp_path / "ckpt" / "step-00000012"
    assert (info.step, info.weight_version, info.tokens_trained) == (12, 112, 84)
    assert info.base_model == str(tiny_base.resolve()) and info.content_hash.startswith("sha256:")
    assert info.time.endswith("Z") and info.seconds > 0 and info.size_bytes > 0
    names = {p.name for p in info.path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "model.safetensors.index.json", "onlinemodel"} <= names
    assert "model.safetensors" not in names and ".onlinemodel-complete" not in names  # base weights not copied
    assert info.size_bytes == sum(p.stat().st_size for p in info.path.rglob("*")
                                  if p.is_file() and p.name != "checkpoint.json")

    loaded = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.bfloat16).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 13, 40, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    tok = AutoTokenizer.from_pretrained(info.path)
    assert tok.chat_template == CHAT_TEMPLATE

    assert store.latest(verify_hash=True).content_hash == info.content_hash
    meta = json.loads((info.path / "onlinemodel" / "checkpoint.json").read_text())
    assert meta["extra"] == {"job": "unit"} and meta["weights"]["num_tensors"] == len(hf_weight_tensors(model))

    # Resume: a checkpoint as base keeps the original base model and copies no old weights.
    again = _save_model(store, model, info.path, 13)
    assert again.base_model == str(tiny_base.resolve())
    assert again.content_hash == info.content_hash  # same weights, same hash
    assert not (again.path / "onlinemodel" / "extra").exists()


def test_training_state_loads_with_weights_only(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt")
    info = save(store.root, base, 5, tensors=make_tensors(5, numel=16), store=store)
    opt, trainer = store.load_training_state(store.latest())
    assert trainer == {"step": 5, "tokens_trained": 500}
    assert torch.equal(opt["state"][0]["exp_avg"], torch.full((4,), 5.0))
    # The file itself loads with weights_only=True (what load_training_state uses).
    raw = torch.load(info.path / "onlinemodel" / "optimizer.pt", weights_only=True)
    assert raw["param_groups"][0]["lr"] == 1e-5


def test_bad_inputs_leave_nothing(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt")
    first = save(store.root, base, 1, tensors=make_tensors(1, numel=16), store=store)
    pairs = make_tensors(2, numel=16)

    class Local:
        pass

    cases = [
        (dict(optimizer_state={"x": Opaque()}, trainer_state={"step": 2}), "weights_only"),
        (dict(optimizer_state={"x": Local()}, trainer_state={"step": 2}), "torch.save"),
        (dict(trainer_state={"tokens_trained": 3}), "step"),
        (dict(trainer_state={"step": 2, "when": object()}), "JSON"),
    ]
    for kwargs, match in cases:
        with pytest.raises(CheckpointError, match=match):
            store.save(pairs, base_model_dir=base, **kwargs)
    with pytest.raises(CheckpointError, match="config.json"):
        store.save(pairs, base_model_dir=tmp_path / "nowhere", trainer_state={"step": 2})

    def failing():
        yield pairs[0]
        raise RuntimeError("weights went away")

    with pytest.raises(CheckpointError, match="weights went away.*step-00000001 is still the latest"):
        store.save(failing(), specs_of(pairs), base_model_dir=base, trainer_state={"step": 2})
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "latest", "step-00000001"]
    assert store.latest() == dataclasses.replace(first, seconds=store.latest().seconds)


def test_keep_last_prunes_but_never_latest(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    for step in (1, 2, 3, 4):
        save(store.root, base, step, tensors=make_tensors(step, numel=16), store=store)
    assert sorted(p.name for p in store.root.glob("step-*")) == ["step-00000003", "step-00000004"]
    # A repeated step gets a suffix instead of overwriting.
    info = save(store.root, base, 4, tensors=make_tensors(4, numel=16), store=store)
    assert info.path.name == "step-00000004-1" and store.latest().path == info.path
    assert [i.step for i in store.checkpoints()] == [4, 4]
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path / "x", keep_last=0)


def test_prune_spares_the_checkpoint_being_served(tmp_path: Path) -> None:
    """A server resumed from step-1 passes it as base_model_dir of every later save."""
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt", keep_last=1)
    served = save(store.root, base, 1, tensors=make_tensors(1, numel=16), store=store)
    for step in (2, 3, 4):
        info = store.save(make_tensors(step, numel=16), base_model_dir=served.path,
                          trainer_state={"step": step, "last_loss": float("nan")})
    assert sorted(p.name for p in store.root.glob("step-*")) == ["step-00000001", "step-00000004"]
    assert info.base_model == str(base.resolve())
    assert math.isnan(store.load_training_state(info)[1]["last_loss"])


def test_corrupt_latest_falls_back_with_warning(tmp_path: Path, caplog) -> None:
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt")
    good = save(store.root, base, 1, tensors=make_tensors(1, numel=64), store=store)
    bad = save(store.root, base, 2, tensors=make_tensors(2, numel=64), store=store)
    weights = bad.path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 10)
    with caplog.at_level(logging.WARNING):
        assert store.latest().path == good.path
    assert "step-00000002 is unusable" in caplog.text and "truncated" in caplog.text

    # Same size but flipped bytes: only the full hash check notices.
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size + 10)
    assert store.latest().path == bad.path
    assert store.latest(verify_hash=True).path == good.path

    # A missing completeness record or a garbage pointer also fall back.
    (bad.path / "onlinemodel" / "checkpoint.json").unlink()
    assert store.latest().path == good.path
    (store.root / "latest").write_text("../etc\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert store.latest().path == good.path
    assert "not a checkpoint name" in caplog.text
    # Nothing valid at all: None.
    (good.path / "onlinemodel" / "checkpoint.json").unlink()
    assert store.latest() is None
    assert CheckpointStore(tmp_path / "empty").latest() is None


def test_partial_temp_dirs_are_ignored_and_cleaned(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    root = tmp_path / "ckpt"
    store = CheckpointStore(root)
    good = save(root, base, 1, tensors=make_tensors(1, numel=16), store=store)
    leftover = root / ".tmp-step-00000002-deadbeef"
    (leftover / "onlinemodel").mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\x00" * 100)
    (root / ".tmp-latest-1234").write_text("step-00000002\n")
    (root / "step-00000003").mkdir()  # renamed by hand, never completed: not a checkpoint
    assert store.latest().path == good.path
    CheckpointStore(root)  # opening cleans what interrupted saves left
    assert not leftover.exists() and not (root / ".tmp-latest-1234").exists()
    (leftover / "x").mkdir(parents=True)
    save(root, base, 4, tensors=make_tensors(4, numel=16), store=store)  # so does the next save
    assert not leftover.exists()


def test_second_save_is_busy(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt")
    pairs = make_tensors(1, numel=16)
    seen = []

    def reenter(phase: str) -> None:
        if phase == "weights":
            with pytest.raises(CheckpointBusy):
                store.save(pairs, base_model_dir=base, trainer_state={"step": 9})
            assert store.saving
            seen.append(phase)

    store._on_phase = reenter
    store.save(pairs, base_model_dir=base, trainer_state={"step": 1})
    assert seen == ["weights"] and not store.saving
    store._on_phase = None

    # Another process holding the directory's lock (flock on a separate open file description).
    fd = os.open(store.root / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(CheckpointBusy, match="another process"):
            CheckpointStore(store.root).save(pairs, base_model_dir=base, trainer_state={"step": 2})
    finally:
        os.close(fd)
    assert [i.step for i in store.checkpoints()] == [1]


def test_on_snapshot_runs_once_before_commit(tmp_path: Path) -> None:
    base = make_base_dir(tmp_path / "base")
    store = CheckpointStore(tmp_path / "ckpt")
    pairs = make_tensors(1, numel=16)
    calls = []
    phases = []
    store._on_phase = phases.append
    store.save(pairs, base_model_dir=base, trainer_state={"step": 1},
               on_snapshot=lambda: calls.append(list(phases)))
    assert calls == [["base_files", "optimizer", "weights"]]
    assert phases == ["base_files", "optimizer", "weights", "synced", "renamed", "committed"]
