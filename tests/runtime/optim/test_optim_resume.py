import os
import subprocess
import sys

import pytest
import torch
from optim_resume_worker import main as worker_main

WORKER = os.path.join(os.path.dirname(__file__), "optim_resume_worker.py")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _run(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "runtime"), os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, WORKER, *map(str, args)], check=True, env=env, timeout=120)


@pytest.mark.parametrize("dtype,mode", [("float32", "step"), ("bfloat16", "hooks")])
def test_resume_in_fresh_process_is_bitwise_exact(tmp_path, dtype, mode):
    n, k = 7, 3  # k=3 with update_proj_gap=3: the resumed run starts on a new projection period
    straight, half, resumed = tmp_path / "straight.pt", tmp_path / "half.pt", tmp_path / "resumed.pt"
    # Only the resumed half needs a fresh interpreter; the rest runs here to keep the test fast.
    worker_main(dtype, mode, 0, n, "-", str(straight))
    worker_main(dtype, mode, 0, k, "-", str(half))
    _run(dtype, mode, k, n - k, half, resumed)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for pid, st in a["optim"]["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optim"]["state"][pid][key])), key
    assert a["optim"]["counters"] == b["optim"]["counters"]
