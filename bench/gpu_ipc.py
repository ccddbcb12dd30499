"""Prove and time the zero-copy weight sharing between a vLLM-like owner and the trainer (issue 6).

One command, two phases, each an owner process (stand-in for vLLM's worker: packed Qwen3 weights,
exported with the project's `export_weights`) plus a trainer process it spawns (`attach_weights` ->
`build_hf_model` -> `make_optimizer` + `train_step`):

  attach (small shape): the owner's eager forward and its CUDA-graph replay show the trainer's update
      and equal an HF reference rebuilt from the new weights; owner and trainer read identical values;
      exactly the trained tensors changed; step-to-visibility in lockstep; no weight copies.
  serve (0.6B by default): step-to-visibility at seq 2048, and decode latency (batch 1, one token per
      CUDA-graph replay) idle vs while the trainer trains.

    PYTHONPATH=runtime:protocol python3 bench/gpu_ipc.py             # GPU, ~2-3 minutes
    PYTHONPATH=runtime:protocol python3 bench/gpu_ipc.py --device cpu --shape-attach tiny --shape-serve tiny \
        --seq 64 --seq-small 32                                # CPU smoke test (shm transport)

Prints a table; exits non-zero if any check fails. Writes gpu_ipc.json under $OUT when set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

GiB = 1024**3


def run_owner(phase: str, opts: dict) -> dict:
    from gpu_ipc_owner import owner_main

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=owner_main, args=(child, phase, opts))
    t = time.perf_counter()
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", f"owner process died (exit code {proc.join(5) or proc.exitcode})"
    proc.join(120)
    if status != "ok":
        raise AssertionError(f"phase {phase} failed:\n{payload}")
    payload["wall_s"] = time.perf_counter() - t
    return payload


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def table(card: str, a: dict, s: dict | None) -> str:
    rows = [f"card: {card}; date {datetime.date.today().isoformat()}", ""]
    rows += ["| check / measure | value |", "|---|---|"]
    add = lambda k, v: rows.append(f"| {k} | {v} |")  # noqa: E731
    add("transport", a["transport"])
    add(f"attach shape ({a['shape']}) weights", f"{a['weight_bytes'] / GiB:.2f} GiB")
    add("trainer attach + build_hf_model", f"{a['trainer_ready']['attach_s']:.2f} s, "
        f"{a['trainer_ready']['alloc_after_build'] / 2**20:.1f} MiB allocated (no copy)")
    add("packed stand-in forward vs HF forward (rel err)", f"{a['packed_vs_hf_rel']:.2e}")
    add("trainer losses", ", ".join(f"{x:.3f}" for x in a["losses"]))
    add("tensors changed by training", a["tensors_changed"])
    add("owner eager logits change after steps (rel)", f"{a['update_rel_change']:.3f}")
    add("owner eager vs HF reference from new weights (rel)",
        f"{a['owner_vs_reference_rel']:.1e} (bitwise equal: {a['owner_equals_reference_bitwise']})")
    if "graph_update_rel_change" in a:
        add("CUDA graph replay: change after steps (rel)", f"{a['graph_update_rel_change']:.3f}")
        add("CUDA graph replay vs eager on new weights (rel)", f"{a['graph_vs_new_eager_rel']:.1e}")
    if "hf_graph" in a:
        add("HF model (views) in a CUDA graph", a["hf_graph"] + (
            f"; replay vs reference {a['hf_graph_vs_reference_rel']:.1e}" if "hf_graph_vs_reference_rel" in a else ""))
    for tag, r in (("attach", a), ("serve", s)):
        if r is None:
            continue
        v = r["visibility"]
        add(f"[{r['shape']}] trainer step (lockstep), median ms", f"{med(v['trainer_step_ms']):.1f}")
        add(f"[{r['shape']}] step end -> first owner forward showing it, ms (median / max)",
            f"{med(v['step_to_visible_ms']):.2f} / {max(v['step_to_visible_ms']):.2f}")
        add(f"[{r['shape']}] signal latency (pipe), ms median", f"{med(v['signal_ms']):.3f}")
        add(f"[{r['shape']}] owner forward (16 tok) ms median", f"{v['owner_forward_ms']:.2f}")
        add(f"[{r['shape']}] first changed output rel. to step end, ms (median)",
            f"{med(v['first_change_ms']):.1f} (forwards that saw a partial step: "
            f"{', '.join(map(str, v['forwards_changed_during_step']))})")
        add(f"[{r['shape']}] owner memory delta / peak growth",
            f"{r['owner_alloc_delta']} B / {r.get('owner_peak_growth', 0)} B; weight copies: 0")
        te = r["trainer_exit"]
        if "peak_allocated" in te:
            add(f"[{r['shape']}] trainer peak allocated (activations+state; weights are mapped)",
                f"{te['peak_allocated'] / GiB:.2f} GiB, optimizer state {te['state_bytes'] / 2**20:.2f} MiB")
    if s is not None:
        idle, busy = s["decode_idle_ms"], s["decode_training_ms"]
        add(f"[{s['shape']}] decode ms/token idle: p50 / p99 / max (n)",
            f"{pct(idle, .5):.2f} / {pct(idle, .99):.2f} / {max(idle):.2f} ({len(idle)})")
        add(f"[{s['shape']}] decode ms/token while training seq {s['seq']}: p50 / p99 / max (n)",
            f"{pct(busy, .5):.2f} / {pct(busy, .99):.2f} / {max(busy):.2f} ({len(busy)})")
        add(f"[{s['shape']}] trainer step ms alone / while decoding (median)",
            f"{med(s['trainer_alone_step_ms']):.1f} / {med(s['trainer_concurrent_step_ms']):.1f} "
            f"({len(s['trainer_concurrent_step_ms'])} steps)")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape-attach", default="small")
    ap.add_argument("--shape-serve", default="0.6B", help="'none' skips the serve phase")
    ap.add_argument("--seq", type=int, default=2048, help="training sequence length, serve phase")
    ap.add_argument("--seq-small", type=int, default=256, help="training sequence length, attach phase")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vis-steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="attach phase: large enough to see")
    ap.add_argument("--lr-serve", type=float, default=1e-5)
    ap.add_argument("--decode-tokens", type=int, default=3000)
    ap.add_argument("--decode-s", type=float, default=8.0)
    ap.add_argument("--train-decode-s", type=float, default=15.0)
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"{card}; torch {torch.__version__}", flush=True)
    opts = dict(device=args.device, seq=args.seq, seq_small=args.seq_small, steps=args.steps,
                vis_steps=args.vis_steps, lr=args.lr, lr_serve=args.lr_serve, warmup_steps=3,
                alone_steps=5, decode_tokens=args.decode_tokens, decode_s=args.decode_s,
                train_decode_s=args.train_decode_s)
    a = run_owner("attach", dict(opts, shape=args.shape_attach))
    print(f"attach phase OK ({a['wall_s']:.0f} s)", flush=True)
    s = None
    if args.shape_serve != "none":
        s = run_owner("serve", dict(opts, shape=args.shape_serve))
        print(f"serve phase OK ({s['wall_s']:.0f} s)", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_ipc.json"), "w") as f:
            json.dump(dict(card=card, torch=torch.__version__, date=datetime.date.today().isoformat(),
                           attach=a, serve=s), f, indent=1, default=str)
    print()
    print(table(card, a, s))
    print("\nALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
