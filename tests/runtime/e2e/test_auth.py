"""vLLM's --api-key alone guards /v1 and the training routes; a NaN step leaves /train/status answering
(null loss); weights that are not healthy never become the `latest` checkpoint, not even the final one."""

import json
import math
import os
import shutil

import pytest

from onlinemodel_protocol.config import ENV_API_TOKEN, ENV_VLLM_API_KEY

from .conftest import EAGER, FIXED_EPOCHS_ARGS, start_server
from .test_one_copy import trainer_request
from .test_serving_while_training import ECHO_EXAMPLE

pytestmark = pytest.mark.e2e

API_KEY = "vllm-key-42"


@pytest.fixture(scope="module")
def keyed_server(model_dir, e2e_root):
    """Started with vLLM's --api-key and no ONLINEMODEL_API_TOKEN."""
    state_dir = e2e_root / "keyed-state"
    checkpoints = e2e_root / "keyed-checkpoints"
    with pytest.MonkeyPatch.context() as env:
        for name in (ENV_API_TOKEN, ENV_VLLM_API_KEY):
            env.delenv(name, raising=False)
        srv = start_server(model_dir, e2e_root, "keyed", env={}, checkpoint_dir=checkpoints,
                           extra_args=["--api-key", API_KEY, "--state-dir", str(state_dir), "--debug-ops",
                                       "--max-model-len", "1024", *FIXED_EPOCHS_ARGS, *EAGER])
    srv.state_dir, srv.checkpoint_dir = state_dir, checkpoints
    assert srv.token == API_KEY
    yield srv
    srv.stop()
    shutil.rmtree(state_dir, ignore_errors=True)


def test_the_api_key_guards_inference_and_training(keyed_server):
    srv = keyed_server
    assert srv.request("GET", "/health", token="")[0] == 200  # probes need no key
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/train", {"examples": [ECHO_EXAMPLE]}),
                               ("GET", "/train/status", None), ("POST", "/checkpoint", None),
                               ("DELETE", "/train/jobs/job-x", None)):
        for token in ("", "wrong"):
            code, _ = srv.request(method, path, body, token=token)
            assert code == 401, (method, path, token)
    assert srv.request("GET", "/v1/models")[0] == 200
    assert srv.status()["steps"] == 0


def test_nan_step_then_status_answers_and_unhealthy_weights_never_become_latest(keyed_server):
    srv = keyed_server
    code, job = srv.request("POST", "/train", {"examples": [ECHO_EXAMPLE], "epochs": 1, "learning_rate": 1e-9})
    assert code == 202, job
    assert srv.wait_job(job["job_id"])["state"] == "succeeded"
    code, healthy = srv.request("POST", "/checkpoint")
    assert code == 200, healthy

    # A NaN in a weight the optimizer does not train (the final norm): every later loss is NaN.
    trainer_request(srv, "debug_scale", name="model.norm.weight", factor=math.nan)
    code, job = srv.request("POST", "/train", {"examples": [ECHO_EXAMPLE], "epochs": 2})
    assert code == 202, job
    done = srv.wait_job(job["job_id"])
    assert done["state"] == "succeeded" and done["last_loss"] is None
    code, status = srv.request("GET", "/train/status")
    assert code == 200, status  # not a 500: the NaN loss is null
    assert status["last_loss"] is None and status["skipped_steps"] >= 2

    code, refused = srv.request("POST", "/checkpoint")
    assert code == 422 and refused["error"]["type"] == "checkpoint_error", refused
    assert "unhealthy" in refused["error"]["message"]
    checkpoint = srv.status()["checkpoint"]
    assert checkpoint["last"]["path"] == healthy["path"]
    assert checkpoint["last_unhealthy"]["healthy"] is False
    assert "NaN or infinity" in checkpoint["last_unhealthy"]["unhealthy_reason"]
    assert (srv.checkpoint_dir / "latest").read_text().strip() == os.path.basename(healthy["path"])

    # Stopping tries the final checkpoint: refused as well, so `latest` still names the healthy one.
    srv.stop()
    assert (srv.checkpoint_dir / "latest").read_text().strip() == os.path.basename(healthy["path"])
    record = json.loads((srv.checkpoint_dir / os.path.basename(healthy["path"]) / "onlinemodel" /
                         "checkpoint.json").read_text())
    assert record["health"] == {"healthy": True, "reasons": []}
