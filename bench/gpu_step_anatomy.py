"""Where the time of one training step goes (host vs device), per optimizer: a diagnostic for
bench/gpu_train_step.py's host-bound shapes.

Per mode and step, host clocks (no sync) at: forward returned, backward returned, optimizer done,
then device sync; CUDA events at the same points give where the GPU stream was. Also the host
time spent inside Apollo's bucket flushes (hook mode), and one torch.profiler trace summary.
Modes: adamw_fused, apollo_blocks, apollo_all (suffix _serial: bucket updates on the main stream;
prefix ab_: the optim package given by --ab-package), null_hooks (post-accumulate-grad hooks that
only drop the gradient: the floor of hook mode), bwd_only (no optimizer; gradients dropped after).
Prints a table and writes it (and the profiler tables) under $OUT when set.

    PYTHONPATH=runtime python3 bench/gpu_step_anatomy.py --shape 1.7B
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_train_step import build, make_apollo  # noqa: E402


def make_runner(mode: str, model, ids, lr: float, ab_package: str | None = None):
    import importlib

    pkg = importlib.import_module(ab_package if mode.startswith("ab_") else "onlinemodel_runtime.optim")
    mode = mode[3:] if mode.startswith("ab_") else mode
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    flush_ns = [0]
    if mode == "adamw_fused":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)

        def bwd(loss):
            loss.backward()

        def finish():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return bwd, finish, (lambda: None), flush_ns
    if mode in ("null_hooks", "bwd_only"):
        hooks = []
        if mode == "null_hooks":
            def drop(p):
                p.grad = None
            hooks = [p.register_post_accumulate_grad_hook(drop) for p in model.parameters()]

        def finish():
            for p in model.parameters():
                p.grad = None
        return (lambda loss: loss.backward()), finish, (lambda: [h.remove() for h in hooks]), flush_ns
    opt = make_apollo(mode, model, lr, pkg)
    opt.attach_to_backward()
    before = [0]

    def bwd(loss):
        before[0] = opt._hooks.flush_ns  # host time inside bucket flushes, counted by the hooks
        opt.begin_step()
        loss.backward()

    def finish():
        rep = opt.finish_step()
        assert rep.applied, rep
        flush_ns[0] = opt._hooks.flush_ns - before[0]
    return bwd, finish, opt.detach_from_backward, flush_ns


def measure(mode: str, model, ids, steps: int, warmup: int, lr: float, ab_package=None) -> dict:
    bwd, finish, close, flush_ns = make_runner(mode, model, ids, lr, ab_package)
    rows = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        flush_ns[0] = 0
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        t0 = time.perf_counter()
        ev[0].record()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        ev[1].record()
        bwd(loss)
        t2 = time.perf_counter()
        ev[2].record()
        finish()
        t3 = time.perf_counter()
        ev[3].record()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        if i >= warmup:
            rows.append(dict(host_fwd=(t1 - t0) * 1e3, host_bwd=(t2 - t1) * 1e3, host_opt=(t3 - t2) * 1e3,
                             wall=(t4 - t0) * 1e3, gpu_fwd=ev[0].elapsed_time(ev[1]),
                             gpu_bwd=ev[1].elapsed_time(ev[2]), gpu_opt=ev[2].elapsed_time(ev[3]),
                             flush=flush_ns[0] / 1e6))
    close()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def profile(mode: str, model, ids, lr: float) -> str:
    """torch.profiler over two steps: the op tables (a 1.7B step's trace would be tens of MB)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    bwd, finish, close, _ = make_runner(mode, model, ids, lr)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        bwd(loss)
        finish()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            bwd(loss)
            finish()
        torch.cuda.synchronize()
    close()
    events = prof.key_averages()
    text = (f"{mode}: two steps (the totals below are for both)\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n"
            + events.table(sort_by="self_device_time_total", row_limit=15))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.7B")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--modes", default="adamw_fused,apollo_blocks,null_hooks,bwd_only,apollo_all")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--profile", default="", help="modes to trace with torch.profiler")
    ap.add_argument("--ab-package", default=None, help="optim package copy for modes named ab_<mode>")
    args = ap.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), torch.__version__, flush=True)
    cfg, model = build(args.shape, device)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    table = []
    cols = ["host_fwd", "host_bwd", "host_opt", "wall", "gpu_fwd", "gpu_bwd", "gpu_opt", "flush"]
    print("| round | mode | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            r = measure(mode, model, ids, args.steps, args.warmup, args.lr, args.ab_package)
            line = f"| {rnd} | {mode} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |"
            table.append(line)
            print(line, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, f"anatomy_{args.shape}.md"), "w") as f:
            f.write("\n".join(table) + "\n")
    for mode in filter(None, args.profile.split(",")):
        text = profile(mode, model, ids, args.lr)
        print(text[:6000], flush=True)
        if out_dir:
            with open(os.path.join(out_dir, f"profile_{mode}.txt"), "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
