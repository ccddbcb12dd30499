"""What the null-space projection costs at a model's shape (docs/benchmarks.md, "Null-space bases"): the
trainer's own `NullSpace` on the anchor conversations, gathered in as many passes as
`limits.NULL_SPACE_MAX_BYTES` of second moments at once allows: passes, seconds, the device memory gathering
adds, the directions kept and the bases' bytes; with --step, a forward and backward of one 256-token example
with the projection's gradient hooks and without.

    .venv/bin/python bench/null_space_build.py --model ~/.cache/onlinemodel/models/SmolLM2-135M-Instruct-bf16
    python3 bench/null_space_build.py --shape 1.7B 8B --tokenizer DIR --device cuda --step --out r.json

A --shape has random weights: their inputs spread over more directions than a trained model's, so the
directions and bases it reports are not a trained model's of that shape (the passes and seconds are).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import add_model_arguments, load_model, measure_each  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _load(model_dir: Path, device: str) -> torch.nn.Module:
    from onlinemodel_runtime.optim.policy import TrainPolicy, apply_policy

    model = load_model(model_dir, device)
    apply_policy(model, TrainPolicy())  # the matrices the trainer trains by default
    model.config.use_cache = False
    return model


def _step_seconds(model: torch.nn.Module, ids: torch.Tensor, device: str, repeat: int = 3) -> float:
    times = []
    for i in range(repeat + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        _sync(device)
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return round(sorted(times)[len(times) // 2], 4)


def measure(model_dir: Path, device: str, energy: float, max_bytes: int, step: bool,
            conversations: int | None = None) -> dict:
    from transformers import AutoTokenizer

    from onlinemodel_runtime.trainer.anchor import encode_anchors
    from onlinemodel_runtime.trainer.null_space import NullSpace, input_spaces, moment_bytes

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    anchors = encode_anchors(tokenizer)[:conversations]
    model = _load(model_dir, device)
    spaces = input_spaces(model, anchors[0].input_ids)
    result: dict = {"model": str(model_dir), "device": device, "energy": energy, "max_bytes": max_bytes,
                    "conversations": len(anchors), "tokens": sum(len(a.input_ids) for a in anchors),
                    "trained_matrices": sum(len(s) for s in spaces), "input_spaces": len(spaces),
                    "all_moments_bytes": sum(moment_bytes(model, s) for s in spaces)}
    space = NullSpace(anchors, energy, max_bytes)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        space.build(model)
    _sync(device)
    result["build_seconds"] = round(time.perf_counter() - started, 2)
    if device.startswith("cuda"):
        result["build_peak_added_bytes"] = torch.cuda.max_memory_allocated() - base
    result.update({k: v for k, v in space.summary().items() if k != "energy"})
    if step:
        ids = torch.randint(0, len(tokenizer), (1, 256), device=device)
        result["step_seconds_projected"] = _step_seconds(model, ids, device)
        space.detach()
        result["step_seconds_plain"] = _step_seconds(model, ids, device)
    return result


def table(results: list[dict]) -> str:
    rows = ["| model | device | trained matrices | all moments GiB | passes | build s | build peak added GiB | "
            "directions | bases MB | step s projected / plain |", "|" + "---|" * 10]
    for r in results:
        peak = r.get("build_peak_added_bytes")
        step = (f"{r['step_seconds_projected']} / {r['step_seconds_plain']}" if "step_seconds_plain" in r else "-")
        rows.append(f"| {r['label']} | {r['device']} | {r['trained_matrices']} | {r['all_moments_bytes'] / 2**30:.2f} | "
                    f"{r['passes']} | {r['build_seconds']} | {'-' if peak is None else f'{peak / 2**30:.2f}'} | "
                    f"{r['directions']:,} | {r['basis_bytes'] / 1e6:.0f} | {step} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from onlinemodel_protocol.limits import NULL_SPACE_ENERGY_DEFAULT, NULL_SPACE_MAX_BYTES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, several=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--energy", type=float, default=NULL_SPACE_ENERGY_DEFAULT)
    parser.add_argument("--max-bytes", type=int, default=NULL_SPACE_MAX_BYTES)
    parser.add_argument("--step", action="store_true", help="also time a step with the projection and without")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure_each(parser, args, lambda model_dir: measure(model_dir, args.device, args.energy,
                                                                   args.max_bytes, args.step))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
