"""Helpers for checkpoint tests, also run as a subprocess that saves (and gets killed or fails).

    python ckpt_worker.py ROOT BASE_DIR STEP MODE
MODE: `stall-mid-weights` (write 3 tensors, touch ROOT.marker, hang), `stall-at:PHASE` (touch the
marker at a save phase and hang), `fsize:BYTES` (save under RLIMIT_FSIZE, print the error).
Only torch and the checkpoint package are imported, to start fast.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from pathlib import Path

import torch

NUM_TENSORS = 8
TENSOR_NUMEL = 1 << 20  # 4 MiB of float32 each: 32 MiB per checkpoint


def make_tensors(seed: int, numel: int = TENSOR_NUMEL, count: int = NUM_TENSORS) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(f"layers.{i}.weight", torch.randn(numel, generator=gen)) for i in range(count)]


def make_base_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "test"}))
    (path / "tokenizer.json").write_text("{}")
    return path


def optimizer_state(step: int) -> dict:
    return {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((4,), float(step))}},
            "param_groups": [{"lr": 1e-5, "params": [0]}]}


def save(root: Path, base: Path, step: int, *, tensors=None, store=None):
    from onlinemodel_runtime.checkpoint import CheckpointStore, specs_of

    pairs = make_tensors(step) if tensors is None else tensors
    store = store or CheckpointStore(root)
    return store.save(iter(pairs), specs_of(pairs), base_model_dir=base,
                      trainer_state={"step": step, "tokens_trained": 100 * step},
                      optimizer_state=optimizer_state(step))


def _hang(marker: Path) -> None:
    marker.write_text("ready")
    time.sleep(120)  # the test kills us with SIGKILL long before this ends


def main() -> int:
    from onlinemodel_runtime.checkpoint import CheckpointError, CheckpointStore, specs_of

    root, base, step, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    marker = root.parent / (root.name + ".marker")
    store = CheckpointStore(root)
    pairs = make_tensors(step)
    if mode == "stall-mid-weights":
        def slow():
            for i, pair in enumerate(pairs):
                if i == 3:
                    _hang(marker)
                yield pair
        store.save(slow(), specs_of(pairs), base_model_dir=base, trainer_state={"step": step},
                   optimizer_state=optimizer_state(step))
    elif mode.startswith("stall-at:"):
        wanted = mode.split(":", 1)[1]
        store._on_phase = lambda phase: _hang(marker) if phase == wanted else None
        save(root, base, step, store=store)
    elif mode.startswith("fsize:"):
        # Writes beyond the limit fail with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(mode.split(":", 1)[1])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            save(root, base, step, store=store)
        except CheckpointError as exc:
            print(json.dumps({"error": str(exc)}))
            return 0
        print(json.dumps({"error": None}))
        return 0
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
