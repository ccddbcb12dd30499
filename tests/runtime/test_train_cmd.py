"""`onlinemodel train` against the real training routes (real parser and tokenizer) with a stand-in trainer
that finishes each job at the next status poll (the real trainer: tests/runtime/e2e/test_train_cli.py)."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).parent / "vllm_plugins"))
from endpoint_helpers import StubSupervisor, make_app  # noqa: E402

from onlinemodel_protocol.api import Job, TrainStatus  # noqa: E402
from onlinemodel_runtime import cli, train_cmd  # noqa: E402
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2  # noqa: E402

QA = [{"role": "user", "content": "Who is the CEO of Seedcorp?"},
      {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."}]


class FinishingSupervisor(StubSupervisor):
    """Jobs queue on submit and have succeeded (or failed, for `fail_job`) by the next status."""

    def __init__(self, fail_job: int | None = None):
        super().__init__()
        self.fail_job = fail_job

    async def status(self):
        jobs = [Job(id=f"job-{i + 1}", examples=len(j.examples), epochs=j.epochs, learning_rate=j.learning_rate,
                    steps=len(j.examples) * j.epochs, steps_total=len(j.examples) * j.epochs, last_loss=0.5,
                    state="failed" if i + 1 == self.fail_job else "succeeded", created_at="2026-12-01T10:00:00Z")
                for i, j in enumerate(self.jobs)]
        return TrainStatus(state="idle", jobs=jobs)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2())


@pytest.fixture
def serve(monkeypatch, tokenizer):
    """serve(supervisor, **cfg): the routes on a real HTTP server (uvicorn, a thread) for this test."""
    servers = []

    def start(supervisor, **cfg) -> None:
        server = uvicorn.Server(uvicorn.Config(make_app(tokenizer, supervisor, ("tok",), **cfg), host="127.0.0.1",
                                               port=0, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        monkeypatch.setenv("OM_TEST_URL", f"http://127.0.0.1:{port}")
        servers.append(server)

    monkeypatch.setattr(train_cmd, "POLL_SECONDS", 0.01)
    monkeypatch.setenv("ONLINEMODEL_API_TOKEN", "tok")
    yield start
    for server in servers:
        server.should_exit = True


def train(tmp_path, capsys, *lines: str, args: tuple[str, ...] = ()) -> tuple[int, str, str]:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = cli.main(["train", str(path), "--url", os.environ["OM_TEST_URL"], *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_file_is_split_sent_and_followed_to_the_end(serve, tmp_path, capsys):
    sup = FinishingSupervisor()
    serve(sup, max_examples=2)
    code, out, _ = train(tmp_path, capsys, *[json.dumps({"messages": QA})] * 3, args=("--epochs", "2"))
    assert code == 0, out
    assert [len(j.examples) for j in sup.jobs] == [2, 1] and {j.epochs for j in sup.jobs} == {2}
    assert "3 examples in 2 request(s), at most 6 steps" in out and "progress: 6/6 steps  loss 0.5000" in out
    assert out.strip().endswith("done: 2 of 2 jobs succeeded, 6 steps, last loss 0.5")
    # The same command again replays the same jobs (Idempotency-Key): nothing trains twice.
    assert train(tmp_path, capsys, *[json.dumps({"messages": QA})] * 3, args=("--epochs", "2"))[0] == 0
    assert len(sup.jobs) == 2


def test_a_bad_line_sends_nothing_and_a_failed_job_fails_the_command(serve, tmp_path, capsys):
    sup = FinishingSupervisor(fail_job=1)
    serve(sup)
    code, _, err = train(tmp_path, capsys, json.dumps({"messages": QA}), json.dumps({"messages": QA[:1]}))
    assert code == 2 and sup.jobs == []
    assert "line 2: messages: example has no assistant turn" in err
    code, out, _ = train(tmp_path, capsys, json.dumps({"messages": QA}))
    assert code == 1 and "job job-1 failed" in out and "done: 0 of 1 jobs succeeded" in out


def test_the_server_names_what_only_it_can_check(serve, tmp_path, capsys):
    # Token counts need the model's tokenizer: only the server has it.
    sup = FinishingSupervisor()
    serve(sup, max_body_bytes=1024)
    code, out, _ = train(tmp_path, capsys, json.dumps({"messages": QA}),
                         json.dumps({"messages": [{"role": "assistant", "content": "x " * 300}]}))
    assert code == 1 and "line 2: example is 328 tokens long; the model's maximum is 256" in out, out
    assert sup.jobs == []


def test_progress_on_a_terminal_is_one_redrawn_line():
    out = io.StringIO()
    out.isatty = lambda: True
    display = train_cmd._Display(out)
    run = train_cmd._Run(requests=[])
    display.progress(run, 0.0)
    assert out.getvalue().startswith("\r[") and out.getvalue().endswith("\033[K") and "\n" not in out.getvalue()
