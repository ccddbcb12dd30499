"""A checkpoint written back into a live model in place (POST /rollback), and which checkpoint a rollback
names: steps, names, paths, and the ones that must not be restored."""

from __future__ import annotations

import pytest
import torch

from ckpt_helpers import build_tiny_model
from onlinemodel_runtime.checkpoint import (LATEST, CheckpointError, CheckpointNames, CheckpointNotFound,
                                            CheckpointStore, CheckpointUnusable, find_checkpoint, hf_weight_tensors,
                                            load_weights_into)


def save(store: CheckpointStore, model, base, step: int):
    return store.save(hf_weight_tensors(model), base_model_dir=base, trainer_state={"step": step})


def test_a_checkpoint_is_written_back_in_place_bit_exact(tiny_base, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=5)
    saved_model = build_tiny_model(seed=1)
    info = save(store, saved_model, tiny_base, 3)
    live = build_tiny_model(seed=2)
    views = {n: p.data_ptr() for n, p in live.named_parameters()}
    written = load_weights_into(live, info.path)
    assert written == sum(t.numel() * t.element_size() for _, t in hf_weight_tensors(live))
    for (name, p), (_, q) in zip(live.named_parameters(), saved_model.named_parameters()):
        assert torch.equal(p, q), name
        assert p.data_ptr() == views[name]  # the same memory: what vLLM serves


def test_renamed_names_are_followed_back(tiny_base, tmp_path):
    names = CheckpointNames(renames=(("model.", "model.language_model."),))
    store = CheckpointStore(tmp_path / "ckpt", names=names)
    saved_model = build_tiny_model(seed=1)
    info = save(store, saved_model, tiny_base, 1)
    live = build_tiny_model(seed=2)
    with pytest.raises(CheckpointError, match="has no tensor 'model.embed_tokens.weight'"):
        load_weights_into(live, info.path)  # without the names, nothing matches
    load_weights_into(live, info.path, names)
    assert all(torch.equal(p, q) for p, q in zip(live.parameters(), saved_model.parameters()))


def test_a_checkpoint_of_another_shape_writes_nothing(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from ckpt_helpers import tiny_config

    store = CheckpointStore(tmp_path / "ckpt")
    info = save(store, build_tiny_model(seed=1), tiny_base, 1)
    wider = AutoModelForCausalLM.from_config(tiny_config().__class__(**{**tiny_config().to_dict(),
                                                                       "intermediate_size": 96}),
                                             dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in wider.named_parameters()}
    with pytest.raises(CheckpointError, match="has shape"):
        load_weights_into(wider, info.path)
    assert all(torch.equal(p, before[n]) for n, p in wider.named_parameters())


def test_which_checkpoint_a_rollback_names(tiny_base, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=5)
    with pytest.raises(CheckpointNotFound):
        find_checkpoint(store, LATEST)
    model = build_tiny_model()
    first = save(store, model, tiny_base, 4)
    again = save(store, model, tiny_base, 4)  # the same step twice: step-00000004-1
    latest = save(store, model, tiny_base, 40)
    assert again.path.name == "step-00000004-1"
    assert find_checkpoint(store, 4).path == again.path  # the newest of that step
    assert find_checkpoint(store, "step-00000004").path == first.path
    assert find_checkpoint(store, str(first.path)).path == first.path
    assert find_checkpoint(store, LATEST).path == latest.path
    assert find_checkpoint(store, 40).path == latest.path
    for missing in (400, 0, "step-00000005", "nonsense", "../step-00000004", str(tmp_path / "step-00000004")):
        with pytest.raises(CheckpointNotFound):
            find_checkpoint(store, missing)
    (store.root / "unhealthy-step-00000041").mkdir()
    for unusable in (41, "unhealthy-step-00000041"):
        with pytest.raises(CheckpointUnusable, match="unhealthy"):
            find_checkpoint(store, unusable)
    (latest.path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointUnusable, match="model.safetensors"):
        find_checkpoint(store, 40)
