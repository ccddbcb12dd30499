"""Only healthy checkpoints become `latest`; pruning keeps the newest healthy one; a changed base model is
refused or set aside, never deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckpt_worker import make_base_dir, make_tensors, optimizer_state
from onlinemodel_runtime.checkpoint import CheckpointError, CheckpointStore, ModelChanged, resume_point, specs_of
from onlinemodel_runtime.checkpoint import health
from onlinemodel_runtime.checkpoint.resume import same_model


def save(store: CheckpointStore, base: Path, step: int, *, poison: str | None = None, **kwargs):
    pairs = make_tensors(step, numel=1024)
    if poison is not None:
        pairs[2][1][7] = float(poison)
    return store.save(iter(pairs), specs_of(pairs), base_model_dir=base, trainer_state={"step": step},
                      optimizer_state=optimizer_state(step), **kwargs)


@pytest.fixture
def base(tmp_path):
    return make_base_dir(tmp_path / "base")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_weight_is_kept_aside_and_latest_stays(tmp_path, base, value):
    store = CheckpointStore(tmp_path / "ckpt")
    good = save(store, base, 1)
    bad = save(store, base, 2, poison=value)
    assert not bad.healthy and "layers.2.weight" in bad.unhealthy_reason
    assert bad.path == tmp_path / "ckpt" / "unhealthy-step-00000002"
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-00000001\n"
    assert store.latest().path == good.path
    assert [c.step for c in store.checkpoints()] == [1]
    with pytest.raises(CheckpointError, match="marked unhealthy"):
        store.validate(bad.path)  # never resumed from, even if someone points at it
    meta = json.loads((bad.path / "onlinemodel" / "checkpoint.json").read_text())
    assert meta["health"] == {"healthy": False, "reasons": [bad.unhealthy_reason]}


def test_the_caller_can_declare_the_loss_unhealthy(tmp_path, base):
    store = CheckpointStore(tmp_path / "ckpt")
    info = save(store, base, 3, unhealthy_reason="the loss is diverging")
    assert not info.healthy and info.unhealthy_reason == "the loss is diverging"
    assert store.latest() is None


def test_only_the_newest_unhealthy_checkpoint_is_kept(tmp_path, base):
    store = CheckpointStore(tmp_path / "ckpt")
    for step in (4, 5, 5, 6):
        save(store, base, step, poison="nan")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")) == [
        "unhealthy-step-00000006"]


def test_pruning_never_deletes_the_newest_healthy_checkpoint(tmp_path, base):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=1)
    save(store, base, 1)
    good = save(store, base, 2)
    for step in range(3, 8):  # a diverging run: every later checkpoint unhealthy
        save(store, base, step, poison="inf")
    assert [c.path for c in store.checkpoints()] == [good.path] and store.latest().path == good.path
    assert (tmp_path / "ckpt" / "unhealthy-step-00000007").is_dir()


def test_all_finite_checks_large_tensors_in_slices(monkeypatch):
    monkeypatch.setattr(health, "SCAN_ELEMENTS", 10)
    t = torch.zeros(95, dtype=torch.bfloat16)
    assert health.all_finite(t)
    t[94] = float("nan")
    assert not health.all_finite(t)
    assert health.all_finite(torch.arange(5))  # integers are always finite
    assert not health.all_finite(torch.full((3, 4), float("inf")).t())  # not contiguous


# --- the base model -----------------------------------------------------------------------------

def test_same_model_by_name_or_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    assert same_model("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B")
    assert same_model(str(tmp_path / "m"), str(tmp_path / "link"))
    assert not same_model("Qwen/Qwen3-1.7B", "Qwen/Qwen3-0.6B")
    assert not same_model(str(tmp_path / "m"), str(tmp_path / "other"))


def test_resume_point_refuses_another_base_model_and_start_over_sets_it_aside(tmp_path, base):
    store = CheckpointStore(tmp_path / "ckpt")
    first = save(store, base, 1, base_model="org/old")
    save(store, base, 2, base_model="org/old", unhealthy_reason="diverging")
    assert resume_point(store, "org/old").path == first.path
    with pytest.raises(ModelChanged, match="'org/old', not from --model 'org/new'"):
        resume_point(store, "org/new")
    assert resume_point(store, "org/new", start_over=True) is None
    (aside,) = [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("previous-")]
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step-00000001", "unhealthy-step-00000002"]
    assert store.latest() is None and store.checkpoints() == []
    # Set aside, the old checkpoints still load as they were.
    assert CheckpointStore(aside).latest().step == 1
    # A new model's checkpoints are written next to the set-aside directory, which nothing prunes.
    save(CheckpointStore(tmp_path / "ckpt", keep_last=1), base, 7, base_model="org/new")
    save(CheckpointStore(tmp_path / "ckpt", keep_last=1), base, 8, base_model="org/new")
    assert aside.is_dir() and resume_point(store, "org/new").step == 8


def test_start_over_with_nothing_to_move(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    assert resume_point(store, "org/new", start_over=True) is None
    assert store.set_aside("previous-x") is None
