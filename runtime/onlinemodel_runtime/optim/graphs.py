"""CUDA-graph replay of one bucket's compiled update (hook mode, CUDA, buckets of several params).

Even as one compiled graph, a decoder layer's update is ~50 kernel launches plus dynamo's guard
check from Python on autograd's thread; on the H200 hosts that made a Qwen3 step host-bound. A
captured CUDA graph replays all of them with one launch.

Static inputs: the weights, moments, limiter norms and projections are the optimizer's own tensors
(fixed addresses; a change of any address builds a new graph), the per-step constants and the
step's gate flag are per-device buffers shared by every graph (written once per step:
bucket_update.ConstBuffers, gate.StepGate), and the gradients go through buffers shared by every
bucket of the same shapes (buckets run one after another on one stream, so one set serves them
all: one decoder layer's gradients extra, not the model's). The graph ends by writing its
bucket's applied flag into the shared gate, so a later bucket of the same step sees it without a
host round trip.
Stochastic rounding stays random per replay: torch advances the captured philox offset each time.

A captured bucket also keeps its `Plan` (parameters, states, tensor addresses it was captured
with): a later step that finds the same plan replays at once, with no per-parameter host work
beyond the constants, which is what keeps hook mode off the critical path of a host-bound backward.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch

from .bucket_update import BucketArgs, Prepared
from .functional import effective_rank


def graph_key(args: BucketArgs, consts: torch.Tensor, gate: torch.Tensor) -> tuple:
    """Everything a captured graph depends on: structure and every input's address and shape
    (the gradients excepted: they are copied into the graph's own buffers)."""
    tensors = [*args.ws, *args.projs, *args.ms, *args.vs, *args.lims, *args.res, *args.bases, consts, gate]
    return args.spec, tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)


class BucketGraph:
    """One bucket's update captured once, replayed every step."""

    def __init__(self, fn: Any, args: BucketArgs, grad_bufs: list[torch.Tensor], consts: torch.Tensor,
                 gate: torch.Tensor, pool: Any, side: torch.cuda.Stream) -> None:
        self.grads = grad_bufs
        # Held so the shared buffers outlive every graph that baked in their addresses.
        self.gate = gate
        self.consts = consts
        self.plan: Plan | None = None  # set after each general-path run (CompiledBuckets.update)
        args = dataclasses.replace(args, grads=grad_bufs)
        device = consts.device
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # Warm-up on the capture stream with a private False gate: nothing changes.
            args.call(fn, consts, torch.zeros_like(gate))
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            self.ok = args.call(fn, consts, gate)
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

    def capture(self, name: str, key: tuple, fn: Any, args: BucketArgs, consts: torch.Tensor,
                gate: torch.Tensor) -> BucketGraph:
        device = consts.device
        sig = tuple((tuple(g.shape), g.dtype, str(g.device)) for g in args.grads)
        bufs = self.grad_bufs.get(sig)
        if bufs is None:
            bufs = self.grad_bufs[sig] = [torch.empty_like(g, memory_format=torch.contiguous_format)
                                          for g in args.grads]
        pool = self.pools.get(device)
        if pool is None:
            pool = self.pools[device] = torch.cuda.graph_pool_handle()
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = torch.cuda.Stream(device=device)
        graph = BucketGraph(fn, args, bufs, consts, gate, pool, side)
        self.graphs[name] = (key, graph)
        return graph

class Plan:
    """What a bucket's graph was captured with and the step it is at: a flush replays it only
    while all of it still holds (same parameters in the same order, at the same addresses, same
    state tensors, same structural hyperparameters, every parameter at the bucket's step)."""

    __slots__ = ("params", "states", "ptrs", "tensors", "groups", "group_ids", "distinct", "structure",
                 "projs", "ranks", "gate", "device", "step", "next_refresh", "gaps")

    @classmethod
    def of(cls, prepared: list[Prepared], gate: torch.Tensor) -> "Plan | None":
        steps = {it.step for it in prepared}
        if len(steps) != 1:
            return None  # parameters at different steps: the general path handles it
        plan = cls()
        plan.params = [it.param for it in prepared]
        plan.states = [it.state for it in prepared]
        plan.ptrs = [_where(p) for p in plan.params]
        plan.tensors = _state_tensors(plan.states)
        plan.groups = [it.group for it in prepared]
        plan.group_ids = tuple(id(g) for g in plan.groups)
        plan.distinct = list({id(g): g for g in plan.groups}.values())
        plan.structure = [_structure(g) for g in plan.distinct]
        plan.projs = [it.proj for it in prepared]
        plan.ranks = [None if it.proj is None else effective_rank(it.param.shape, it.group["rank"])
                      for it in prepared]
        plan.gaps = [it.group["update_proj_gap"] for it in prepared if it.proj is not None]
        plan.gate = gate
        plan.device = gate.device
        plan.step = steps.pop()
        plan.next_refresh = plan.refresh_after(plan.step)
        return plan

    def refresh_after(self, step: int) -> int:
        """The first step after `step` that starts a new projection period of some item."""
        return min(((step - 1) // gap + 1) * gap + 1 for gap in self.gaps) if self.gaps else 1 << 62

    def matches(self, items: list[tuple], state: Any) -> bool:
        """`items` ((group, param, grad) in order) can replay this plan: nothing it baked in moved."""
        if len(items) != len(self.params):
            return False
        for (group, p, _), q, st, g in zip(items, self.params, self.states, self.groups):
            if p is not q or group is not g or st["step"] != self.step or state.get(p) is not st:
                return False
        if [_structure(g) for g in self.distinct] != self.structure:
            return False
        if [_where(p) for p in self.params] != self.ptrs:
            return False
        current = _state_tensors(self.states)
        return len(current) == len(self.tensors) and all(map(operator.is_, current, self.tensors))


def _state_tensors(states: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The state tensors a captured graph reads, in bucket_update's argument order."""
    return ([st["exp_avg"] for st in states] + [st["exp_avg_sq"] for st in states]
            + [st["limiter_norm"] for st in states if "limiter_norm" in st]
            + [st["residual"] for st in states if "residual" in st])


def _where(t: torch.Tensor) -> tuple:
    """Address and layout: what a captured graph baked in about a weight."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def _structure(group: dict[str, Any]) -> tuple:
    """Group settings baked into a captured graph or its plan (not in the per-step constants)."""
    return (group["scale"], group["rounding"], group["seed"], group["update_proj_gap"])
