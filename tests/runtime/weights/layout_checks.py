"""Checks every architecture's layout must pass against the tensors vLLM's own loader produced."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from onlinemodel_runtime.weights.hf_model import assert_views_of, build_hf_model
from onlinemodel_runtime.weights.layouts import hf_views, layout_for, pack_hf_state_dict, validate


def reference_model(model_dir: Path):
    """Plain transformers on the directory: the full multimodal model where that is what it holds."""
    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForImageTextToText if config.architectures[0].endswith("ForConditionalGeneration") \
        else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


def check_tables_against_vllm(model_dir: Path, vllm: dict) -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes of vLLM's tensors match the table; each view equals transformers' tensor.

    Returns vLLM's tensors. transformers' text-only causal LM (what the trainer builds) is the reference
    for the views; `AutoModelForCausalLM` loads it from a multimodal directory by itself.
    """
    config = AutoConfig.from_pretrained(model_dir)
    real, layout = vllm["params"], layout_for(config)
    validate(config, real)
    passengers = {n for n in real if n.startswith(layout.plan.passengers)}
    assert sorted(set(real) - passengers) == sorted(layout.vllm_specs)
    for name, spec in layout.vllm_specs.items():
        assert real[name].dtype == (spec.dtype or torch.bfloat16), name
    text = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    views = hf_views(config, real)
    assert set(views) == set(text)
    for name, view in views.items():
        assert torch.equal(view, text[name].to(view.dtype)), name
    # Packing transformers' tensors the way the table says reproduces vLLM's bytes.
    packed = pack_hf_state_dict(config, {n: t for n, t in text.items() if n in layout.hf_to_vllm})
    for name, tensor in packed.items():
        assert torch.equal(tensor, real[name]), name
    return real


def check_logits(model_dir: Path, vllm_tensors: dict[str, torch.Tensor]) -> None:
    """The trainer's model on vLLM's tensors computes what plain transformers computes, bit for bit."""
    ref = reference_model(model_dir)
    tensors = {n: t.clone() for n, t in vllm_tensors.items()}
    model = build_hf_model(model_dir, tensors)
    assert_views_of(model, tensors)
    ids = torch.randint(0, ref.config.get_text_config().vocab_size, (2, 21),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids).logits
    assert got.shape == expected.shape
    assert expected.abs().mean() > 0.1  # far from uniform: a swapped row block could not hide
    assert torch.equal(got, expected)


def check_update_through_views(model_dir: Path, vllm_tensors: dict[str, torch.Tensor]) -> None:
    """A backward and an in-place SGD step through the views change exactly the right vLLM bytes."""
    tensors = {n: t.clone() for n, t in vllm_tensors.items()}
    before = {n: t.clone() for n, t in tensors.items()}
    model = build_hf_model(model_dir, tensors, requires_grad=True, train=True)
    layout = layout_for(AutoConfig.from_pretrained(model_dir))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    expected = {n: t.clone() for n, t in before.items()}
    lr = 0.5
    for hf_name, p in params.items():
        assert p.grad is not None, hf_name
        slot = layout.hf_to_vllm[hf_name]
        expected[slot.vllm_name].narrow(0, slot.offset, slot.length).add_(p.grad, alpha=-lr)
    torch.optim.SGD(params.values(), lr=lr).step()
    changed = 0
    for name, t in tensors.items():
        assert torch.equal(t, expected[name]), name  # passengers (vision tower) stay as they were
        changed += not torch.equal(t, before[name])
    assert changed >= len(layout.vllm_specs) // 2
