"""Checkpoints under the base checkpoint's names: Qwen3.5 dense and MoE (multimodal classes) and Qwen3 MoE.

The trainer's model is the text-only causal LM on views of vLLM's tensors; a checkpoint of it must be a
directory that transformers and vLLM load as the base's own architecture: the language model under
`model.language_model.*`, experts one per tensor as the base stores them, and the base's vision tower and
multi-token-prediction heads carried over from its files. Saved through CheckpointStore from a model on
views (vLLM's `--language-model-only` tensors for the multimodal ones, as served on the GPU), reloaded with
transformers (the same class) and with vLLM's CPU loader: every tensor equal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from onlinemodel_runtime.checkpoint import CheckpointNames, CheckpointStore, hf_weight_tensors, specs_of
from onlinemodel_runtime.weights.hf_model import build_hf_model
from onlinemodel_runtime.weights.layouts import layout_for
from vllm_load import load_with_vllm

CASES = ("qwen3_5", "qwen3_5_moe", "qwen3_moe")
MTP = {"mtp.fc.weight": (128, 256), "mtp.layers.0.mlp.gate_proj.weight": (64, 128)}


def _names(model_dir: Path) -> set[str]:
    names = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    return names


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in model_dir.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _base_with_mtp(src: Path, dest: Path) -> Path:
    """A copy of `src` whose weights also hold multi-token-prediction tensors (as the published ones do)."""
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    tensors.update({n: torch.randn(shape, generator=gen).to(torch.bfloat16) for n, shape in MTP.items()})
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def saved(tiny_dirs, vllm_loaded, vllm_loaded_language_only, tmp_path_factory):
    """name -> (base dir, checkpoint dir, vLLM's tensors after the trainer's change, the trainer's model)."""
    root = tmp_path_factory.mktemp("base-names")
    out = {}
    for name in CASES:
        multimodal = name in vllm_loaded_language_only
        base = _base_with_mtp(tiny_dirs[name], root / f"base-{name}") if multimodal else tiny_dirs[name]
        served = vllm_loaded_language_only if multimodal else vllm_loaded
        tensors = {n: t.clone() for n, t in served[name]["params"].items()}
        model = build_hf_model(base, tensors)
        with torch.no_grad():  # what training does: every parameter moves, in vLLM's memory
            for i, p in enumerate(model.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype) * 0.01)
        store = CheckpointStore(root / f"ckpt-{name}", names=layout_for(AutoConfig.from_pretrained(base)).checkpoint_names)
        pairs = hf_weight_tensors(model)
        info = store.save(iter(pairs), specs_of(pairs), base_model_dir=base, trainer_state={"step": 1})
        out[name] = (base, info.path, tensors, model)
    return out


@pytest.mark.parametrize("name", CASES)
def test_the_checkpoint_has_exactly_the_base_checkpoints_names(saved, name):
    base, ckpt, _, _ = saved[name]
    assert _names(ckpt) == _names(base)
    if name != "qwen3_moe":
        assert any(n.startswith("model.visual.") for n in _names(ckpt))
        for n in MTP:  # carried byte for byte from the base file
            assert torch.equal(load_file(ckpt / "model.safetensors")[n], load_file(base / "model.safetensors")[n])
    expert = {"qwen3_5_moe": "model.language_model.layers.0.mlp.experts.3.down_proj.weight",
              "qwen3_moe": "model.layers.0.mlp.experts.3.down_proj.weight"}.get(name)
    assert expert is None or expert in _names(ckpt)  # one tensor per expert, as the base stores them


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_it_as_the_base_class_with_the_trained_tensors(saved, name):
    base, ckpt, _, model = saved[name]
    config = AutoConfig.from_pretrained(ckpt)
    assert config.architectures == AutoConfig.from_pretrained(base).architectures
    multimodal = config.architectures[0].endswith("ForConditionalGeneration")
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    loaded = auto.from_pretrained(ckpt, dtype=torch.bfloat16)
    original = auto.from_pretrained(base, dtype=torch.bfloat16)
    assert type(loaded) is type(original)
    state, before = loaded.state_dict(), original.state_dict()
    trained = model.state_dict()
    prefix = "model.language_model." if multimodal else "model."
    compared = set()
    for key, tensor in state.items():
        if key.startswith("model.visual."):
            assert torch.equal(tensor, before[key]), key  # the base's frozen vision tower
            continue
        text_key = "model." + key[len(prefix):] if key.startswith(prefix) else key
        # (A_log is float32 in vLLM and in the checkpoint; transformers casts it to the dtype asked for.)
        assert torch.equal(tensor, trained[text_key].to(tensor.dtype)), key
        assert not torch.equal(tensor, before[key]), key  # really the trained values, not the base's
        compared.add(text_key)
    assert compared == set(trained)


def test_vllm_loads_them_into_the_tensors_it_serves(saved, vllm_loaded, tmp_path):
    """vLLM's CPU loader, full model (vision tower included): the language model is exactly the
    trained tensors (what the trainer wrote into vLLM's memory), the vision tower the base's."""
    loaded = load_with_vllm([saved[n][1] for n in CASES], tmp_path / "loaded.pt")
    for name in CASES:
        params = loaded[str(saved[name][1])]["params"]
        trained = saved[name][2]
        for key, tensor in params.items():
            expected = trained[key] if key in trained else vllm_loaded[name]["params"][key]
            assert key in trained or key.startswith("visual."), key
            assert torch.equal(tensor, expected), (name, key)
        assert set(trained) <= set(params)


def test_a_checkpoint_of_a_sharded_checkpoint_carries_the_same_tensors(saved, tmp_path):
    """Resumed from a checkpoint, the next one carries the vision tower and mtp heads from it (here
    sharded, read through its index) unchanged."""
    base, _, _, model = saved["qwen3_5"]
    names = layout_for(AutoConfig.from_pretrained(base)).checkpoint_names
    pairs = hf_weight_tensors(model)
    first = CheckpointStore(tmp_path / "a", names=names, max_shard_bytes=300_000).save(
        iter(pairs), specs_of(pairs), base_model_dir=base, trainer_state={"step": 2})
    assert len(list(first.path.glob("*.safetensors"))) > 2 and (first.path / "model.safetensors.index.json").is_file()
    second = CheckpointStore(tmp_path / "b", names=names).save(
        iter(pairs), specs_of(pairs), base_model_dir=first.path, trainer_state={"step": 3})
    got, want = _tensors(second.path), _tensors(first.path)
    assert set(got) == set(want) == _names(base)
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name


def test_names_are_views_and_split_experts_in_order():
    names = CheckpointNames(renames=(("model.", "model.language_model."),), experts_per_expert=True)
    gate_up = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    down = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    pairs = [("model.layers.0.mlp.experts.gate_up_proj", gate_up), ("model.layers.0.mlp.experts.down_proj", down),
             ("lm_head.weight", torch.zeros(4, 3))]
    out = list(names.tensors(pairs))
    assert [n for n, _ in out] == [
        "model.language_model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.language_model.layers.0.mlp.experts.0.up_proj.weight",
        "model.language_model.layers.0.mlp.experts.1.gate_proj.weight",
        "model.language_model.layers.0.mlp.experts.1.up_proj.weight",
        "model.language_model.layers.0.mlp.experts.0.down_proj.weight",
        "model.language_model.layers.0.mlp.experts.1.down_proj.weight",
        "lm_head.weight"]
    assert torch.equal(out[3][1], gate_up[1, 3:]) and torch.equal(out[5][1], down[1])
    assert out[3][1].untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()  # a view
    assert [(s.name, s.shape) for s in names.specs(specs_of(pairs))] == [(n, tuple(t.shape)) for n, t in out]
