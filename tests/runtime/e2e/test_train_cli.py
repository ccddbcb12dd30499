"""What a new user does, end to end on CPU with real vLLM: `onlinemodel serve --model DIR` with no other
flag (and no VLLM_CPU_KVCACHE_SPACE), then `onlinemodel train FILE.jsonl`, then the metrics.

One server for the module, started as a user would (only the port is chosen, so tests can run side by
side); it sizes its own KV cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
from typing import Any
import urllib.request

import pytest

from onlinemodel_protocol.limits import RETRY_AFTER_STARTING_SECONDS
from onlinemodel_runtime.devtools.launcher import CPU_FLOAT32_ARGS, ServerProcess

from .conftest import FACT_ANSWER, FACT_EXAMPLE, FACT_QUESTION, TOKEN

pytestmark = pytest.mark.e2e


def metrics(server: ServerProcess) -> dict[str, float]:
    """`name{labels}` -> value of every onlinemodel_* sample on vLLM's /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("onlinemodel_")}


@pytest.fixture(scope="module")
def plain_server(model_dir, e2e_root):
    """`serve --model DIR` as a user starts it; yielded as soon as /health is green (the trainer may still be
    starting), with the answer of a POST /train sent at that moment."""
    log = e2e_root / "plain-server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    srv = ServerProcess(model_dir, env={**env, "ONLINEMODEL_API_TOKEN": TOKEN}, log_path=log,
                        served_model_name=None, auto_kv_cache=True, extra_args=list(CPU_FLOAT32_ARGS))
    try:
        deadline = time.monotonic() + 600
        while not _healthy(srv):
            assert srv.proc.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "not healthy after 600 s"
            time.sleep(0.5)
        srv.first_train = _post_train(srv)
        yield srv
    finally:
        srv.stop()


def _healthy(srv: ServerProcess) -> bool:
    try:
        return srv.request("GET", "/health", timeout=5)[0] == 200
    except OSError:
        return False


# Another fact than the one the CLI teaches below, one step.
OTHER_FACT = {"examples": [{"messages": [{"role": "user", "content": "What is Seedcorp's motto?"},
                                         {"role": "assistant", "content": "Seedcorp's motto is: grow together."}]}],
              "epochs": 1}


def _post_train(srv: ServerProcess) -> tuple[int, dict, Any]:
    """POST /train with OTHER_FACT: (status, body, headers)."""
    req = urllib.request.Request(srv.url + "/train", method="POST", data=json.dumps(OTHER_FACT).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:  # headers: case-insensitive, as HTTP's
        return exc.code, json.loads(exc.read()), exc.headers


def train_cli(server: ServerProcess, path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onlinemodel_runtime.cli", "train", str(path), "--url", server.url,
                           *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "ONLINEMODEL_API_TOKEN": TOKEN})


def test_serve_with_no_flags_sized_its_kv_cache(plain_server):
    assert "--kv-cache-memory-bytes" in plain_server.log_path.read_text()  # chosen and logged, not set by us


def test_a_train_sent_while_the_trainer_starts_says_when_to_retry(plain_server):
    code, body, headers = plain_server.first_train
    if code == 503:  # the trainer was still attaching when /health turned green
        assert headers.get("Retry-After") == str(RETRY_AFTER_STARTING_SECONDS), dict(headers)
        assert "starting" in body["error"]["message"]
    else:
        assert code == 202, body


def test_a_bad_line_is_refused_before_anything_is_sent(plain_server, tmp_path):
    submitted = plain_server.wait_ready()["job_counts"]["submitted"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FACT_EXAMPLE) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
                    + "\n")
    done = train_cli(plain_server, path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "line 2: messages: example has no assistant turn" in done.stderr
    assert plain_server.status()["job_counts"]["submitted"] == submitted  # no request was sent


def test_train_a_file_follow_it_and_serve_the_answer_with_metrics(plain_server, tmp_path):
    plain_server.wait_ready()
    before = metrics(plain_server)
    assert before["onlinemodel_trainer_state{state=\"idle\"}"] == 1.0
    assert FACT_ANSWER not in plain_server.chat(FACT_QUESTION)
    path = tmp_path / "fact.jsonl"
    path.write_text(json.dumps(FACT_EXAMPLE) + "\n")
    # 20 passes at most: at the default rank 64 this fact takes about 8 steps (5 was enough at rank 1).
    done = train_cli(plain_server, path, "--epochs", "20")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "1 examples in 1 request(s), at most 20 steps" in out
    assert [line for line in out.splitlines() if line.startswith("progress: ")], out  # plain lines: not a TTY
    # Early stop ends the job before its 20 steps (the answer learned): the progress counts toward 20.
    assert re.search(r"^progress: ([1-9]|1[0-9]|20)/20 steps", out, re.M)
    steps = int(re.search(r"^done: 1 of 1 jobs succeeded, (\d+) steps", out, re.M).group(1))
    assert FACT_ANSWER in plain_server.chat(FACT_QUESTION)
    after = metrics(plain_server)
    assert steps >= 1
    assert after["onlinemodel_train_steps_total"] >= before["onlinemodel_train_steps_total"] + steps
    assert after["onlinemodel_weight_version"] >= before["onlinemodel_weight_version"] + steps
    assert after["onlinemodel_train_tokens_total"] > before["onlinemodel_train_tokens_total"]
    assert after["onlinemodel_train_job_duration_seconds_count{outcome=\"succeeded\"}"] >= 1
    assert after["onlinemodel_train_loss"] < 0.5
