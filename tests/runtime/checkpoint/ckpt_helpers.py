"""Shared helpers of the checkpoint tests (a unique module name: several conftest.py exist)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       max_position_embeddings=128, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_tiny_model(seed: int = 0):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():  # leave the global RNG as other tests expect it
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
    return model.eval()


def run_worker(root: Path, base: Path, step: int, mode: str, *, wait_marker: bool) -> subprocess.Popen | str:
    """Start ckpt_worker.py; with wait_marker, return the process once it signals it is mid-save."""
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'runtime'}{os.pathsep}{HERE}")
    cmd = [sys.executable, str(HERE / "ckpt_worker.py"), str(root), str(base), str(step), mode]
    if not wait_marker:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout
    marker = root.parent / (root.name + ".marker")
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the stall point")
        time.sleep(0.02)
    return proc
