"""Scaling out: how long a follower takes to get a weight version, and what decode on it feels meanwhile.

    python bench/replication_sync.py loopback                         # CPU, 0.25/1/2 GB of bf16 tensors
    python bench/replication_sync.py loopback --shape 1.7B --shape 8B --device cuda   # GPU (the lead's run)
    python bench/replication_sync.py decode                           # real vLLM on CPU: learner + follower
    python bench/replication_sync.py decode --model DIR --serve-arg=--gpu-memory-utilization=0.4   # one GPU

`loopback`: the learner's real routes, Publisher and snapshot writer on a uvicorn server on 127.0.0.1
(devtools/replication_loopback.py) and a real Follower with the HTTP transport writing into tensors on
`--device`. Per size: the trainer's pause (tensor bytes copied under the weights lock), the whole
publication, and the follower's sync (transfer + in-place writes), each also per GB. `--shape` uses the
tensors the default training policy trains in a Qwen3 shape (attention and MLP matrices).

`decode`: a real learner and a real follower (SmolLM2-135M, vLLM on CPU); streams a completion from the
follower while the learner publishes a new version every `--bump-every` seconds (a weight scaled by 1.0
through the trainer's debug operation: a new version without training's CPU load), and compares the
time between tokens that overlap an apply with the others and with a stream without syncs. On a 2-core machine the learner and the follower share
the cores: the numbers include the learner's publishing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "protocol"), str(ROOT / "bench")]

from onlinemodel_runtime.devtools.replication_loopback import LoopbackLearner  # noqa: E402
from onlinemodel_runtime.replication.follower import Follower  # noqa: E402
from onlinemodel_runtime.replication.transport import HttpWeightTransport  # noqa: E402
from qwen3_shapes import QWEN3_SHAPES  # noqa: E402

TOKEN = "bench-token"
_CHUNK = 64 << 20  # bytes per tensor of the --gb sizes


def sized_tensors(gb: float, device: str) -> dict[str, torch.Tensor]:
    n, left, out = 0, int(gb * (1 << 30)) // 2 * 2, {}  # whole bf16 elements
    while left > 0:
        numel = min(_CHUNK, left) // 2
        out[f"blocks.{n}.weight"] = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
        left -= numel * 2
        n += 1
    return out


def shape_tensors(name: str, device: str) -> dict[str, torch.Tensor]:
    """The matrices the default policy trains (TrainPolicy: blocks apollo, the rest frozen) of a Qwen3 shape."""
    s = QWEN3_SHAPES[name]
    h, hd, inter = s["hidden_size"], s["head_dim"], s["intermediate_size"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    return {f"model.layers.{i}.{m}.weight": torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()
            for i in range(s["num_hidden_layers"]) for m, shape in shapes.items()}


def loopback(args) -> list[dict]:
    cases = [(f"{gb:g} GiB", lambda gb=gb: sized_tensors(gb, args.device)) for gb in args.gb] + \
            [(f"Qwen3-{s} trainable", lambda s=s: shape_tensors(s, args.device)) for s in args.shape]
    rows = []
    for label, make in cases:
        weights = make()
        total = sum(t.numel() * t.element_size() for t in weights.values())
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, LoopbackLearner(weights, Path(tmp), TOKEN) as learner:
            del weights
            targets = {k: torch.zeros_like(v) for k, v in learner.trainer.weights.items()}
            follower = Follower(HttpWeightTransport(learner.url, TOKEN, timeout=600), targets, "bench",
                                retry_seconds=0)
            follower.sync_once()  # registers; nothing published yet
            for _ in range(args.repeat):
                snap = learner.publish()
                assert follower.sync_once() and follower.weight_version == snap.weight_version
                gib = total / (1 << 30)
                rows.append({"case": label, "device": args.device, "GiB": round(gib, 3), "tensors": len(targets),
                             "pause_s": snap.lock_seconds, "publish_s": snap.write_seconds,
                             "sync_s": follower.last_sync_seconds,
                             "pause_s_per_GiB": round(snap.lock_seconds / gib, 3),
                             "sync_s_per_GiB": round(follower.last_sync_seconds / gib, 3)})
                print(json.dumps(rows[-1]), flush=True)
                learner.trainer.step(0.0)  # a new version, same values
            ok = all(torch.equal(targets[k], v) for k, v in learner.trainer.weights.items())
            assert ok, "the follower's tensors differ from the learner's"
        del targets
    return rows


# --- decode on a follower while it syncs ------------------------------------------------------------------

def stream_token_times(url: str, prompt: str, max_tokens: int) -> list[float]:
    body = json.dumps({"model": "model", "temperature": 0, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if line.startswith(b"data: {") and b'"content"' in line:
                times.append(time.perf_counter())
    return times


def gaps_ms(times: list[float], windows: list[tuple[float, float]] | None = None) -> dict:
    """Time between tokens; with `windows` (apply intervals, perf_counter), split into the gaps that
    overlap one and the others."""
    pairs = list(zip(times, times[1:]))

    def summary(gaps: list[float]) -> dict:
        gaps = sorted(g * 1000 for g in gaps)
        if not gaps:
            return {"gaps": 0}
        return {"gaps": len(gaps), "p50_ms": round(statistics.median(gaps), 1),
                "p99_ms": round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 1), "max_ms": round(gaps[-1], 1)}

    if windows is None:
        return {"tokens": len(times), "all": summary([b - a for a, b in pairs])}
    during = [b - a for a, b in pairs if any(a < hi and b > lo for lo, hi in windows)]
    outside = [b - a for a, b in pairs if not any(a < hi and b > lo for lo, hi in windows)]
    return {"tokens": len(times), "during_apply": summary(during), "outside_apply": summary(outside)}


def watch_applies(follower, stop: threading.Event, windows: list[tuple[float, float]]) -> None:
    """Record each version the follower applies as (start, end) in perf_counter time: the end is when the
    new version was seen (polled every 0.1 s), the start that minus the sync's own duration."""
    version = follower.status()["weight_version"]
    while not stop.is_set():
        status = follower.status()
        if status["weight_version"] != version:
            version, now = status["weight_version"], time.perf_counter()
            windows.append((now - status["replication"]["last_sync_seconds"] - 0.1, now))
        time.sleep(0.1)


def decode(args) -> list[dict]:
    from onlinemodel_runtime.devtools.launcher import ServerProcess
    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
    from onlinemodel_runtime.server.trainer_client import TrainerClient

    model = args.model or ensure_smollm2()
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    env = {"ONLINEMODEL_API_TOKEN": TOKEN}
    common = ["--max-model-len", "1024", *args.serve_arg]
    learner = ServerProcess(model, env=env, log_path=tmp / "learner.log",
                            extra_args=[*common, "--sync-interval", "1", "--debug-ops", "--state-dir", str(tmp / "state")])
    follower = None
    try:
        learner.wait_ready(timeout=1800)  # a loaded 2-core machine compiles slowly
        follower = ServerProcess(model, env=env, log_path=tmp / "follower.log",
                                 extra_args=[*common, "--follow", learner.url])
        follower.wait_ready(timeout=1800)
        while not follower.status()["replication"]["synced"]:
            time.sleep(0.5)
        prompt = "Write a long story about a lighthouse keeper."
        stream_token_times(follower.url, prompt, 16)  # warm-up
        rows = [{"phase": "no sync", **gaps_ms(stream_token_times(follower.url, prompt, args.tokens))}]
        stop = threading.Event()

        def bump() -> None:
            async def go():
                client = TrainerClient(f"ipc://{tmp / 'state' / 'trainer.sock'}")
                try:
                    while not stop.is_set():
                        await client.request("debug_scale", timeout=60, name="model.norm.weight", factor=1.0)
                        await asyncio.sleep(args.bump_every)
                finally:
                    client.reset()
            asyncio.run(go())

        windows: list[tuple[float, float]] = []
        threads = [threading.Thread(target=bump, daemon=True),
                   threading.Thread(target=watch_applies, args=(follower, stop, windows), daemon=True)]
        for thread in threads:
            thread.start()
        times = stream_token_times(follower.url, prompt, args.tokens)
        stop.set()
        for thread in threads:
            thread.join()
        status = follower.status()
        rows.append({"phase": "syncing", **gaps_ms(times, windows), "versions_applied": len(windows),
                     "apply_s": [round(hi - lo - 0.1, 2) for lo, hi in windows],
                     "sync_MB": round(status["replication"]["last_sync_bytes"] / 1e6, 1)})
        for row in rows:
            print(json.dumps(row), flush=True)
        return rows
    finally:
        if follower is not None:
            follower.stop()
        learner.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    lb = sub.add_parser("loopback")
    lb.add_argument("--gb", type=float, nargs="*", default=None)
    lb.add_argument("--shape", action="append", default=[], choices=sorted(QWEN3_SHAPES))
    lb.add_argument("--device", default="cpu")
    lb.add_argument("--repeat", type=int, default=2)
    lb.add_argument("--tmp", default=None, help="where the learner's snapshot goes (default: the system's temp dir)")
    dec = sub.add_parser("decode")
    dec.add_argument("--tokens", type=int, default=800)
    dec.add_argument("--bump-every", type=float, default=3.0)
    dec.add_argument("--tmp", default=None)
    dec.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M)")
    dec.add_argument("--serve-arg", action="append", default=[],
                     help="an argument for both `onlinemodel serve`s, e.g. --serve-arg=--gpu-memory-utilization=0.4")
    args = p.parse_args()
    if args.mode == "loopback" and args.gb is None:
        args.gb = [] if args.shape else [0.25, 1.0, 2.0]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    (loopback if args.mode == "loopback" else decode)(args)


if __name__ == "__main__":
    main()
