"""CUDA-graph replay of one bucket's compiled update (hook mode, CUDA, buckets of several params).

Even as one compiled graph, a decoder layer's update is ~50 kernel launches plus dynamo's guard
check from Python on autograd's thread; on the H200 hosts that made a Qwen3 step host-bound. A
captured CUDA graph replays all of them with one launch.

Static inputs: the weights, moments, limiter norms and projections are the optimizer's own tensors
(fixed addresses; a change of any address builds a new graph), the per-step constants and the
step's gate flag are per-device buffers shared by every graph (written once per step, see
compiled_buckets.py), and the gradients go through buffers shared by every bucket of the same
shapes (buckets run one after another on one stream, so one set serves them all: one decoder
layer's gradients extra, not the model's). The graph ends by writing its bucket's applied flag into
the shared gate, so a later bucket of the same step sees it without a host round trip.
Stochastic rounding stays random per replay: torch advances the captured philox offset each time.

A captured bucket also keeps its "plan" (parameters, states, tensor addresses it was captured
with): a later step that finds the same plan replays at once, with no per-parameter host work
beyond the constants, which is what keeps hook mode off the critical path of a host-bound backward.
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
                 lims: list[torch.Tensor], consts: torch.Tensor, gate: torch.Tensor, pool: Any,
                 side: torch.cuda.Stream) -> None:
        self.grads = grad_bufs
        self.gate = gate
        self.consts = consts
        self.plan: dict[str, Any] | None = None  # set by the optimizer after capture
        device = consts.device
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # Warm-up on the capture stream with a private False gate: nothing changes.
            fn(spec, ws, self.grads, projs, ms, vs, lims, consts, torch.zeros_like(gate))
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            self.ok = fn(spec, ws, self.grads, projs, ms, vs, lims, consts, gate)
            gate.copy_(self.ok)

    def run(self, grads: list[torch.Tensor], streams: tuple | None = None,
            waited: bool = False) -> torch.Tensor:
        """Replay with these gradients; returns the bucket's applied flag (a static tensor, valid
        until this bucket's next replay).

        streams=None: copy and replay on the current stream. Else (main, side, events, restore):
        the gradients come from `main` (backward's stream) and are copied on it, so backward may
        reuse their memory at once (no record_stream, whose delayed frees make the allocator grow
        and stall); the copy first waits for the last replay on `side` (events[0], which read the
        shared buffers); the replay runs on `side` after the copy (events[1]), so after every
        kernel backward queued so far; then `restore` becomes the current stream again.
        waited: the caller already made `main` wait for events[0]."""
        if streams is None:
            torch._foreach_copy_(self.grads, grads)
            self.graph.replay()
            return self.ok
        main, side, (side_done, main_done), restore = streams
        try:
            torch.cuda.set_stream(main)
            if not waited:
                main.wait_event(side_done)
            torch._foreach_copy_(self.grads, grads)
            main_done.record(main)
            side.wait_event(main_done)
            torch.cuda.set_stream(side)
            self.graph.replay()
            side_done.record(side)
        finally:
            torch.cuda.set_stream(restore)
        return self.ok


class GraphCache:
    """Per bucket name: the graph for its current inputs. A bucket is captured on its second
    flush with unchanged inputs (the first one compiles and runs normally)."""

    def __init__(self) -> None:
        self.graphs: dict[str, tuple[tuple, BucketGraph]] = {}
        self.seen: dict[str, tuple] = {}
        self.grad_bufs: dict[tuple, list[torch.Tensor]] = {}
        self.pools: dict[torch.device, Any] = {}
        # One capture stream per device: the shared pool reuses blocks only within a stream.
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.failed = False

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.grad_bufs.clear()

    def planned(self, name: str) -> BucketGraph | None:
        hit = self.graphs.get(name)
        return hit[1] if hit is not None else None

    def drop(self, name: str) -> None:
        self.graphs.pop(name, None)

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
                consts, gate) -> BucketGraph:
        device = consts.device
        sig = tuple((tuple(g.shape), g.dtype, str(g.device)) for g in grads)
        bufs = self.grad_bufs.get(sig)
        if bufs is None:
            bufs = self.grad_bufs[sig] = [torch.empty_like(g, memory_format=torch.contiguous_format)
                                          for g in grads]
        pool = self.pools.get(device)
        if pool is None:
            pool = self.pools[device] = torch.cuda.graph_pool_handle()
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = torch.cuda.Stream(device=device)
        graph = BucketGraph(fn, spec, ws, bufs, projs, ms, vs, lims, consts, gate, pool, side)
        self.graphs[name] = (key, graph)
        return graph
