"""Serving and training through real vLLM: what a user of `onlinemodel serve` sees (issues 12 and 16).

Starts `onlinemodel serve` on a random-weight model of a real shape (vLLM `--load-format dummy`: no weight
files; the tokenizer comes from a real model directory), once per decode-slowdown budget (`--budgets`,
default: the default budget, then `off` for comparison), and measures over HTTP:

- decode: inter-token latency of streamed completions (p50/p99 over every gap but the first token), with
  1 and with 8 concurrent streams, idle and while training on ~2k-token examples (a job is always queued);
- training throughput with no requests and while the streams run (steps/s from /train/status), with the
  scheduler's duty cycle, slice, paced time and its own p99 and mean slowdown (against the baseline it
  measured) printed beside the p99 this client measured;
- the trainer's memory beyond the weights (from /train/status) at two example lengths, the line through
  them, and the longest example that fits beside vLLM at several --gpu-memory-utilization values;
- step-to-visibility: a streamed greedy completion whose tokens change because of a weight write (the
  trainer's debug write over its local socket, `--debug-ops`): decode steps and ms from the write's end
  to the first changed token;
- checkpoint (`--phases ...,checkpoint`, last, default budget only): POST /checkpoint's time and size, then
  the checkpoint is deleted (a 27B one is 54 GB: the GPU machine's disk holds one at most).

A multimodal shape (Qwen3.5) is served `--language-model-only`: random weights have no image to see.

    python3 bench/gpu_vllm.py --shape 8B --tokenizer DIR --gpu-memory-utilization 0.75 --out r.json
    python3 bench/gpu_vllm.py --shape qwen3.5-27B --tokenizer DIR --budgets default \
        --phases decode,train,checkpoint --gpu-memory-utilization 0.55 --out r.json
    .venv/bin/python bench/gpu_vllm.py --model DIR --quick           # CPU smoke test with SmolLM2

Prints markdown tables last; writes every number to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, write_random_model_dir  # noqa: E402

from onlinemodel_runtime.devtools.launcher import ServerProcess  # noqa: E402
from onlinemodel_runtime.server.trainer_client import TrainerClient  # noqa: E402
from onlinemodel_runtime.trainer.memory import fit_peak_line, largest_example_tokens  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a map."
VLLM_DEFAULT_UTILIZATION = 0.9


# -- streaming client ----------------------------------------------------------------------------
def stream_completion(url: str, model: str, prompt: str, max_tokens: int, token: str | None = None,
                      on_token: Callable[[int, float], None] | None = None) -> tuple[list[float], list[str]]:
    """POST /v1/completions with stream=true; arrival time (perf_counter) and text of every chunk."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"completion failed: {resp.status} {resp.read()[:300]!r}")
    times, texts = [], []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        chunk = json.loads(data)
        texts.append("".join(c.get("text", "") for c in chunk.get("choices", [])))
        times.append(now)
        if on_token is not None:
            on_token(len(texts), now)
    conn.close()
    return times, texts


def gaps_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(times[1:], times[2:])]  # drop the first token (prefill)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        raise ValueError("no samples")
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def decode_latency(server: ServerProcess, streams: int, tokens: int, seconds: float = 0.0) -> dict[str, Any]:
    """`streams` concurrent streamed completions of `tokens` tokens, repeated until `seconds` have passed
    (at least once each)."""
    results: list[list[float]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds

    def one(i: int) -> None:
        try:
            n = 0
            while n == 0 or time.perf_counter() < deadline:
                # Different prompts: no stream shares another's prefix cache.
                times, _ = stream_completion(server.url, server.served_model_name, f"{PROMPT} ({i}.{n})", tokens,
                                             server.token)
                results[i] += gaps_ms(times)
                n += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    gaps = [g for r in results for g in r]
    return {"streams": streams, "tokens": tokens, "samples": len(gaps), "seconds": time.perf_counter() - t0,
            "p50_ms": pct(gaps, 50), "p90_ms": pct(gaps, 90), "p99_ms": pct(gaps, 99),
            "mean_ms": statistics.fmean(gaps)}


# -- training ------------------------------------------------------------------------------------
def long_example(tokens: int, seed: int = 0) -> dict[str, Any]:
    """A chat example of about `tokens` tokens (words of a small vocabulary: ~1.3 tokens each)."""
    rnd = random.Random(seed)
    words = ("river stone light harbour winter copper lantern quiet signal north garden paper engine "
             "silver orchard market ladder window thunder meadow").split()
    text = " ".join(rnd.choice(words) for _ in range(max(8, int(tokens / 1.3))))
    return {"messages": [{"role": "user", "content": "Repeat the log."},
                         {"role": "assistant", "content": text + "."}]}


def submit(server: ServerProcess, examples: list[dict], epochs: int = 1, lr: float = 1e-6) -> str:
    code, job = server.request("POST", "/train", {"examples": examples, "epochs": epochs, "learning_rate": lr})
    if code != 202:
        raise RuntimeError(f"/train answered {code}: {job}")
    return job["job_id"]


def wait_idle(server: ServerProcess, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.status()
        if status["state"] == "idle" and not status["queued_jobs"]:
            return status
        time.sleep(0.25)
    raise TimeoutError("training did not stop")


class TrainingLoad:
    """Keeps a short job queued behind the running one, so the trainer never idles, until stopped."""

    def __init__(self, server: ServerProcess, tokens: int):
        self.server = server
        self.examples = [long_example(tokens, seed=i) for i in range(2)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.server.status()["queued_jobs"] == 0:
                    submit(self.server, self.examples)
                self._stop.wait(0.25)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> TrainingLoad:
        submit(self.server, self.examples)
        self._thread.start()
        start = self.server.status()["steps"]
        deadline = time.monotonic() + 900  # the first steps compile and capture the optimizer's graphs
        while self.server.status()["steps"] < start + 2:
            if time.monotonic() > deadline or self.error:
                raise RuntimeError(f"training did not start: {self.error}")
            time.sleep(0.25)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        cancel_all(self.server)
        if self.error and not exc[0]:
            raise self.error


def cancel_all(server: ServerProcess) -> dict[str, Any]:
    """DELETE every queued or running job (a running one stops after its current step); the idle status."""
    for job in server.status()["jobs"]:
        if job["state"] in ("queued", "running"):
            code, body = server.request("DELETE", f"/train/jobs/{job['id']}")
            if code not in (200, 202, 409):  # 409: it finished meanwhile
                raise RuntimeError(f"DELETE /train/jobs/{job['id']} answered {code}: {body}")
    return wait_idle(server)


def while_sampling(server: ServerProcess, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run fn() and report training progress over the same wall time."""
    a, t0 = server.status(), time.monotonic()
    out = fn()
    b, dt = server.status(), time.monotonic() - t0
    return out, {"steps_per_s": (b["steps"] - a["steps"]) / dt,
                 "tokens_per_s": (b["tokens_trained"] - a["tokens_trained"]) / dt,
                 "last_step_seconds": b.get("last_step_seconds"), "scheduler": b.get("scheduler"),
                 "paced_seconds": (b["scheduler"]["paced_seconds"] - a["scheduler"]["paced_seconds"])
                 if a.get("scheduler") and b.get("scheduler") else None}


def memory_line(server: ServerProcess, lengths: list[int], utilizations: list[float],
                utilization: float) -> dict[str, Any]:
    """Step peaks at each example length, the line through them, the longest example beside vLLM."""
    points = []
    for tokens in lengths:
        submit(server, [long_example(tokens, seed=7)], epochs=2)
        status = wait_idle(server)
        points.append({"tokens": tokens, "last_step_peak_bytes": status["memory"].get("last_step_peak_bytes")})
    out: dict[str, Any] = {"points": points, "memory": status["memory"]}
    if any(p["last_step_peak_bytes"] is None for p in points):
        return out  # CPU: no allocator figures
    fixed, per_token = fit_peak_line([(p["tokens"], p["last_step_peak_bytes"]) for p in points])
    mem = status["memory"]
    # What the trainer holds outside torch's allocator (CUDA context, workspaces), seen while it idles: the
    # device's used memory minus vLLM's share minus the trainer's reserved pool.
    used = mem["device_total_bytes"] - mem["device_free_bytes"]
    overhead = max(0, int(used - utilization * mem["device_total_bytes"] - mem["reserved_bytes"]))
    out.update(fixed_bytes=fixed, bytes_per_token=per_token, trainer_overhead_bytes=overhead,
               largest_example_tokens={str(u): largest_example_tokens(
                   device_total_bytes=mem["device_total_bytes"], gpu_memory_utilization=u, fixed_bytes=fixed,
                   bytes_per_token=per_token, trainer_overhead_bytes=overhead) for u in utilizations})
    return out


# -- step-to-visibility ------------------------------------------------------------------------
async def _trainer(server: ServerProcess, op: str, **args) -> Any:
    client = TrainerClient(f"ipc://{server.state_dir / 'trainer.sock'}")
    try:
        return await client.request(op, timeout=60, **args)
    finally:
        client.reset()


def visibility(server: ServerProcess, tokens: int = 96, write_after: int = 24) -> dict[str, Any]:
    """Stream a greedy completion; after `write_after` tokens negate one weight through the trainer's view;
    count decode steps until the text differs from the same completion without the write."""
    names = set(asyncio.run(_trainer(server, "introspect"))["parameters"])
    param = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
    ref_times, ref = stream_completion(server.url, server.served_model_name, PROMPT, tokens, server.token)
    written: dict[str, float] = {}

    def write() -> None:
        asyncio.run(_trainer(server, "debug_scale", name=param, factor=-1.0))
        written["t"] = time.perf_counter()

    def on_token(n: int, _now: float) -> None:
        if n == write_after:
            threading.Thread(target=write).start()

    times, texts = stream_completion(server.url, server.served_model_name, PROMPT, tokens, server.token,
                                     on_token=on_token)
    asyncio.run(_trainer(server, "debug_scale", name=param, factor=-1.0))  # undo (x -1 is exact in bf16)
    if "t" not in written:
        raise RuntimeError("the write did not finish during the stream")
    first = next((i for i, (a, b) in enumerate(zip(texts, ref)) if a != b), None)
    if first is None:
        raise RuntimeError("the write never became visible in the stream")
    after = [i for i, t in enumerate(times) if t >= written["t"]]
    return {"param": param, "write_after_token": write_after, "first_changed_token": first,
            "steps_after_write": first - after[0] if after else None,
            "ms_after_write": (times[first] - written["t"]) * 1e3,
            "decode_step_ms": statistics.median(gaps_ms(ref_times))}


# -- checkpoint ---------------------------------------------------------------------------------
def checkpoint_phase(server: ServerProcess, checkpoint_dir: Path) -> dict[str, Any]:
    """POST /checkpoint (the weights as they are now), timed from outside; then delete it."""
    t0 = time.monotonic()
    code, info = server.request("POST", "/checkpoint", timeout=1800)
    wall = time.monotonic() - t0
    if code != 200:
        raise RuntimeError(f"/checkpoint answered {code}: {info}")
    shutil.rmtree(checkpoint_dir)  # a later final checkpoint finds the weights unchanged and writes none
    return {"wall_s": wall, "seconds": info["seconds"], "size_bytes": info["size_bytes"],
            "gb_per_s": info["size_bytes"] / 1e9 / info["seconds"], "step": info["step"]}


# -- one server per budget ------------------------------------------------------------------------
def run_budget(model: Path, budget: str, args, extra: list[str], work: Path) -> dict[str, Any]:
    state = work / f"state-{budget}"
    state.mkdir(mode=0o700)
    # Each step measured is one submitted step: no early-stop check forwards, no replayed examples
    # (docs/learning.md), as in the numbers measured before those defaults.
    serve_args = [*extra, "--state-dir", str(state), "--no-early-stop", "--replay-examples", "0"]
    if budget != "default":
        serve_args += ["--max-decode-slowdown", budget]
    phases = set(args.phases.split(","))
    streams = [int(s) for s in args.streams.split(",")]
    checkpoint_dir = None
    if "checkpoint" in phases and budget == "default":
        checkpoint_dir = work / "checkpoints"
        # Only the measured checkpoint: no periodic one (54 GB at 27B) while the other phases run.
        serve_args += ["--checkpoint-every-steps", "0", "--checkpoint-every-seconds", "0"]
    r: dict[str, Any] = {"budget": budget}
    t0 = time.monotonic()
    server = ServerProcess(model, log_path=work / f"server-{budget}.log", extra_args=serve_args,
                           checkpoint_dir=checkpoint_dir)
    server.state_dir = state
    try:
        server.wait_ready(timeout=1200)
        r["start_s"] = time.monotonic() - t0
        print(f"[{budget}] ready in {r['start_s']:.0f}s", flush=True)
        if "decode" in phases and budget == "default":
            decode_latency(server, 1, 16)  # warm-up
            r["idle"] = [decode_latency(server, n, args.decode_tokens) for n in streams]
            print(f"[{budget}] idle decode", r["idle"], flush=True)
        if "train" in phases:
            with TrainingLoad(server, args.train_tokens):
                r["train_no_requests"] = while_sampling(server, lambda: time.sleep(args.measure_seconds))[1]
                print(f"[{budget}] training, no requests", r["train_no_requests"], flush=True)
                r["training"] = []
                for n in streams:
                    # Let the controller settle on this load before measuring it.
                    decode_latency(server, n, args.decode_tokens, seconds=args.warmup_seconds)
                    dec, tr = while_sampling(server, lambda n=n: decode_latency(server, n, args.decode_tokens,
                                                                               seconds=args.measure_seconds))
                    r["training"].append({**dec, "train": tr})
                    print(f"[{budget}] decode while training", r["training"][-1], flush=True)
                r["memory"] = server.status().get("memory")
        if "memory" in phases and budget == "default":
            util = args.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
            lengths = [int(x) for x in args.memory_tokens.split(",")]
            r["memory_line"] = memory_line(server, lengths, [float(u) for u in args.utilizations.split(",")], util)
            print(f"[{budget}] memory", r["memory_line"], flush=True)
        if "visibility" in phases and budget == "default":
            r["visibility"] = visibility(server)
            print(f"[{budget}] visibility", r["visibility"], flush=True)
        if checkpoint_dir is not None:
            r["checkpoint"] = checkpoint_phase(server, checkpoint_dir)
            print(f"[{budget}] checkpoint", r["checkpoint"], flush=True)
    finally:
        server.stop()
    return r


# -- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help=f"random weights of one of {sorted(SHAPES)}")
    ap.add_argument("--model", default=None, help="a model directory instead of --shape (real weights)")
    ap.add_argument("--tokenizer", default=None, help="model directory whose tokenizer --shape uses")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budgets", default="default,off",
                    help="one server each: `default` (the runtime's default), a factor, or `off`")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--train-tokens", type=int, default=2048)
    ap.add_argument("--measure-seconds", type=float, default=20.0)
    # The tail controller probes a baseline (~2.5 s at 1 stream) and judges each setting on 400+ tokens.
    ap.add_argument("--warmup-seconds", type=float, default=20.0)
    ap.add_argument("--memory-tokens", default="512,2048", help="example lengths of the memory line")
    ap.add_argument("--utilizations", default="0.6,0.75,0.85")
    ap.add_argument("--phases", default="decode,train,memory,visibility",
                    help="of decode,train,memory,visibility,checkpoint (the last one is not a default)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes")
    ap.add_argument("--label", default="")
    ap.add_argument("serve_args", nargs="*", help="after --: more `onlinemodel serve` / vLLM arguments")
    args = ap.parse_args()
    if (args.shape is None) == (args.model is None):
        ap.error("give exactly one of --shape or --model")
    if args.quick:
        args.decode_tokens, args.train_tokens, args.streams = 24, 128, "1,2"
        args.measure_seconds, args.warmup_seconds, args.memory_tokens = 6.0, 2.0, "64,128"
        args.max_model_len = min(args.max_model_len, 1024)
    work = Path(tempfile.mkdtemp(prefix="onlinemodel-gpu-vllm-"))
    extra = list(args.serve_args)
    if args.shape:
        if not args.tokenizer:
            ap.error("--shape needs --tokenizer")
        model = write_random_model_dir(work / "model", args.shape, Path(args.tokenizer))
        extra += ["--load-format", "dummy"]
        if SHAPES[args.shape][0].endswith("ForConditionalGeneration"):
            extra += ["--language-model-only"]
        if "qwen3.5" in args.shape:
            # Gated DeltaNet's prefill: the slim GPU bundle has no FlashInfer, so vLLM's Triton kernel.
            extra += ["--additional-config", '{"gdn_prefill_backend": "triton"}']
            # One Mamba-state block per decode sequence: vLLM's default of 1024 sequences does not fit
            # beside 54 GB of weights at the utilizations the trainer needs (901 blocks at 0.55).
            extra += ["--max-num-seqs", "256"]
    else:
        model = Path(args.model)
    if args.gpu_memory_utilization:
        extra += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    extra += ["--max-model-len", str(args.max_model_len), "--debug-ops"]
    results: dict[str, Any] = {"shape": args.shape or str(model), "label": args.label,
                               "date": time.strftime("%Y-%m-%d"), "card": _card(), "train_tokens": args.train_tokens,
                               "serve_args": extra, "runs": []}
    try:
        for budget in args.budgets.split(","):
            results["runs"].append(run_budget(model, budget, args, extra, work))
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
            for log in work.glob("server-*.log"):
                shutil.copy(log, Path(args.out).with_name(f"{Path(args.out).stem}-{log.name}"))
    print_tables(results)
    return 0


def _card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def print_tables(r: dict[str, Any]) -> None:
    print(f"\n{r['shape']} on {r['card']}, {r['date']}, training examples of {r['train_tokens']} tokens {r['label']}")
    idle = {d["streams"]: d for run in r["runs"] for d in run.get("idle", [])}
    print("| decode ms/token | budget | streams | p50 | p99 | p99 x idle | controller p99 x | controller mean x | "
          "training steps/s | duty | slice ms |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for d in idle.values():
        print(f"| idle | - | {d['streams']} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | 1.00 | - | - | - | - | - |")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for run in r["runs"]:
        for d in run.get("training", []):
            base, s = idle.get(d["streams"]), d["train"]["scheduler"] or {}
            ratio = f"{d['p99_ms'] / base['p99_ms']:.2f}" if base else "-"
            # The controller's own view (its p99 and mean ratios against the baseline it measured) beside ours.
            print(f"| while training | {run['budget']} | {d['streams']} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | "
                  f"{ratio} | {fmt(s.get('measured_p99_slowdown'))} | {fmt(s.get('measured_slowdown'))} | "
                  f"{d['train']['steps_per_s']:.3f} | {fmt(s.get('duty_cycle'))} | {fmt(s.get('slice_ms'))} |")
    print("\n| training, no requests | budget | steps/s | tokens/s | x budget off |\n|---|---|---|---|---|")
    off = next((run["train_no_requests"] for run in r["runs"] if run["budget"] == "off"
                and "train_no_requests" in run), None)
    for run in r["runs"]:
        t = run.get("train_no_requests")
        if t:
            ratio = f"{t['steps_per_s'] / off['steps_per_s']:.2f}" if off and off["steps_per_s"] else "-"
            print(f"| | {run['budget']} | {t['steps_per_s']:.3f} | {t['tokens_per_s']:.0f} | {ratio} |")
    for run in r["runs"]:
        if "memory_line" in run:
            m = run["memory_line"]
            print(f"\ntrainer memory ({run['budget']}): " + ", ".join(
                f"{p['tokens']} tokens: step peak {p['last_step_peak_bytes']}" for p in m["points"]))
            if "largest_example_tokens" in m:
                print(f"  fixed {m['fixed_bytes'] / 2**30:.2f} GiB + {m['bytes_per_token'] / 2**20:.3f} MiB/token, "
                      f"outside the allocator {m['trainer_overhead_bytes'] / 2**30:.2f} GiB; longest example at "
                      + ", ".join(f"{u}: {t}" for u, t in m["largest_example_tokens"].items()))
        if "visibility" in run:
            v = run["visibility"]
            print(f"\nstep-to-visibility: {v['steps_after_write']} decode step(s), {v['ms_after_write']:.2f} ms "
                  f"after the write (decode step {v['decode_step_ms']:.2f} ms)")
        if "checkpoint" in run:
            c = run["checkpoint"]
            print(f"\ncheckpoint: {c['size_bytes'] / 1e9:.1f} GB in {c['seconds']:.1f} s ({c['gb_per_s']:.2f} GB/s; "
                  f"{c['wall_s']:.1f} s for the request)")


if __name__ == "__main__":
    sys.exit(main())
