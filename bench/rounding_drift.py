"""How much of a bf16 run's drift is the weights' rounding, not the update: the continual benchmark's first jobs
trained in float32 (in-process, the defaults), every step's change of some matrices recorded, then the same
changes written onto the untouched bf16 weights the ways a bf16 trainer could write them.

    .venv/bin/python bench/rounding_drift.py --jobs 3 [--layers 3,15,27] [--threads 2]

Ways of writing (`replay`):
- stochastic: the runtime's write (optim/rounding.py): w <- round_stochastic(w + u), unbiased, but each write
  adds noise of variance about |u| x ulp(w) to every element, far more than u itself when u << ulp.
- nearest: round to nearest: no noise, but an update under half an ulp is lost (biased).
- compensated: the runtime's --weight-rounding compensated: a float32 master (the bf16 weight plus an int16 of
  its low bits, 2 more bytes per trained element), served to nearest; starts on the bf16 grid, so a change
  under half an ulp does not show until it grows past it.
- dithered: the same with the master's low bits started at random (prototype, below).
Each row: the matrix's change ||W - W0|| / ||W0|| for float32 (the update itself) and each way, and how far
each way ends from W0 + the float32 update.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

import continual_set as cs  # noqa: E402
import continual_sweep as sweep  # noqa: E402
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2  # noqa: E402
from onlinemodel_runtime.optim.rounding import ROUNDINGS, apply_update_  # noqa: E402

# "dithered": compensated, but the remainder starts uniform over the weight's rounding cell instead of at zero
# (a prototype, not in the runtime): served weights then follow the float32 ones in expectation from the first
# step, as with stochastic rounding, while the rounding error stays one draw per element instead of a random
# walk over the writes.
WAYS = ROUNDINGS + ("dithered",)


def replay(w0: torch.Tensor, updates: list[torch.Tensor], way: str, generator: torch.Generator) -> torch.Tensor:
    """The bf16 weights after writing `updates` (float32) one by one onto `w0` (bf16) the given way."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, got {way!r}")
    w = w0.clone()
    residual = None
    if way == "compensated":
        residual = torch.zeros(w0.shape, dtype=torch.int16)  # as the optimizer keeps it
    elif way == "dithered":
        residual = sweep.dithered_residual(w0.shape, generator)
        way = "compensated"
    one, ok = torch.tensor(1.0), torch.tensor(True)
    for u in updates:
        apply_update_(w, u, one, decay=1.0, ok=ok, rounding=way, generator=generator, residual=residual)
    return w


def drift_rows(w0: torch.Tensor, updates: list[torch.Tensor], seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per way (and "float32"): (||W - W0|| / ||W0||, ||W - (W0 + sum of updates)|| / ||W0||)."""
    base = w0.float()
    exact = base + sum(updates)
    norm = float(base.norm())
    rows = {"float32": (float((exact - base).norm()) / norm, 0.0)}
    for way in WAYS:
        w = replay(w0, updates, way, torch.Generator(device=w0.device).manual_seed(seed)).float()
        rows[way] = (float((w - base).norm()) / norm, float((w - exact).norm()) / norm)
    return rows


def capture(jobs: int, layers: list[int], threads: int) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Train the first `jobs` facts in float32 at the defaults; every step's change of the chosen layers'
    matrices, and their untouched weights (bf16: SmolLM2 ships bf16 values)."""
    torch.set_num_threads(threads)
    backend = sweep.InProcess(ensure_smollm2(), sweep.DEFAULTS, 0, "cpu", 1, dtype=torch.float32)
    params = dict(backend.model.named_parameters())
    names = [n for n in backend.initial if params[n].dim() == 2 and any(f".layers.{i}." in n for i in layers)]
    updates: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    step = sweep.train_step

    def recorded_step(*args, **kwargs):
        before = {n: params[n].detach().clone() for n in names}
        result = step(*args, **kwargs)
        for n in names:
            updates[n].append(params[n].detach() - before[n])
        return result

    sweep.train_step = recorded_step
    try:
        for fact in cs.ordered(cs.load_facts(), 0)[:jobs]:
            print(f"{fact.id}: {backend.teach(fact.example)['steps']} steps", flush=True)
    finally:
        sweep.train_step = step
    untouched = {n: backend.initial[n].to(torch.bfloat16) for n in names}
    for n in names:
        if not torch.equal(untouched[n].float(), backend.initial[n]):
            raise RuntimeError(f"{n}: the untouched weights are not bf16 values")
    return untouched, updates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    untouched, updates = capture(args.jobs, [int(i) for i in args.layers.split(",")], args.threads)
    steps = len(next(iter(updates.values())))
    table = {n: drift_rows(untouched[n], updates[n]) for n in untouched}
    cols = ("float32",) + WAYS
    print(f"\n{args.jobs} jobs, {steps} steps, {len(table)} matrices: change of each matrix relative to its norm "
          f"(and distance from the float32 result)\n")
    print("| matrix | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(f"{100 * rows[c][0]:.3f}% ({100 * rows[c][1]:.3f}%)" for c in cols) + " |")
    print("| **median** | " + " | ".join(
        f"{100 * statistics.median(r[c][0] for r in table.values()):.3f}% "
        f"({100 * statistics.median(r[c][1] for r in table.values()):.3f}%)" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
