"""Introspection for tests and operators: where the trainer's parameters live, and what memory it holds.

Reached only over the trainer's local ZMQ socket (never over HTTP), and the write operation only when the
runtime config enables ``debug_ops``.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def smaps_summary(pid: int | None = None) -> dict[str, int]:
    """Resident bytes of this process split by kind, from /proc/PID/smaps (Linux)."""
    path = f"/proc/{pid or os.getpid()}/smaps"
    totals = {"rss": 0, "anonymous": 0, "shared_weights_rss": 0}
    current = ""
    try:
        with open(path) as f:
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # a mapping header line: "addr perms offset dev inode path"
                    parts = line.split()
                    current = parts[5] if len(parts) >= 6 else ""
                    continue
                if head in ("Rss:", "Anonymous:"):
                    kb = int(line.split()[1]) * 1024
                    if head == "Rss:":
                        totals["rss"] += kb
                        if "onlinemodel-" in current and current.endswith(".weights"):
                            totals["shared_weights_rss"] += kb
                    else:
                        totals["anonymous"] += kb
    except OSError:
        pass
    return totals


def introspect(model: torch.nn.Module) -> dict[str, Any]:
    params = {}
    for name, p in model.named_parameters():
        storage = p.untyped_storage()
        params[name] = {"storage_ptr": storage.data_ptr(), "storage_nbytes": storage.nbytes(),
                        "offset": p.data_ptr() - storage.data_ptr(), "nbytes": p.numel() * p.element_size(),
                        "device": str(p.device), "requires_grad": p.requires_grad}
    return {"pid": os.getpid(), "parameters": params, "memory": smaps_summary()}


@torch.no_grad()
def scale_parameter(model: torch.nn.Module, name: str, factor: float) -> None:
    params = dict(model.named_parameters())
    if name not in params:
        raise KeyError(f"no parameter {name!r}")
    params[name].mul_(factor)
