"""Real model shapes (from the models' published configs) and random-weight model directories of them.

Where no real model can be downloaded (the GPU machine has no internet), benchmarks and GPU tests serve a
config of the real shape with vLLM's `--load-format dummy` (random weights, no weight files) and the
tokenizer and chat template of a real small model (SmolLM2). `layers` shrinks a shape for tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from qwen3_shapes import QWEN3_SHAPES

# Qwen3.5 text model: every fourth layer is gated full attention, the others Gated DeltaNet.
_QWEN35_27B = dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                   num_key_value_heads=4, head_dim=256, vocab_size=248320, tie_word_embeddings=False,
                   linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128,
                   linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25,
                   full_attention_interval=4)
_QWEN3_MOE_30B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                      num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False, norm_topk_prob=True)
_QWEN35_MOE_35B = dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                       head_dim=256, vocab_size=248320, tie_word_embeddings=False, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
                       linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                       linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25,
                       full_attention_interval=4)

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"qwen3-{k}": ("Qwen3ForCausalLM", v) for k, v in QWEN3_SHAPES.items()},
    **{k: ("Qwen3ForCausalLM", v) for k, v in QWEN3_SHAPES.items()},  # "8B" etc., as the older benches say
    "qwen3.5-27B": ("Qwen3_5ForConditionalGeneration", _QWEN35_27B),
    "qwen3-moe-30B-A3B": ("Qwen3MoeForCausalLM", _QWEN3_MOE_30B),
    "qwen3.5-moe-35B-A3B": ("Qwen3_5MoeForConditionalGeneration", _QWEN35_MOE_35B),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")


def text_config(architecture: str, shape: dict[str, Any], layers: int | None = None) -> dict[str, Any]:
    cfg = dict(shape)
    interval = cfg.pop("full_attention_interval", None)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if interval is not None:
        n = cfg["num_hidden_layers"]
        cfg["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                              for i in range(n)]
    cfg.update(dtype="bfloat16", max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")
    return cfg


def config_dict(name: str, layers: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json of shape `name` (optionally with `layers` decoder layers)."""
    architecture, shape = SHAPES[name]
    text = text_config(architecture, shape, layers)
    if eos_token_id is not None:
        text["eos_token_id"] = eos_token_id
    if architecture == "Qwen3ForCausalLM":
        return {"architectures": [architecture], "model_type": "qwen3", **text}
    if architecture == "Qwen3MoeForCausalLM":
        return {"architectures": [architecture], "model_type": "qwen3_moe", **text}
    if architecture in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        moe = "Moe" in architecture
        # The vision tower keeps transformers' default config: served with --language-model-only, never trained.
        return {"architectures": [architecture], "model_type": "qwen3_5_moe" if moe else "qwen3_5",
                "text_config": {"model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text", **text},
                "tie_word_embeddings": text["tie_word_embeddings"], "dtype": "bfloat16"}
    raise KeyError(architecture)


def write_random_model_dir(out: Path, name: str, tokenizer_dir: Path, layers: int | None = None) -> Path:
    """A model directory with the config of shape `name` and `tokenizer_dir`'s tokenizer; no weights (serve it
    with vLLM's --load-format dummy)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in _TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, out / f)
    eos = None
    gen = Path(tokenizer_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    (out / "config.json").write_text(json.dumps(config_dict(name, layers, eos), indent=1))
    return out


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """--model DIR (weights), or --shape NAME (`several`: NAME...) with --tokenizer DIR and --layers N."""
    parser.add_argument("--model", type=Path, help="a model directory with weights")
    parser.add_argument("--shape", nargs="+" if several else None, choices=sorted(SHAPES),
                        help="random weights of a real shape (needs --tokenizer)")
    parser.add_argument("--tokenizer", type=Path, help="a model directory whose tokenizer a --shape uses")
    parser.add_argument("--layers", type=int, default=None, help="a --shape with this many decoder layers")


def model_dirs(parser: argparse.ArgumentParser, args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path]]:
    """(label, model directory) for what add_model_arguments' flags name (random shapes written under `tmp`);
    a usage error if they name neither or both."""
    if (args.model is None) == (args.shape is None) or (args.shape and not args.tokenizer):
        parser.error("give --model DIR, or --shape NAME with --tokenizer DIR")
    if args.model is not None:
        return [(args.model.name, args.model)]
    shapes = args.shape if isinstance(args.shape, list) else [args.shape]
    return [(s, write_random_model_dir(Path(tmp) / s, s, args.tokenizer, args.layers)) for s in shapes]


def measure_each(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 measure: Callable[[Path], dict[str, Any]]) -> list[dict[str, Any]]:
    """`measure(model directory)` for each model add_model_arguments' flags name, in turn: each result labelled
    and printed as JSON, all of them written to `args.out` (if set) after each, so a run cut short keeps the models
    done; a CUDA device's cache emptied between models."""
    import tempfile

    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model_dir in model_dirs(parser, args, Path(tmp)):
            result = measure(model_dir)
            result["label"] = label
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results


def load_model(model_dir: Path, device: str, dtype: str = "bfloat16"):
    """The model in `dtype` (bf16, as served on a GPU; float32, as on a CPU without bf16 instructions) on
    `device`: its weights, or random ones of its config when it has none (a shape)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if any(Path(model_dir).glob("*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch_dtype)
