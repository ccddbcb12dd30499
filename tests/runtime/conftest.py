"""Tiny random models of every supported architecture, and what vLLM's own loader makes of them (once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onlinemodel_runtime.devtools.model_prep import ensure_smollm2, make_tiny_model_dir

from vllm_load import load_with_vllm

# name -> (make_tiny_model_dir kind, overrides)
TINY_MODELS = {
    "qwen3": ("qwen3", {}),
    # Untied, with qkv bias, and a vocabulary vLLM pads (49160 -> 49216 rows).
    "qwen2": ("qwen2", dict(vocab_size=49160)),
    "llama": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_text": ("qwen3_5_text", {}),
    "qwen3_5_moe": ("qwen3_5_moe", {}),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    tok = ensure_smollm2()
    return {name: make_tiny_model_dir(kind, root / name, tokenizer_dir=tok, **overrides)
            for name, (kind, overrides) in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def vllm_loaded(tiny_dirs, tmp_path_factory) -> dict[str, dict]:
    """name -> {"params": vLLM's named_parameters() after its load_weights, "all_names": ...}."""
    loaded = load_with_vllm(list(tiny_dirs.values()), tmp_path_factory.mktemp("vllm") / "loaded.pt")
    return {name: loaded[str(path)] for name, path in tiny_dirs.items()}


MULTIMODAL = ("qwen3_5", "qwen3_5_moe")


@pytest.fixture(scope="session")
def vllm_loaded_language_only(tiny_dirs, tmp_path_factory) -> dict[str, dict]:
    """The multimodal tiny models as vLLM loads them with `--language-model-only` (no vision tower)."""
    dirs = [tiny_dirs[name] for name in MULTIMODAL]
    loaded = load_with_vllm(dirs, tmp_path_factory.mktemp("vllm-lm") / "loaded.pt", language_model_only=True)
    return {name: loaded[str(tiny_dirs[name])] for name in MULTIMODAL}
