"""The KV cache size ``onlinemodel serve`` gives vLLM on CPU when the user chose none.

vLLM's CPU backend otherwise reserves ``--gpu-memory-utilization`` (0.92 by default) of the memory node
and refuses to start when less is free: the normal state of a laptop or a CI machine running anything
else. When the platform is CPU and neither ``VLLM_CPU_KVCACHE_SPACE`` nor ``--gpu-memory-utilization`` /
``--kv-cache-memory-bytes`` is set, ``serve`` passes ``--kv-cache-memory-bytes`` sized from what is free:

    kv = (available - 2 x weights - N x (server reserve + trainer reserve)) / 2 / N, within [KV_MIN, KV_MAX]

The weights count twice (vLLM loads them, then the worker moves them into the shared-memory file both
processes map); the reserves hold vLLM's own process (torch, compiled graphs, activations) and the
trainer's (torch, transformers, one example's activations and gradients); half of the rest is left to
everything else on the machine. With vLLM's ``--tensor-parallel-size N`` each of the N workers (and trainers)
takes its reserve and vLLM gives every worker the KV cache size asked for (measured, docs/tensor-parallel.md),
so the rest is shared by N. ``available`` is the smaller of the system's available memory and what
the cgroup (a container's memory limit) still allows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

GiB = 1024 ** 3
KV_MIN = GiB // 4  # a few thousand tokens of a small model: below this vLLM serves little
KV_MAX = 2 * GiB  # ~75k tokens of a 1.5B model: more only helps many long concurrent requests, rare on a CPU
SERVER_RESERVE = 2 * GiB
TRAINER_RESERVE = 2 * GiB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
USER_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
TP_FLAGS = ("--tensor-parallel-size", "-tp")


def choose_kv_cache_bytes(available: int, weights: int, training: bool, tp_size: int = 1) -> int:
    """The KV cache size of each of `tp_size` workers for `available` bytes of free memory and `weights` bytes
    of model files."""
    spare = available - 2 * weights - tp_size * (SERVER_RESERVE + (TRAINER_RESERVE if training else 0))
    return int(min(max(spare // 2 // tp_size, KV_MIN), KV_MAX))


def tensor_parallel_size(argv: list[str]) -> int:
    """vLLM's ``--tensor-parallel-size`` (or ``-tp``) in `argv`; 1 if absent or not a number (vLLM says why)."""
    for i, arg in enumerate(argv):
        for flag in TP_FLAGS:
            value = argv[i + 1] if arg == flag and i + 1 < len(argv) else \
                arg.removeprefix(flag + "=") if arg.startswith(flag + "=") else None
            if value is not None:
                return int(value) if value.isdigit() and int(value) > 0 else 1
    return 1


def user_chose(argv: list[str], env: dict[str, str]) -> bool:
    """Whether the user sized vLLM's memory themselves (flags in `argv` or the legacy variable)."""
    if env.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        return True
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in USER_FLAGS)


def available_memory() -> int:
    import psutil

    free = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller visible: the system's figure stands
    return max(free, 0)


def weights_bytes(model: str) -> int:
    """Size of the weight files of a model directory (0 for a Hugging Face id: not downloaded yet)."""
    root = Path(model)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def on_cpu() -> bool:
    # vLLM's own platform detection, so the answer is the one vLLM will act on.
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def kv_cache_args(model: str, argv: list[str], training: bool, env: dict[str, str] | None = None) -> list[str]:
    """``["--kv-cache-memory-bytes", N]`` when the platform is CPU and the user chose no size, else []."""
    if user_chose(argv, dict(os.environ) if env is None else env) or not on_cpu():
        return []
    available, weights, tp_size = available_memory(), weights_bytes(model), tensor_parallel_size(argv)
    size = choose_kv_cache_bytes(available, weights, training, tp_size)
    log.info("CPU: KV cache of %.2f GiB per worker (%d workers, available memory %.1f GiB, weights %.2f GiB, "
             "trainer %s); set --kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE to choose another", size / GiB,
             tp_size, available / GiB, weights / GiB, "on" if training else "off")
    if size == KV_MIN and available - 2 * weights < SERVER_RESERVE + KV_MIN:
        log.warning("CPU: only %.1f GiB of memory is available; vLLM may not start", available / GiB)
    return ["--kv-cache-memory-bytes", str(size)]
