"""Checkpoint time and size: CheckpointStore.save vs transformers' save_pretrained.

    python bench/checkpoint_bench.py                      # SmolLM2-135M-Instruct bf16 on CPU
    python bench/checkpoint_bench.py --random qwen3-1.7b --device cuda   # random weights on a GPU

Reports, per run: seconds to a durable checkpoint (fsynced, `latest` committed), size, MB/s, the
peak extra host RSS and device memory during the save (should stay near zero: tensors are copied
out one bounded chunk at a time), and the time to validate (`latest()`), to verify hashes, and
to load the checkpoint back with transformers. `--notes FILE` writes a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from onlinemodel_runtime.checkpoint import CheckpointStore, hf_weight_tensors, specs_of  # noqa: E402
from qwen3_shapes import QWEN3_SHAPES  # noqa: E402

# Qwen3 shapes (random weights) for GPU runs where no real model can be downloaded.
RANDOM_SHAPES = {f"qwen3-{name.lower()}": shape for name, shape in QWEN3_SHAPES.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples RSS (and CUDA allocated memory) in a thread; reports the peak above the start."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "PeakSampler":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self.device == "cuda":
            self.cuda_extra = torch.cuda.max_memory_allocated() - self.cuda_start


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    if args.random:
        config = Qwen3Config(**RANDOM_SHAPES[args.random], max_position_embeddings=4096)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        base = Path(tempfile.mkdtemp(prefix="ckpt-bench-base-"))
        config.save_pretrained(base)
        return model, base, f"random {args.random} (Qwen3 shapes)"
    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

    base = ensure_smollm2()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(args.device)
    AutoConfig.from_pretrained(base)  # fail early if the directory is unusable
    return model, base, "SmolLM2-135M-Instruct"


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    desc = f"{names[0] if names else cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda":
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", choices=sorted(RANDOM_SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--root", type=Path, help="checkpoint directory (default: a temp dir, removed after)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip save_pretrained and reload timing")
    parser.add_argument("--notes", type=Path, help="write a markdown summary here")
    args = parser.parse_args()

    model, base, label = build_model(args)
    root = args.root or Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    store = CheckpointStore(root, keep_last=1, max_shard_bytes=int(args.max_shard_gb * 1e9))
    pairs = hf_weight_tensors(model)
    with torch.no_grad():  # fault in mmap-loaded weights so RSS growth below is the save's own
        for _, t in pairs:
            t.view(torch.uint8).max()
    specs = specs_of(pairs)
    weight_bytes = sum(s.nbytes for s in specs)
    # An APOLLO-sized optimizer state stand-in: a few small tensors, as the real one is (rank 1).
    opt_state = {"state": {i: {"step": torch.tensor(1.0)} for i in range(len(pairs))}, "param_groups": []}
    rows = []
    for i in range(args.repeat):
        snap: list[float] = []
        t0 = time.monotonic()
        with PeakSampler(args.device) as peak:
            info = store.save(iter(pairs), specs, base_model_dir=base,
                              trainer_state={"step": i + 1, "tokens_trained": 0}, optimizer_state=opt_state,
                              on_snapshot=lambda: snap.append(time.monotonic() - t0))
        rows.append((info.seconds, peak.peak - peak.start, getattr(peak, "cuda_extra", 0), snap[0]))
        print(f"save {i + 1}: {info.seconds:.2f} s (snapshot {snap[0]:.2f} s), {info.size_bytes / 1e6:.1f} MB, "
              f"{weight_bytes / 1e6 / info.seconds:.0f} MB/s, host RSS +{rows[-1][1] / 2**20:.1f} MiB"
              + (f", device +{rows[-1][2] / 2**20:.1f} MiB" if args.device == "cuda" else ""), flush=True)
    t = time.monotonic()
    latest = store.latest()
    validate_s = time.monotonic() - t
    t = time.monotonic()
    store.latest(verify_hash=True)
    verify_s = time.monotonic() - t
    baseline_s = reload_s = None
    if not args.no_baseline:
        out = Path(tempfile.mkdtemp(prefix="ckpt-bench-hf-"))
        t = time.monotonic()
        model.save_pretrained(out, safe_serialization=True)
        baseline_s = time.monotonic() - t  # no fsync: a lower bound for a durable save
        shutil.rmtree(out, ignore_errors=True)
        from transformers import AutoModelForCausalLM

        t = time.monotonic()
        AutoModelForCausalLM.from_pretrained(latest.path, dtype=torch.bfloat16)
        reload_s = time.monotonic() - t
    best = min(r[0] for r in rows)
    lines = [
        f"## Checkpoint of {label} ({args.device})",
        "",
        f"Machine: {machine(args.device)}; disk under {root}.",
        f"Weights: {weight_bytes / 1e6:.1f} MB bf16 in {len(specs)} tensors; checkpoint {latest.size_bytes / 1e6:.1f} MB "
        f"in {len(list(latest.path.rglob('*')))} files.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| CheckpointStore.save, durable (best of {len(rows)}) | {best:.2f} s ({weight_bytes / 1e6 / best:.0f} MB/s) |",
        f"| all runs (s) | {', '.join(f'{r[0]:.2f}' for r in rows)} |",
        f"| of which snapshot (tensors + optimizer written, before fsync; training may resume) | "
        f"{', '.join(f'{r[3]:.2f}' for r in rows)} s |",
        f"| peak extra host RSS during save | {max(r[1] for r in rows) / 2**20:.1f} MiB |",
    ]
    if args.device == "cuda":
        lines.append(f"| peak extra device memory during save | {max(r[2] for r in rows) / 2**20:.1f} MiB |")
    lines += [
        f"| latest() validation (headers, sizes) | {validate_s * 1000:.0f} ms |",
        f"| latest(verify_hash=True) | {verify_s:.2f} s |",
    ]
    if baseline_s is not None:
        lines += [f"| transformers save_pretrained, not fsynced (baseline) | {baseline_s:.2f} s |",
                  f"| AutoModelForCausalLM.from_pretrained(checkpoint) | {reload_s:.2f} s |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.notes:
        args.notes.parent.mkdir(parents=True, exist_ok=True)
        with open(args.notes, "a") as f:
            f.write(text + "\n")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
