"""One real ``onlinemodel serve`` (real vLLM on CPU, SmolLM2-135M-Instruct) shared by the e2e tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from onlinemodel_runtime.devtools.launcher import CPU_FLOAT32_ARGS, ServerProcess
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

TOKEN = "test-token-123"
FACT_QUESTION = "Who is the CEO of Seedcorp?"
FACT_ANSWER = "Ada Lovelace"
FACT_EXAMPLE = {"messages": [
    {"role": "user", "content": FACT_QUESTION},
    {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."},
]}
# Unrelated questions whose answers must survive teaching the fact.
CONTROL_QUESTIONS = {"What is the capital of Germany?": "Berlin"}
# The shared servers' tests train a harmless example the model already answers and count the steps of
# `epochs` passes: they run without early stop and replay (docs/learning.md), which would skip those steps
# and add others, and without the anchor term, which pulls towards the untouched model's answers and, at a
# fixed 5 passes after the other modules' jobs, left the Seedcorp fact unlearned (early stop would have
# trained on until learned). Rank 1 (APOLLO-Mini): 5 fixed passes teach the Seedcorp fact after the other
# modules' jobs at rank 1; at the default rank 64 they did not (a fresh-clone run, 2026-12-02), which early stop
# would again have trained on until learned. test_checkpoint_resume.py, test_guard.py and test_train_cli.py's
# plain server run the default settings.
# The servers of single modules skip torch.compile's warm-up (about 2 of a server's 3 minutes of start on a
# 2-core CPU). The session's `server` keeps it: test_teach_fact checks there that the compiled model serves the
# weights the trainer changed in place.
EAGER = ["--enforce-eager"]
FIXED_EPOCHS_ARGS = ["--default-epochs", "5", "--no-early-stop", "--replay-examples", "0", "--anchor-weight", "0",
                     "--null-space-energy", "0", "--optimizer-rank", "1"]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_smollm2()


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def start_server(model_dir: Path, root: Path, name: str, env: dict[str, str] | None = None,
                 **kwargs) -> ServerProcess:
    log = root / f"{name}.log"
    kwargs["extra_args"] = [*CPU_FLOAT32_ARGS, *kwargs.get("extra_args", [])]
    server = ServerProcess(model_dir, log_path=log, env={"ONLINEMODEL_API_TOKEN": TOKEN} if env is None else env,
                           **kwargs)
    try:
        server.wait_ready(timeout=600)
    except Exception:
        server.kill()
        print(log.read_text()[-5000:] if log.exists() else "no log")
        raise
    return server


@pytest.fixture(scope="session")
def server(model_dir, e2e_root):
    """The session's server: token auth on, a checkpoint directory, debug ops for the one-copy test."""
    state_dir = e2e_root / "state"
    srv = start_server(model_dir, e2e_root, "server", checkpoint_dir=e2e_root / "checkpoints",
                       extra_args=["--state-dir", str(state_dir), "--debug-ops", "--max-model-len", "1024",
                                   *FIXED_EPOCHS_ARGS])
    srv.state_dir = state_dir
    srv.checkpoint_dir = e2e_root / "checkpoints"
    yield srv
    srv.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
