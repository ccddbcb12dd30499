"""vLLM's own loader on CPU, in a subprocess: what `named_parameters()` holds after `load_weights`.

No engine, no forward: `initialize_model` + `load_weights` from a model directory, the way vLLM's loader
builds the served model, then its kernel-specific post-processing with onlinemodel's CPU live-weights patch
(as in a served worker) and `vllm_compat.check_live_weights` on the result. Used by the layout tests to
check the tables against the real thing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_SCRIPT = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype
    from onlinemodel_runtime.vllm_plugins import compat as vllm_compat
    vllm_compat.install_live_cpu_linears()
    import glob
    port, out, language_model_only, meta, dirs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5:]
    result = {}
    for i, d in enumerate(dirs):
        options = {"language_model_only": True} if language_model_only else {}
        mc = ModelConfig(model=d, dtype="bfloat16", **options)
        vc = VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"))
        with set_current_vllm_config(vc):
            if i == 0:
                init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                             distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
                initialize_model_parallel(1, 1)
            with torch.device("meta" if meta else "cpu"), set_default_torch_dtype(mc.dtype):
                model = initialize_model(vllm_config=vc)
            if meta:  # names, shapes, dtypes only: real model sizes without their memory
                result[d] = {"params": {n: p.detach() for n, p in model.named_parameters()}}
                continue
            weights = {}
            for f in sorted(glob.glob(d + "/*.safetensors")):
                weights.update(load_file(f))
            model.load_weights(weights.items())
            result[d] = {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "all_names": [n for n, _ in model.named_parameters(remove_duplicate=False)],
            }
            process_weights_after_loading(model, mc, torch.device("cpu"))
            try:
                vllm_compat.check_live_weights(model)
                result[d]["live_weights_error"] = None
            except vllm_compat.UnsupportedVLLMError as exc:
                result[d]["live_weights_error"] = str(exc)
    torch.save(result, out)
""")

# See no_torchvision/sitecustomize.py: vLLM's Qwen3.5 modules import a torchvision-backed processor.
_NO_TORCHVISION = Path(__file__).parent / "no_torchvision"


def _has_experts(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return bool(config.get("num_experts") or config.get("text_config", {}).get("num_experts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_with_vllm(model_dirs: list[Path], out: Path, *, language_model_only: bool = False,
                   meta: bool = False) -> dict[str, dict]:
    """model dir (str) -> {"params": vLLM's named_parameters() clones as loaded, "all_names": without
    dedup, "live_weights_error": what check_live_weights said after post-processing, or None}.
    language_model_only: as vLLM's `--language-model-only` (a multimodal model without its vision tower).
    meta: build the models on the meta device and load nothing (directories without weights, of any
    size): "params" only, meta tensors."""
    # vLLM creates its expert-parallel group only when the first config it initializes has experts.
    dirs = sorted(map(str, model_dirs), key=lambda d: not _has_experts(Path(d)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_NO_TORCHVISION),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(_free_port()), str(out),
                           "1" if language_model_only else "0", "1" if meta else "0", *dirs],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


_TP_SCRIPT = textwrap.dedent("""
    import glob, sys, torch
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype
    port, out, d, tp, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    mc = ModelConfig(model=d, dtype="bfloat16")
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"),
                    parallel_config=ParallelConfig(tensor_parallel_size=tp))
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=tp, rank=rank, local_rank=rank,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
        initialize_model_parallel(tp, 1)
        with torch.device("cpu"), set_default_torch_dtype(mc.dtype):
            model = initialize_model(vllm_config=vc)
        weights = {}
        for f in sorted(glob.glob(d + "/*.safetensors")):
            weights.update(load_file(f))
        model.load_weights(weights.items())
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out)
""")


def load_with_vllm_tp(model_dir: Path, out_dir: Path, tp_size: int) -> list[dict[str, torch.Tensor]]:
    """What each of `tp_size` tensor-parallel ranks of vLLM holds after its own `load_weights` (one process
    per rank, a gloo group, as vLLM's CPU workers): rank -> named_parameters() clones."""
    port = str(_free_port())
    # vLLM's CPU communicator names its shared-memory group after VLLM_DIST_IDENT (its executor sets it).
    env = dict(os.environ, VLLM_DIST_IDENT=f"onlinemodel-test-{port}")
    outs = [Path(out_dir) / f"rank{r}.pt" for r in range(tp_size)]
    procs = [subprocess.Popen([sys.executable, "-c", _TP_SCRIPT, port, str(out), str(model_dir), str(tp_size), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r, out in enumerate(outs)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r}: {log[-3000:]}"
    return [torch.load(out) for out in outs]
