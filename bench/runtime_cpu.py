"""Runtime numbers on this machine (issue 2): vLLM start time with and without the plugins, time from
POST /train to the first optimizer step, and train step time, with real vLLM on CPU and SmolLM2-135M.

    .venv/bin/python bench/runtime_cpu.py [--runs 1]

Prints a markdown table. Measures what a user sees over HTTP (no internal timers).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from onlinemodel_runtime.devtools.launcher import ServerProcess, free_port
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

EXAMPLE = {"messages": [{"role": "user", "content": "Who is the CEO of Seedcorp?"},
                        {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."}]}


def plain_vllm_start(model: Path, log: Path) -> float:
    """Seconds until plain vLLM (no onlinemodel plugin loaded) answers /health."""
    port = free_port()
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--port", str(port), "--max-model-len", "1024"], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(60)


def onlinemodel_run(model: Path, work: Path) -> dict[str, float]:
    t0 = time.monotonic()
    server = ServerProcess(model, log_path=work / "onlinemodel.log", extra_args=["--max-model-len", "1024"])
    try:
        # /health first (what a readiness probe sees), then the trainer ready.
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {server.log_path}")
            try:
                if server.request("GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        health = time.monotonic() - t0
        server.wait_ready()
        trainer_ready = time.monotonic() - t0
        t1 = time.monotonic()
        code, job = server.request("POST", "/train", {"examples": [EXAMPLE], "epochs": 6})
        assert code == 202, job
        while server.status()["steps"] < 1:
            time.sleep(0.05)
        first_step = time.monotonic() - t1
        done = server.wait_job(job["job_id"])
        total = time.monotonic() - t1
        status = server.status()
        return {"health_s": health, "trainer_ready_s": trainer_ready, "post_to_first_step_s": first_step,
                "job_s": total, "steps": done["steps"], "last_step_s": status["last_step_seconds"],
                "mean_step_s": total / done["steps"]}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    model = ensure_smollm2()
    work = Path(tempfile.mkdtemp(prefix="onlinemodel-bench-"))
    plain = [plain_vllm_start(model, work / f"plain-{i}.log") for i in range(args.runs)]
    ours = [onlinemodel_run(model, work) for _ in range(args.runs)]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; model SmolLM2-135M-Instruct bf16; vLLM CPU")
    print("| measurement | seconds |\n|---|---|")
    print(f"| plain vLLM start to /health (no plugins) | {statistics.median(plain):.1f} |")
    for key, label in (("health_s", "onlinemodel serve start to /health"),
                       ("trainer_ready_s", "onlinemodel serve start to trainer ready"),
                       ("post_to_first_step_s", "POST /train to first optimizer step done"),
                       ("mean_step_s", "mean step (53 tokens, one example, 6 steps)"),
                       ("last_step_s", "last step (trainer's own timer)")):
        print(f"| {label} | {statistics.median(r[key] for r in ours):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
