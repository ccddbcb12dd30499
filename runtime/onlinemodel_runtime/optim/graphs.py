"""CUDA-graph replay of one bucket's compiled update (hook mode, CUDA, buckets of several params).

Even as one compiled graph, a decoder layer's update is ~50 kernel launches plus dynamo's guard
check from Python on autograd's thread; on the H200 hosts that made a Qwen3 step host-bound. A
captured CUDA graph replays all of them with one launch. Per step and bucket the host then does
four things: copy the gradients into static buffers (one multi-tensor copy, on backward's stream),
copy the per-step constants (uploaded once per step, shared by every bucket), copy the gate flag,
replay.

Static inputs: the weights, moments, limiter norms and projections are the optimizer's own tensors
(fixed addresses; a change of any address builds a new graph, see `graph_key`), the gradients go
through buffers shared by every bucket of the same shapes (buckets run one after another on one
stream, so one set serves them all: one decoder layer's gradients extra, not the model's).
Stochastic rounding stays random per replay: torch advances the captured philox offset each time.
"""

from __future__ import annotations

from typing import Any

import torch


def graph_key(spec: tuple, tensors: list[list[torch.Tensor]]) -> tuple:
    """Everything a captured graph depends on: structure and every input's address and shape."""
    return spec, tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
                       for ts in tensors for t in ts)


class BucketGraph:
    """One bucket's update captured once, replayed every step."""

    def __init__(self, fn: Any, spec: tuple, ws: list[torch.Tensor], grad_bufs: list[torch.Tensor],
                 projs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
                 lims: list[torch.Tensor], consts: torch.Tensor, pool: Any) -> None:
        self.grads = grad_bufs
        self.consts = torch.empty_like(consts)
        self.consts.copy_(consts)
        self.gate = torch.zeros((), dtype=torch.bool, device=consts.device)
        args = (spec, ws, self.grads, projs, ms, vs, lims, self.consts, self.gate)
        side = torch.cuda.Stream(device=consts.device)
        side.wait_stream(torch.cuda.current_stream(consts.device))
        with torch.cuda.stream(side):
            fn(*args)  # warm-up on the capture stream; the gate is False, so nothing changes
        torch.cuda.current_stream(consts.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            self.ok = fn(*args)

    def run(self, grads: list[torch.Tensor], consts: torch.Tensor, gate: torch.Tensor,
            producer: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Replay with these inputs; returns the bucket's applied flag (a static tensor, valid
        until this bucket's next replay). `producer`: the stream the gradients were made on,
        when the replay runs on another one (hook mode's side stream): the gradients are copied
        there, so backward may reuse their memory at once (no record_stream, whose delayed frees
        make the allocator grow and stall), after earlier replays that read the shared buffers."""
        if producer is not None:
            here = torch.cuda.current_stream(self.consts.device)
            producer.wait_stream(here)
            with torch.cuda.stream(producer):
                torch._foreach_copy_(self.grads, grads)
            here.wait_stream(producer)
        else:
            torch._foreach_copy_(self.grads, grads)
        self.consts.copy_(consts, non_blocking=True)
        self.gate.copy_(gate)
        self.graph.replay()
        return self.ok


class GraphCache:
    """Per bucket name: the graph for its current inputs. A bucket is captured on its second
    flush with unchanged inputs (the first one compiles and runs normally)."""

    def __init__(self) -> None:
        self.graphs: dict[str, tuple[tuple, BucketGraph]] = {}
        self.seen: dict[str, tuple] = {}
        self.grad_bufs: dict[tuple, list[torch.Tensor]] = {}
        self.pools: dict[torch.device, Any] = {}
        self.failed = False

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.grad_bufs.clear()

    def lookup(self, name: str, key: tuple) -> BucketGraph | None | bool:
        """The graph to replay; True if one should be captured now; None to run uncaptured."""
        hit = self.graphs.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        if self.seen.get(name) == key:
            return True
        self.graphs.pop(name, None)
        self.seen[name] = key
        return None

    def capture(self, name: str, key: tuple, fn: Any, spec: tuple, ws, grads, projs, ms, vs, lims,
                consts) -> BucketGraph:
        device = consts.device
        sig = tuple((tuple(g.shape), g.dtype, str(g.device)) for g in grads)
        bufs = self.grad_bufs.get(sig)
        if bufs is None:
            bufs = self.grad_bufs[sig] = [torch.empty_like(g, memory_format=torch.contiguous_format)
                                          for g in grads]
        pool = self.pools.get(device)
        if pool is None:
            pool = self.pools[device] = torch.cuda.graph_pool_handle()
        graph = BucketGraph(fn, spec, ws, bufs, projs, ms, vs, lims, consts, pool)
        self.graphs[name] = (key, graph)
        return graph
