"""The layouts at the real models' shapes (bench/model_shapes.py: what the GPU tests and benchmarks serve),
against vLLM's own model built on the meta device (no memory, any size): the random-weight directories
the GPU runs use must be accepted by vLLM's config parsing and match our tables, as served there
(`--language-model-only` for the multimodal Qwen3.5 classes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_runtime.weights.layouts import layout_for
from vllm_load import load_with_vllm

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from model_shapes import write_random_model_dir  # noqa: E402

# The shapes tests/gpu/serving and bench/gpu_vllm.py serve, with the layer counts they use.
SHAPES = {"qwen3-1.7B": 4, "qwen3.5-27B": 4, "qwen3.5-moe-35B-A3B": 4, "qwen3-moe-30B-A3B": 4, "qwen3.5-27B-full": None}


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory) -> dict[str, Path]:
    root, tok = tmp_path_factory.mktemp("shapes"), ensure_smollm2()
    return {name: write_random_model_dir(root / name, name.removesuffix("-full"), tok, layers=layers)
            for name, layers in SHAPES.items()}


@pytest.fixture(scope="module")
def vllm_meta(shape_dirs, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    loaded = load_with_vllm(list(shape_dirs.values()), tmp_path_factory.mktemp("meta") / "meta.pt",
                            language_model_only=True, meta=True)
    return {name: loaded[str(d)]["params"] for name, d in shape_dirs.items()}


@pytest.mark.parametrize("name", SHAPES)
def test_vllm_builds_what_the_layout_expects(shape_dirs, vllm_meta, name):
    config = AutoConfig.from_pretrained(shape_dirs[name])
    layout = layout_for(config)
    tensors = vllm_meta[name]
    assert not any(n.startswith("visual.") for n in tensors)  # --language-model-only
    layout.validate(tensors)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(layout.hf_config)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == \
        {n: s for n, s in layout.hf_shapes().items() if not (layout.tied and n == "lm_head.weight")}
    if name == "qwen3.5-27B-full":  # the benchmark's model: 27B parameters, 54 GB in bf16
        assert 26.5e9 < sum(t.numel() for t in tensors.values()) < 28e9
