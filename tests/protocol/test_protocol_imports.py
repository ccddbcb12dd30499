"""The protocol package is what the operator image installs: it must import without torch or vLLM."""

from __future__ import annotations

import subprocess
import sys


def test_imports_no_torch_no_vllm_no_runtime():
    code = ("import sys, onlinemodel_protocol.api, onlinemodel_protocol.config, onlinemodel_protocol.limits, "
            "onlinemodel_protocol.rpc, onlinemodel_protocol.client; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'zmq', 'onlinemodel_runtime') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
