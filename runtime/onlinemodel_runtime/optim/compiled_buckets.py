"""The compiled bucket update and its CUDA-graph replay: Apollo's hot path on CUDA (a component of
apollo.Apollo).

First flush of a bucket: one compiled call (bucket_update.COMPILED). Second flush with the same
inputs: captured as a CUDA graph (graphs.py) together with a `Plan` of what it was captured with.
Every later hook-mode flush that matches the plan replays it after three cheap host steps:
per-step constants (uploaded once per step into a buffer all graphs share), a projection refresh
when a period ends (written into the same tensor), and the step counters (returned to the
optimizer, which owns them). Anything that does not match falls back to the general path, which
re-keys and, if needed, recaptures.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .bucket_update import COMPILED, BucketArgs, ConstBuffers, Prepared
from .functional import const_row
from .gate import StepGate
from .graphs import BucketGraph, GraphCache, Plan, graph_key
from .projections import Projections
from .streams import SideStreams


@dataclass(frozen=True)
class Replayed:
    """A planned replay: the bucket's parameters, their state dicts, the 0-dim applied flag and
    the step their counters must now hold."""

    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    applied: torch.Tensor
    step: int


class CompiledBuckets:
    """fused=None: compiled on CUDA, eager elsewhere; True: compiled on every device (errors
    raise); False: never. cuda_graphs: capture and replay buckets of several parameters."""

    def __init__(self, streams: SideStreams, consts: ConstBuffers, fused: bool | None = None,
                 cuda_graphs: bool = True) -> None:
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (None, True or False)")
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"Invalid cuda_graphs: {cuda_graphs!r} (a bool)")
        self.fused = fused
        self.cuda_graphs = cuda_graphs
        self._streams = streams
        self._consts = consts
        self._graphs = GraphCache()

    def applies(self, p: torch.Tensor) -> bool:
        return COMPILED.ok and (self.fused is True or (self.fused is None and p.is_cuda))

    def captured(self) -> dict[str, BucketGraph]:
        """Bucket name -> its captured graph (a read-only view for tests and benchmarks)."""
        return {name: graph for name, (_, graph) in self._graphs.graphs.items()}

    def clear(self) -> None:
        """Drop every graph: they read state tensors that load_state_dict replaces."""
        self._graphs.clear()

    # ------------------------------------------------------------------ general path
    def update(self, name: str, prepared: list[Prepared], args: BucketArgs, consts: torch.Tensor,
               gate: torch.Tensor) -> torch.Tensor | None:
        """One compiled call (or graph replay) for the whole bucket; writes the bucket's applied
        flag into `gate` and returns it; None if compilation is unavailable here."""
        if gate.is_cuda and self.cuda_graphs and len(prepared) > 1 and not self._graphs.failed:
            ok = self._run_graph(name, prepared, args, consts, gate)
            if ok is not None:
                return ok
        self._streams.await_producer()
        self._streams.mark_used(args.grads)
        try:
            ok = args.call(COMPILED.get(), consts, gate)
        except Exception as exc:  # noqa: BLE001 - no working compiler: use the eager path
            if self.fused is True:
                raise
            warnings.warn(f"Apollo: compiled update unavailable ({exc!r}); using eager torch ops")
            COMPILED.ok = False
            return None
        gate.copy_(ok)
        return ok

    def _run_graph(self, name, prepared, args, consts, gate) -> torch.Tensor | None:
        """Replay (or capture, on a bucket's second flush) its CUDA graph; None: run uncaptured."""
        key = graph_key(args, consts, gate)
        graph = self._graphs.lookup(name, key)
        if graph is None:
            return None
        if graph is True:
            try:
                graph = self._graphs.capture(name, key, COMPILED.get(), args, consts, gate)
            except Exception as exc:  # noqa: BLE001 - capture unsupported here: no graphs
                warnings.warn(f"Apollo: CUDA graph capture failed ({exc!r}); replaying none")
                self._graphs.failed = True
                self._graphs.clear()
                return None
        graph.plan = Plan.of(prepared, gate)
        return graph.run(args.grads, self._streams.for_capture(gate.device))

    # ------------------------------------------------------------------ planned replay
    def replay_planned(self, name: str, items: list[tuple], state: Any, gate: StepGate,
                       projections: Projections, names: dict[torch.Tensor, str]) -> Replayed | None:
        """Hook mode: replay the bucket's graph if `items` ((group, param, grad) in order) match
        its plan; None, with nothing changed, sends the bucket down the general path."""
        graph = self._graphs.planned(name)
        plan = graph.plan if graph is not None else None
        if (plan is None or not self.cuda_graphs or not self.applies(plan.params[0])
                or not plan.matches(items, state)):
            return None
        device = plan.device
        if gate.last_device is not None and gate.last_device != device:
            return None  # the step's verdict is on another device: the general path carries it
        if gate.for_device(device) is not plan.gate:
            return None
        streams = self._streams.for_replay(device)
        step = plan.step + 1
        if step >= plan.next_refresh and not self._refresh_projections(name, plan, items, step,
                                                                       projections, names):
            return None
        key = (plan.group_ids, step, self._consts.serial)
        if not self._consts.holds(device, len(plan.groups), key):
            self._consts.load([const_row(g, step) for g in plan.groups], device, key)
        try:
            ok = graph.run([it[2] for it in items], streams, waited=True)
        except BaseException:
            self._graphs.drop(name)
            raise
        plan.step = step
        return Replayed(plan.params, plan.states, ok, step)

    def _refresh_projections(self, name, plan, items, step, projections, names) -> bool:
        """A projection period ended: new values into the same tensors the graph reads."""
        for i, (group, p, _) in enumerate(items):
            proj = plan.projs[i]
            if proj is None:
                continue
            new = projections.get(p, names[p], group["seed"], group["update_proj_gap"], step,
                                  plan.ranks[i])
            if new is not proj:
                self._graphs.drop(name)
                return False
        plan.next_refresh = plan.refresh_after(step)
        return True
