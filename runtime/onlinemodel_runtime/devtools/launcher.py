"""Start ``onlinemodel serve`` as a child process and wait until it serves and trains.

Used by ``make demo`` and the end-to-end tests; also handy in notebooks.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from onlinemodel_protocol.api import FINISHED_JOB_STATES
from onlinemodel_protocol.config import ENV_API_TOKEN
from onlinemodel_runtime.server import auth

# vLLM's dtype for the CPU runs of the tests and `make demo`: float32 (vLLM's "auto" serves SmolLM2's bf16,
# and the trainer trains the weights vLLM holds). On a CPU without bf16 instructions (AVX2 only, as some CI
# machines) torch's bf16 matmuls in backward run over 20x slower than float32 (SmolLM2, one 300-token step with
# 2 threads: 73 s against 3 s, docs/benchmarks.md), which put the suite past CI's 90 minutes. GPU runs and the
# benchmarks serve bf16.
CPU_DTYPE = "float32"  # what tests that read the served weights load them as
CPU_FLOAT32_ARGS = ("--dtype", CPU_DTYPE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running ``onlinemodel serve`` with a tiny HTTP client for its API.

    The training routes need a token: unless the environment or vLLM's ``--api-key`` names one (or
    `extra_args` opens them with ``--insecure-open-training``), a fresh random one is generated; every
    request carries it.
    """

    def __init__(self, model: Path | str, *, port: int | None = None, checkpoint_dir: Path | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None, served_model_name: str | None = "model",
                 auto_kv_cache: bool = False):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # None: no --served-model-name, clients name the model by its path (vLLM's default).
        self.served_model_name = served_model_name or str(model)
        full_env = {**os.environ, **(env or {})}
        try:
            tokens = auth.resolve_tokens(full_env, auth.vllm_api_keys(list(extra_args or []))[0])
        except auth.TokenError:
            tokens = ()  # the server refuses to start and says why
        else:
            if not tokens and "--insecure-open-training" not in (extra_args or []):
                tokens = (secrets.token_urlsafe(24),)
                full_env[ENV_API_TOKEN] = tokens[0]
        self.token = tokens[0] if tokens else None
        cmd = [sys.executable, "-m", "onlinemodel_runtime.cli", "serve", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(self.port)]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        if checkpoint_dir is not None:
            cmd += ["--checkpoint-dir", str(checkpoint_dir)]
        cmd += list(extra_args or [])
        if auto_kv_cache:  # what a user gets: `serve` sizes the KV cache from the free memory
            full_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:  # small KV cache: the CI machine has 24 GiB shared by vLLM, the trainer and the tests
            full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log_path = log_path
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            if log_path:
                out.close()  # the child has its own descriptor

    # -- HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                raw: bytes | None = None, timeout: float = 120.0,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, method=method, data=data, headers=headers or {})
        req.add_header("Content-Type", "application/json")
        token = token if token is not None else self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read()
                return resp.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text.decode(errors="replace")

    def chat(self, question: str, max_tokens: int = 24) -> str:
        status, body = self.request("POST", "/v1/chat/completions", {
            "model": self.served_model_name, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}],
        })
        if status != 200:
            raise RuntimeError(f"chat failed: {status} {body}")
        return body["choices"][0]["message"]["content"]

    def status(self) -> dict[str, Any]:
        code, body = self.request("GET", "/train/status")
        if code != 200:
            raise RuntimeError(f"/train/status answered {code}: {body}")
        return body

    # -- lifecycle --------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 600.0) -> dict[str, Any]:
        """Until /health answers and the trainer (or a follower's writer) is ready."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                code, _ = self.request("GET", "/health", timeout=5)
                status_code, body = self.request("GET", "/train/status", timeout=5) if code == 200 else (0, None)
                if status_code == 200:
                    last = body
                    if last["state"] in ("idle", "training", "disabled", "following"):
                        return last
                    if last["state"] == "error":
                        raise RuntimeError(f"trainer failed: {last.get('last_error')}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout:.0f}s (last status {last}); see {self.log_path}")

    def wait_job(self, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            for job in status["jobs"]:
                if job["id"] == job_id and job["state"] in FINISHED_JOB_STATES:
                    return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """Kill the whole process group at once (no final checkpoint)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
