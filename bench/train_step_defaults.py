"""What one training step at the defaults costs, and each of its parts: the trainer's own `train_step` with the
default optimizer, the anchor term (its conversations a step in one right-padded forward, or a forward each, as
before 2026-12-03), the null-space projection of the gradients and (Apollo.keep_out) of the whole update of the
matrices APOLLO scales per input column. Median step seconds after a warm-up, and the step's peak device memory
beyond the weights, per configuration, on one model.

    python3 bench/train_step_defaults.py --shape 1.7B --tokenizer DIR --device cuda --out r.json
    .venv/bin/python bench/train_step_defaults.py --model ~/.cache/onlinemodel/models/SmolLM2-135M-Instruct-bf16 \\
        --device cpu --dtype float32 --threads 2

A --shape has random weights: its null-space bases hold more directions than a trained model's would (the
projection costs more per step than it would on the real model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import add_model_arguments, load_model, measure_each  # noqa: E402


class _AForwardEach:
    """The anchor term's work as it ran before 2026-12-03: a forward per conversation (one AnchorTerm of one a
    step per conversation, each at its own turn; the weights read once per conversation). Its loss is the mean of
    the conversations' means, not the token mean the term takes: what is timed is the work, not the value."""

    def __init__(self, terms) -> None:
        self.terms = terms
        self.enabled = True

    def loss(self, model, chunk_tokens=None):
        return sum(t.loss(model, chunk_tokens) for t in self.terms) / len(self.terms)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model_dir: Path, device: str, steps: int, warmup: int, tokens: int,
            conversations: int | None = None, dtype: str = "bfloat16") -> dict:
    from transformers import AutoTokenizer

    from onlinemodel_protocol.limits import (ANCHOR_PER_STEP, ANCHOR_TOP_K, ANCHOR_WEIGHT_DEFAULT,
                                             NULL_SPACE_ENERGY_DEFAULT, NULL_SPACE_MAX_BYTES, OPTIMIZER_RANK_DEFAULT)
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.trainer.anchor import AnchorTerm, encode_anchors
    from onlinemodel_runtime.trainer.loop import train_step
    from onlinemodel_runtime.trainer.null_space import NullSpace

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, device, dtype)
    model.config.use_cache = False
    optimizer = make_optimizer(model, TrainPolicy(), lr=1e-6, rank=OPTIMIZER_RANK_DEFAULT, seed=0)
    optimizer.attach_to_backward()
    anchors = encode_anchors(tokenizer)[:conversations]  # all, but in the test
    space = NullSpace(anchors, NULL_SPACE_ENERGY_DEFAULT, NULL_SPACE_MAX_BYTES, optimizer=optimizer)
    wide = AnchorTerm(anchors, ANCHOR_WEIGHT_DEFAULT, 8, ANCHOR_TOP_K)
    with space.gathering(model):
        wide.record(model, untouched=True)
    space.build(model)
    state = wide.state_dict()

    def term(per_step: int, turn: int = 0) -> AnchorTerm:
        t = AnchorTerm(anchors, ANCHOR_WEIGHT_DEFAULT, per_step, ANCHOR_TOP_K)
        t.load_state_dict({**state, "next": turn})
        return t

    def each(per_step: int) -> _AForwardEach:  # consecutive conversations, as one term's turn would take them
        return _AForwardEach([term(1, turn=i) for i in range(per_step)])

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (tokens,), generator=g).tolist()
    labels = [-100] * (tokens // 4) + ids[tokens // 4:]
    result: dict = {"model": str(model_dir), "device": device, "dtype": dtype, "tokens": tokens, "steps": steps,
                    "anchor_tokens_per_conversation": round(statistics.mean(len(a.input_ids) for a in anchors), 1),
                    "null_space": space.summary(), "configs": []}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def timed(label: str, anchor) -> None:
        times = []
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + steps):
            _sync(device)
            started = time.perf_counter()
            train_step(model, optimizer, ids, labels, anchor=anchor)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - started)
        row = {"config": label, "step_seconds": round(statistics.median(times), 4)}
        if device.startswith("cuda"):
            row["peak_beyond_weights_bytes"] = torch.cuda.max_memory_allocated() - weights
        result["configs"].append(row)
        print(json.dumps(row), flush=True)

    timed(f"defaults: anchor term {ANCHOR_PER_STEP} a step, one forward; null space, whole updates", term(ANCHOR_PER_STEP))
    for n in sorted({2, 8} - {ANCHOR_PER_STEP}):
        timed(f"anchor term {n} a step, one forward", term(n))
    for n in (2, 8):
        timed(f"anchor term {n} a step, a forward each", each(n))
    timed("no anchor term", None)
    optimizer.keep_out({})
    timed("no anchor term; the gradients projected, not the whole updates", None)
    space.detach()
    timed("no anchor term, no projection", None)
    return result


def table(results: list[dict]) -> str:
    rows = ["| model | device | configuration | step s | peak beyond weights GiB |", "|" + "---|" * 5]
    for r in results:
        for c in r["configs"]:
            peak = c.get("peak_beyond_weights_bytes")
            rows.append(f"| {r['label']} | {r['device']} | {c['config']} | {c['step_seconds']} | "
                        f"{'-' if peak is None else f'{peak / 2**30:.2f}'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, several=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (compiling the optimizer's update)")
    parser.add_argument("--tokens", type=int, default=256, help="the example's tokens (its last 3/4 labelled)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the weights' (float32: as served on a CPU without bf16 instructions)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure_each(parser, args, lambda model_dir: measure(model_dir, args.device, args.steps, args.warmup,
                                                                   args.tokens, dtype=args.dtype))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
