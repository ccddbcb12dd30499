"""Serving and training through real vLLM: what a user of `onlinemodel serve` sees (issues 12 and 16).

Starts `onlinemodel serve` on a random-weight model of a real shape (vLLM `--load-format dummy`: no weight
files; the tokenizer comes from a real model directory), then measures over HTTP:

- decode: inter-token latency of streamed completions (p50/p99 over every gap but the first token), with
  1 and with 8 concurrent streams, idle and while a training job on ~2k-token examples runs;
- training throughput while serving and while idle (steps/s from /train/status), the scheduler's duty cycle
  and measured slowdown as the runtime reports them;
- step-to-visibility: a streamed greedy completion whose tokens change because of a weight write (the
  trainer's debug write over its local socket, `--debug-ops`): decode steps and ms from the write's end
  to the first changed token;
- the trainer's GPU memory beyond the weights (from /train/status);
- checkpoint (`--phases ...,checkpoint`, last): POST /checkpoint's time and size, then the checkpoint is
  deleted (a 27B one is 54 GB: the GPU machine's disk holds one at most).

A multimodal shape (Qwen3.5) is served `--language-model-only`: random weights have no image to see.

    python3 bench/gpu_vllm.py --shape 8B --tokenizer DIR --out results.json [-- extra vLLM args]
    python3 bench/gpu_vllm.py --shape qwen3.5-27B --tokenizer DIR --phases decode,train,checkpoint \
        --gpu-memory-utilization 0.55 --out results.json
    .venv/bin/python bench/gpu_vllm.py --model DIR --quick          # CPU smoke test with SmolLM2

Prints a markdown table last; writes every number to --out.
"""

from __future__ import annotations

import argparse
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
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, write_random_model_dir  # noqa: E402

from onlinemodel_runtime.devtools.launcher import ServerProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a map."


# -- streaming client ----------------------------------------------------------------------------
def stream_completion(url: str, model: str, prompt: str, max_tokens: int, token: str | None = None,
                      on_token=None) -> tuple[list[float], list[str]]:
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
        text = "".join(c.get("text", "") for c in chunk.get("choices", []))
        times.append(now)
        texts.append(text)
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


def decode_latency(server: ServerProcess, streams: int, tokens: int) -> dict[str, Any]:
    results: list[list[float]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            # Different prompts: no stream shares the others' prefix cache.
            times, _ = stream_completion(server.url, server.served_model_name, f"{PROMPT} ({i})", tokens,
                                         server.token)
            results[i] = gaps_ms(times)
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
    n = max(8, int(tokens / 1.3))
    text = " ".join(rnd.choice(words) for _ in range(n))
    return {"messages": [{"role": "user", "content": "Repeat the log."},
                         {"role": "assistant", "content": text + "."}]}


def submit(server: ServerProcess, examples: list[dict], epochs: int, lr: float | None = None) -> str:
    body: dict[str, Any] = {"examples": examples, "epochs": epochs}
    if lr is not None:
        body["learning_rate"] = lr
    code, job = server.request("POST", "/train", body)
    if code != 202:
        raise RuntimeError(f"/train answered {code}: {job}")
    return job["job_id"]


def wait_training(server: ServerProcess, min_steps: int, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    start = server.status()["steps"]
    while time.monotonic() < deadline:
        status = server.status()
        if status["state"] == "training" and status["steps"] >= start + min_steps:
            return status
        time.sleep(0.2)
    raise TimeoutError("training did not start")


def cancel_all(server: ServerProcess) -> None:
    for job in server.status()["jobs"]:
        if job["state"] in ("queued", "running"):
            server.request("DELETE", f"/train/jobs/{job['id']}")
    deadline = time.monotonic() + 600
    while server.status()["state"] == "training" and time.monotonic() < deadline:
        time.sleep(0.5)


def steps_per_second(server: ServerProcess, seconds: float) -> dict[str, Any]:
    a = server.status()
    t0 = time.monotonic()
    time.sleep(seconds)
    b = server.status()
    dt = time.monotonic() - t0
    return {"steps_per_s": (b["steps"] - a["steps"]) / dt, "tokens_per_s": (b["tokens_trained"] - a["tokens_trained"]) / dt,
            "scheduler": b.get("scheduler"), "last_step_seconds": b.get("last_step_seconds")}


def measure_while(server: ServerProcess, fn) -> tuple[Any, dict[str, Any]]:
    """Run fn() while sampling training progress over the same wall time."""
    a, t0 = server.status(), time.monotonic()
    out = fn()
    b, dt = server.status(), time.monotonic() - t0
    return out, {"steps_per_s": (b["steps"] - a["steps"]) / dt, "scheduler": b.get("scheduler")}


# -- step-to-visibility ------------------------------------------------------------------------
def visibility(server: ServerProcess, param: str, tokens: int = 96, write_after: int = 24) -> dict[str, Any]:
    """Stream a greedy completion; after `write_after` tokens negate one weight through the trainer's view;
    count decode steps until the text differs from the same completion without the write."""
    from onlinemodel_runtime.server.trainer_client import TrainerClient
    import asyncio

    ref_times, ref = stream_completion(server.url, server.served_model_name, PROMPT, tokens, server.token)
    written: dict[str, float] = {}

    def write() -> None:
        async def go():
            client = TrainerClient(f"ipc://{server.state_dir / 'trainer.sock'}")
            try:
                await client.request("debug_scale", name=param, factor=-1.0, timeout=60)
            finally:
                client.reset()
        asyncio.run(go())
        written["t"] = time.perf_counter()

    def on_token(n: int, _now: float) -> None:
        if n == write_after:
            threading.Thread(target=write).start()

    times, texts = stream_completion(server.url, server.served_model_name, PROMPT, tokens, server.token,
                                     on_token=on_token)
    # Undo (x -1 is exact in bf16), so later phases serve the same weights.
    asyncio.run(_scale(server, param))
    if "t" not in written:
        raise RuntimeError("the write did not finish during the stream")
    first = next((i for i, (a, b) in enumerate(zip(texts, ref)) if a != b), None)
    if first is None:
        raise RuntimeError("the write never became visible in the stream")
    after = [i for i, t in enumerate(times) if t >= written["t"]]
    step_ms = statistics.median(gaps_ms(ref_times))
    return {"param": param, "write_after_token": write_after, "first_changed_token": first,
            "steps_after_write": first - after[0] if after else None,
            "ms_after_write": (times[first] - written["t"]) * 1e3, "decode_step_ms": step_ms}


async def _scale(server: ServerProcess, param: str) -> None:
    from onlinemodel_runtime.server.trainer_client import TrainerClient

    client = TrainerClient(f"ipc://{server.state_dir / 'trainer.sock'}")
    try:
        await client.request("debug_scale", name=param, factor=-1.0, timeout=60)
    finally:
        client.reset()


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


# -- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help=f"random weights of one of {sorted(SHAPES)}")
    ap.add_argument("--model", default=None, help="a model directory instead of --shape (real weights)")
    ap.add_argument("--tokenizer", default=None, help="model directory whose tokenizer --shape uses")
    ap.add_argument("--out", default=None)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--train-tokens", type=int, default=2048)
    ap.add_argument("--phases", default="decode,train,visibility")
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
    work = Path(tempfile.mkdtemp(prefix="onlinemodel-gpu-vllm-"))
    extra = list(args.serve_args)
    if args.shape:
        if not args.tokenizer:
            ap.error("--shape needs --tokenizer")
        model = write_random_model_dir(work / "model", args.shape, Path(args.tokenizer))
        extra += ["--load-format", "dummy"]
        if SHAPES[args.shape][0].endswith("ForConditionalGeneration"):
            extra += ["--language-model-only"]
    else:
        model = Path(args.model)
    if args.gpu_memory_utilization:
        extra += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    extra += ["--max-model-len", str(args.max_model_len), "--debug-ops", "--state-dir", str(work / "state")]
    (work / "state").mkdir(mode=0o700)
    results: dict[str, Any] = {"shape": args.shape or str(model), "label": args.label, "date": time.strftime("%Y-%m-%d"),
                               "card": _card(), "train_tokens": args.train_tokens, "serve_args": extra}
    phases = set(args.phases.split(","))
    streams = [int(s) for s in args.streams.split(",")]
    checkpoint_dir = work / "checkpoints" if "checkpoint" in phases else None
    t0 = time.monotonic()
    server = ServerProcess(model, log_path=work / "server.log", extra_args=extra, checkpoint_dir=checkpoint_dir)
    server.state_dir = work / "state"
    try:
        server.wait_ready(timeout=1200)
        results["start_s"] = time.monotonic() - t0
        print(f"ready in {results['start_s']:.0f}s", flush=True)
        if "decode" in phases:
            decode_latency(server, 1, 16)  # warm-up (first requests compile/capture nothing new, but allocate)
            results["idle"] = [decode_latency(server, n, args.decode_tokens) for n in streams]
            print("idle", results["idle"], flush=True)
        if "train" in phases:
            examples = [long_example(args.train_tokens, seed=i) for i in range(2)]
            job = submit(server, examples, epochs=1000, lr=1e-6)
            wait_training(server, min_steps=2)
            results["train_idle"] = steps_per_second(server, 20 if not args.quick else 5)
            print("train idle", results["train_idle"], flush=True)
            results["training"] = []
            for n in streams:
                dec, tr = measure_while(server, lambda n=n: decode_latency(server, n, args.decode_tokens))
                results["training"].append({**dec, "train": tr})
                print("training", results["training"][-1], flush=True)
            status = server.status()
            results["trainer_memory"] = status.get("memory")
            results["job"] = job
            cancel_all(server)
        if "visibility" in phases:
            param = "lm_head.weight" if "lm_head.weight" in _param_names(server) else "model.embed_tokens.weight"
            results["visibility"] = visibility(server, param)
            print("visibility", results["visibility"], flush=True)
        if "checkpoint" in phases:
            results["checkpoint"] = checkpoint_phase(server, checkpoint_dir)
            print("checkpoint", results["checkpoint"], flush=True)
    finally:
        server.stop()
        shutil.copy(work / "server.log", Path(args.out).with_suffix(".log")) if args.out else None
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def _param_names(server: ServerProcess) -> set[str]:
    from onlinemodel_runtime.server.trainer_client import TrainerClient
    import asyncio

    async def go():
        client = TrainerClient(f"ipc://{server.state_dir / 'trainer.sock'}")
        try:
            return await client.request("introspect", timeout=60)
        finally:
            client.reset()
    return set(asyncio.run(go())["parameters"])


def _card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['shape']} on {r['card']}, {r['date']} {r['label']}")
    print("| decode ms/token | streams | p50 | p99 | x idle p99 | training steps/s |\n|---|---|---|---|---|---|")
    idle = {d["streams"]: d for d in r.get("idle", [])}
    for d in r.get("idle", []):
        print(f"| idle | {d['streams']} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | 1.00 | - |")
    for d in r.get("training", []):
        base = idle.get(d["streams"])
        ratio = f"{d['p99_ms'] / base['p99_ms']:.2f}" if base else "-"
        print(f"| while training | {d['streams']} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | {ratio} | "
              f"{d['train']['steps_per_s']:.3f} |")
    if "train_idle" in r:
        print(f"| training, no requests | - | - | - | - | {r['train_idle']['steps_per_s']:.3f} |")
    if "checkpoint" in r:
        c = r["checkpoint"]
        print(f"\ncheckpoint: {c['size_bytes'] / 1e9:.1f} GB in {c['seconds']:.1f} s ({c['gb_per_s']:.2f} GB/s; "
              f"{c['wall_s']:.1f} s for the request)")
    if "visibility" in r:
        v = r["visibility"]
        print(f"\nstep-to-visibility: {v['steps_after_write']} decode step(s), {v['ms_after_write']:.2f} ms after the "
              f"write (decode step {v['decode_step_ms']:.2f} ms)")


if __name__ == "__main__":
    sys.exit(main())
