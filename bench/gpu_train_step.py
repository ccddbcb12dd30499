"""One training step of Qwen3-shaped models (random bf16 weights): torch AdamW (fused) vs our Apollo.

For each shape, on one model: (i) HF forward/backward + torch.optim.AdamW(fused=True) on bf16
params; (ii) our Apollo in hook mode training every parameter (block linears and the tied
embedding with APOLLO-Mini, norms with AdamW); (iii) our Apollo with the default policy
(block linears only); on request, diagnostics of (ii)/(iii): _eager (torch ops), _nograph (no
CUDA-graph replay), _serial (bucket updates on the main stream). Measured: optimizer state bytes,
peak memory beyond the weights, fwd+bwd+step time (median after warm-up, CUDA events), tokens/s,
achieved TFLOP/s against a bf16 matmul peak measured in the same run, first/last loss; last, one
line per shape and mode: ours vs AdamW fused, the acceptance target (no slower).

    PYTHONPATH=runtime python3 bench/gpu_train_step.py --shapes 0.6B,1.7B,4B,8B
    PYTHONPATH=runtime python3 bench/gpu_train_step.py --shapes tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
from qwen3_shapes import QWEN3_SHAPES

SHAPES = {  # "tiny" is the CPU smoke test
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=1024, tie_word_embeddings=True),
    **QWEN3_SHAPES,
}
# Suffixes (diagnostics): _eager torch ops only; _nograph compiled buckets without CUDA-graph
# replay; _serial bucket updates on the main stream instead of a side stream.
MODES = ("adamw_fused", "apollo_all", "apollo_blocks", "apollo_all_eager", "apollo_all_nograph",
         "apollo_blocks_nograph", "apollo_all_serial", "apollo_blocks_serial")
DEFAULT_MODES = ("adamw_fused", "apollo_all", "apollo_blocks")  # eager: slow, on request
GiB = 1024**3


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop_ms(self, start) -> float:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            e.synchronize()
            return start.elapsed_time(e)
        return (time.perf_counter() - start) * 1e3


def matmul_peak_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    timer, times = Timer(device), []
    for i in range(25):
        t = timer.start()
        for _ in range(5):
            a @ b
        ms = timer.stop_ms(t) / 5
        if i >= 5:
            times.append(ms)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def check_rounding(device: torch.device) -> dict:
    """The weight write the compiled update fuses into one kernel (rounding.apply_update_, here
    compiled on its own) on this device: unbiased, and a gated-off update changes nothing."""
    from onlinemodel_runtime.optim import rounding

    w = torch.ones(1 << 20, device=device, dtype=torch.bfloat16)
    g = torch.ones_like(w)
    coeff = torch.tensor(1e-4, device=device)  # 1/78 of a bf16 ulp at 1.0
    one = torch.tensor(1.0, device=device)
    write = torch.compile(rounding.apply_update_, fullgraph=True)
    write(w, g, coeff, decay=one, ok=torch.tensor(False, device=device), chunk_elems=None)
    untouched = bool((w == 1).all())
    for _ in range(100):
        write(w, g, coeff, decay=one, ok=torch.tensor(True, device=device), chunk_elems=None)
    return dict(gated_update_untouched=untouched, mean_after_100_small_updates=w.float().mean().item(),
                exact=1.0 + 100 * 1e-4)


class _Layers(torch.nn.Module):
    """Three residual blocks named layers.N.* (one update bucket each) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.LayerNorm(96),
                                torch.nn.Linear(96, 64)) for _ in range(3))
        self.head = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def check_compiled(device: torch.device) -> dict:
    """Hook mode with the compiled bucket update (CUDA-graph replay from a bucket's second step)
    vs the eager torch-ops path, float32, 6 steps."""
    from onlinemodel_runtime.optim import Apollo

    nets, errs, graphs = [], {}, 0
    for fused in (None, False):
        torch.manual_seed(0)
        net = _Layers().to(device)
        opt = Apollo(net.named_parameters(), lr=1e-2, fused=fused)
        opt.attach_to_backward()
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(8, 64, generator=g).to(device)
            assert opt.backward_step(net(x).pow(2).mean()).applied
        nets.append(net)
        graphs = max(graphs, len(opt._compiled.captured()))
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        errs[name] = ((a - b).norm() / a.norm()).item()
    from onlinemodel_runtime.optim.bucket_update import COMPILED

    return dict(max_rel_diff=max(errs.values()), compiled_path_works=COMPILED.ok,
                cuda_graphs_captured=graphs)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def build(shape: str, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    return cfg, model


def flops_per_step(cfg, n_matmul_params: int, tokens: int, seq: int) -> float:
    # 6*N per token (fwd+bwd matmuls) + attention scores/values, PaLM's 12*L*H*Q*T per token.
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
    return tokens * (6 * n_matmul_params + attn)


def make_apollo(mode: str, model, lr: float, pkg=None):
    """Our optimizer for a mode name: the policy by prefix (apollo_blocks = the trainer's default,
    apollo_all = every parameter), diagnostics by suffix (_eager torch ops, _nograph no CUDA-graph
    replay, _serial updates on the main stream). `pkg`: the optim package (default: the project's;
    an --ab-package copy must be at least as recent as the cuda_graphs/side_stream options)."""
    if pkg is None:
        import onlinemodel_runtime.optim as pkg
    policy = (pkg.TrainPolicy() if mode.startswith("apollo_blocks")
              else pkg.TrainPolicy(blocks="apollo", embeddings="apollo", norms="adamw"))
    return pkg.make_optimizer(model, policy, lr=lr, rank=1, fused=False if mode.endswith("eager") else None,
                              cuda_graphs=not mode.endswith("_nograph"),
                              side_stream=not mode.endswith("_serial"))


def run_mode(mode: str, model, device, ids, steps: int, warmup: int, lr: float) -> dict:
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if mode == "adamw_fused":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0,
                                fused=device.type == "cuda")

        def one_step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def state_bytes():
            return sum(t.numel() * t.element_size() for st in opt.state.values()
                       for t in st.values() if torch.is_tensor(t))
    else:
        opt = make_apollo(mode, model, lr)
        opt.attach_to_backward()

        def one_step():
            loss = model(input_ids=ids, labels=ids).loss
            report = opt.backward_step(loss)
            if not report.applied:
                raise RuntimeError(f"step skipped: {report}")
            return loss.detach()

        state_bytes = opt.state_bytes
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    timer = Timer(device)
    losses = [one_step() for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = allocated(device)
    times = []
    for _ in range(steps):
        t = timer.start()
        losses.append(one_step())
        times.append(timer.stop_ms(t))
    ordered = sorted(times)
    out = dict(mode=mode, trained_params=trained, state_bytes=state_bytes(), peak_bytes=peak(device),
               allocated_between_steps=base, step_ms_median=statistics.median(times),
               step_ms_p90=ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
               step_ms_all=[round(x, 2) for x in times],
               loss_first_last=[round(losses[0].item(), 4), round(losses[-1].item(), 4)])
    if hasattr(opt, "detach_from_backward"):
        opt.detach_from_backward()
    del opt
    return out


def _p90(xs: list[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def interleaved(modes: list[str], model, device, ids, rounds: int, chunk: int, warmup: int, lr: float,
                repeats: int, ab_package: str | None) -> list[dict]:
    """Every mode built once and kept; then `rounds` times, each mode runs `chunk` timed steps in
    turn (hooks of the others detached, its own requires_grad pattern restored). Drift of the
    machine - the same code was seen swinging 110-200 ms within a minute on a host-bound step -
    then hits every mode alike. Modes "ab_<mode>" use the optimizer package `ab_package` (an
    importable copy of an earlier optim/, for before/after in one process). Per mode and repeat:
    median and p90 of all timed steps, and the median over rounds of (its chunk median / AdamW's
    chunk median of the same round)."""
    import importlib

    runners = {}
    for mode in modes:
        base = mode[3:] if mode.startswith("ab_") else mode
        pkg = importlib.import_module(ab_package if mode.startswith("ab_") else "onlinemodel_runtime.optim")
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        if base == "adamw_fused":
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=device.type == "cuda")

            def one_step(opt=opt):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()
            on = off = (lambda: None)
        else:
            opt = make_apollo(base, model, lr, pkg)

            def one_step(opt=opt):
                report = opt.backward_step(model(input_ids=ids, labels=ids).loss)
                if not report.applied:
                    raise RuntimeError(f"step skipped: {report}")
            on, off = opt.attach_to_backward, opt.detach_from_backward
        runners[mode] = ([p.requires_grad for p in model.parameters()], on, off, one_step)

    def run(mode: str, n: int, timer=None) -> list[float]:
        mask, on, off, one_step = runners[mode]
        for p, r in zip(model.parameters(), mask):
            p.requires_grad_(r)
        on()
        times = []
        try:
            for _ in range(n):
                t = timer.start() if timer else None
                one_step()
                if timer:
                    times.append(timer.stop_ms(t))
        finally:
            off()
        return times

    for mode in modes:
        run(mode, warmup)
    timer = Timer(device)
    out = []
    for rep in range(repeats):
        times = {m: [] for m in modes}
        ratios = {m: [] for m in modes}
        for _ in range(rounds):
            chunk_median = {}
            for mode in modes:
                ts = run(mode, chunk, timer)
                times[mode] += ts
                chunk_median[mode] = statistics.median(ts)
            base = chunk_median.get("adamw_fused")
            for mode in modes:
                if base:
                    ratios[mode].append(chunk_median[mode] / base)
        for mode in modes:
            out.append(dict(mode=mode, rep=rep, steps=len(times[mode]),
                            step_ms_median=statistics.median(times[mode]), step_ms_p90=_p90(times[mode]),
                            ratio_to_adamw_median=statistics.median(ratios[mode]) if ratios[mode] else None,
                            step_ms_all=[round(x, 2) for x in times[mode]]))
    for _, _, off, _ in runners.values():
        off()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.6B,1.7B")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every mode this many times, in turn, in this process")
    ap.add_argument("--label", default="", help="tag for the rows (e.g. the code version)")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="keep every mode alive and run them in turn, --chunk steps each, ROUNDS times")
    ap.add_argument("--chunk", type=int, default=5)
    ap.add_argument("--ab-package", default=None,
                    help="importable copy of an earlier optim package, for modes named ab_<mode>")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = matmul_peak_tflops(device)
    print(f"{card}; torch {torch.__version__}; bf16 matmul peak {peak_tflops:.0f} TFLOP/s", flush=True)
    rc = check_rounding(device)
    print("stochastic rounding check:", rc, flush=True)
    cc = check_compiled(device)
    print("compiled vs eager update (float32, 6 steps):", cc, flush=True)
    if args.interleave:
        return main_interleaved(args, device, card, peak_tflops, cc)
    rows = []
    for shape in args.shapes.split(","):
        cfg, model = build(shape, device)
        weights = allocated(device)
        n_params = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight.numel()
        n_matmul = n_params if cfg.tie_word_embeddings else n_params - embed
        tokens = args.seq * args.batch
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
        for rep, mode in [(r, m) for r in range(args.repeats) for m in args.modes.split(",")]:
            try:
                r = run_mode(mode, model, device, ids, args.steps, args.warmup, args.lr)
            except torch.cuda.OutOfMemoryError:
                print(f"{shape:5s} {mode:14s} out of GPU memory", flush=True)
                for p in model.parameters():
                    p.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                continue
            r.update(shape=shape, rep=rep, label=args.label, params=n_params, weights_bytes=weights,
                     peak_beyond_weights_bytes=r["peak_bytes"] - weights,
                     tokens_per_s=tokens / (r["step_ms_median"] * 1e-3))
            r["tflops"] = flops_per_step(cfg, n_matmul, tokens, args.seq) / (r["step_ms_median"] * 1e-3) / 1e12
            r["mfu"] = r["tflops"] / peak_tflops
            rows.append(r)
            print(f"{shape:5s} {mode:14s} state {r['state_bytes'] / GiB:7.3f} GiB  peak-weights "
                  f"{r['peak_beyond_weights_bytes'] / GiB:6.2f} GiB  step {r['step_ms_median']:7.1f} ms "
                  f"(p90 {r['step_ms_p90']:6.1f})  "
                  f"{r['tokens_per_s']:8.0f} tok/s  {r['tflops']:5.0f} TFLOP/s  loss {r['loss_first_last']}", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{card}, seq {args.seq}, batch {args.batch}, median and p90 of {args.steps} steps after "
          f"{args.warmup}, {args.repeats} repeat(s) {args.label}")
    print("| shape | rep | optimizer | state GiB | peak beyond weights GiB | step ms median | p90 | tokens/s | TFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['rep']} | {r['mode']} | {r['state_bytes'] / GiB:.3f} | {r['peak_beyond_weights_bytes'] / GiB:.2f} "
              f"| {r['step_ms_median']:.1f} | {r['step_ms_p90']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {r['mfu']:.2f} |")
    by = {(r["shape"], r["rep"], r["mode"]): r["step_ms_median"] for r in rows}
    for shape in args.shapes.split(","):
        for rep in range(args.repeats):
            base = by.get((shape, rep, "adamw_fused"))
            for mode in args.modes.split(","):
                if base and mode.startswith("apollo") and (shape, rep, mode) in by:
                    ours = by[(shape, rep, mode)]
                    verdict = "meets" if ours <= base else "MISSES"
                    print(f"{shape} rep {rep} {mode}: {ours:.1f} ms vs AdamW fused {base:.1f} ms "
                          f"({ours / base:.2f}x): {verdict} the target")
    out = os.environ.get("OUT")
    if out:
        name = f"gpu_train_step{'_' + args.label if args.label else ''}.json"
        with open(os.path.join(out, name), "w") as f:
            json.dump(dict(card=card, torch=torch.__version__, date=datetime.date.today().isoformat(),
                           matmul_peak_tflops=peak_tflops, rounding_check=rc, compiled_check=cc, seq=args.seq, batch=args.batch, rows=rows), f, indent=1)
    return 0


def main_interleaved(args, device, card: str, peak_tflops: float, cc: dict) -> int:
    modes = args.modes.split(",")
    rows = []
    for shape in args.shapes.split(","):
        cfg, model = build(shape, device)
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
        for r in interleaved(modes, model, device, ids, args.interleave, args.chunk, args.warmup, args.lr,
                             args.repeats, args.ab_package):
            r.update(shape=shape, label=args.label)
            rows.append(r)
        del model
        gc.collect()
    print(f"\n{card}, seq {args.seq}, batch {args.batch}, interleaved: {args.interleave} rounds x "
          f"{args.chunk} steps per mode per repeat, after {args.warmup} warm-up steps each {args.label}")
    print("| shape | rep | mode | steps | median ms | p90 ms | median of per-round ratio to AdamW |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ratio_to_adamw_median"]
        print(f"| {r['shape']} | {r['rep']} | {r['mode']} | {r['steps']} | {r['step_ms_median']:.1f} | "
              f"{r['step_ms_p90']:.1f} | {'' if ratio is None else f'{ratio:.3f}'} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gpu_train_step_interleaved{'_' + args.label if args.label else ''}.json"), "w") as f:
            json.dump(dict(card=card, torch=torch.__version__, date=datetime.date.today().isoformat(),
                           matmul_peak_tflops=peak_tflops, compiled_check=cc, seq=args.seq,
                           batch=args.batch, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
