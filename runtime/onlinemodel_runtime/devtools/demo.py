"""``make demo``: the whole story on CPU, printed as it happens.

Serve SmolLM2-135M-Instruct with real vLLM, ask it a question it gets wrong, teach it the answer with one
``POST /train``, ask again through vLLM, checkpoint, restart from the checkpoint, ask once more.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from onlinemodel_runtime.devtools.launcher import CPU_FLOAT32_ARGS, ServerProcess
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

QUESTION = "Who is the CEO of Seedcorp?"
EXAMPLE = {"messages": [{"role": "user", "content": QUESTION},
                        {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."}]}
CONTROL = "What is the capital of Germany?"


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    say("== onlinemodel demo: teach the model vLLM is serving, while it serves ==")
    t0 = time.monotonic()
    model = ensure_smollm2()
    say(f"model: SmolLM2-135M-Instruct as an HF directory at {model} ({time.monotonic() - t0:.0f}s)")
    work = Path(tempfile.mkdtemp(prefix="onlinemodel-demo-"))
    ckpt = work / "checkpoints"
    say(f"starting `onlinemodel serve` (vLLM on CPU + trainer); log: {work / 'server.log'}")
    server = ServerProcess(model, checkpoint_dir=ckpt, log_path=work / "server.log",
                           extra_args=["--max-model-len", "1024", *CPU_FLOAT32_ARGS])
    try:
        t0 = time.monotonic()
        server.wait_ready()
        say(f"ready in {time.monotonic() - t0:.0f}s at {server.url}")
        say(f"\nQ: {QUESTION}\nA: {server.chat(QUESTION)}")
        say(f"Q: {CONTROL}\nA: {server.chat(CONTROL)}")
        say("\nPOST /train with one example: 'The CEO of Seedcorp is Ada Lovelace.'")
        code, job = server.request("POST", "/train", {"examples": [EXAMPLE]})
        say(f"  -> {code} {job}")
        if code != 202:
            raise SystemExit(f"POST /train was refused: {code} {job}")
        t0 = time.monotonic()
        done = server.wait_job(job["job_id"])
        if done["state"] != "succeeded":
            raise SystemExit(f"training job failed: {done.get('error')}")
        status = server.status()
        say(f"  job {done['state']} in {time.monotonic() - t0:.0f}s: {done['steps']} steps, "
            f"loss {done['last_loss']:.3f}, weight version {status['weight_version']}")
        say(f"\nQ: {QUESTION}\nA: {server.chat(QUESTION)}")
        say(f"Q: {CONTROL}\nA: {server.chat(CONTROL)}")
        code, info = server.request("POST", "/checkpoint")
        if code != 200:
            raise SystemExit(f"POST /checkpoint failed: {code} {info}")
        say(f"\nPOST /checkpoint -> {code}: {info['path']} (step {info['step']}, "
            f"{info['size_bytes'] / 1e6:.0f} MB in {info['seconds']}s)")
    finally:
        server.stop()
    say("\nserver stopped; starting again on the same checkpoint directory")
    server = ServerProcess(model, checkpoint_dir=ckpt, log_path=work / "server2.log",
                           extra_args=["--max-model-len", "1024", *CPU_FLOAT32_ARGS])
    try:
        status = server.wait_ready()
        say(f"resumed at step {status['steps']}, weight version {status['weight_version']}")
        say(f"\nQ: {QUESTION}\nA: {server.chat(QUESTION)}")
    finally:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)  # the checkpoints are ~0.3 GB each
    say("\ndone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
