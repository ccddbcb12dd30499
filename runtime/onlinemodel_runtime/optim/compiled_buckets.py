"""The compiled bucket update and its CUDA-graph replay: Apollo's hot path on CUDA (a mixin of
apollo.Apollo).

First flush of a bucket: one compiled call (compiled.py). Second flush with the same inputs:
captured as a CUDA graph (graphs.py) together with a plan of what it was captured with. Every later
flush that matches the plan replays it after three cheap host steps: per-step constants (uploaded
once per step into a buffer all graphs share), a projection refresh when a period ends (written into
the same tensor), and the step counters. Anything that does not match falls back to the general
path, which re-keys and, if needed, recaptures.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch

from .compiled import COMPILED, CONST_COLS, const_row
from .graphs import graph_key


class CompiledBuckets:
    """The compiled half of Apollo; uses its state (_graphs, _projection, _producer, ...)."""

    def _compiled_path(self, p: torch.Tensor) -> bool:
        return COMPILED.ok and (self.fused is True or (self.fused is None and p.is_cuda))

    def _load_consts(self, rows: list[list[float]], device: torch.device, key: Any = None) -> torch.Tensor:
        """`consts` for these rows in a per-(device, row count) buffer that every compiled call and
        graph reads. Re-uploaded only when the rows change: in a normal step every decoder layer has
        the same rows (same step and hyperparameters), so once per step. Writes and reads are
        ordered by the streams' events (see graphs.BucketGraph.run). `key`: what identifies
        these rows (default: the rows themselves)."""
        slot = (device, len(rows))
        buf, loaded = self._const_bufs.get(slot, (None, None))
        if key is None:
            key = tuple(map(tuple, rows))
        if buf is None:
            buf = torch.empty((len(rows), CONST_COLS), dtype=torch.float32, device=device)
        if loaded != key:
            src = torch.tensor(rows, dtype=torch.float32)
            if device.type == "cuda":  # pinned + non_blocking: a pageable copy would sync
                buf.copy_(src.pin_memory(), non_blocking=True)
            else:
                buf.copy_(src)
            self._const_bufs[slot] = (buf, key)
        return buf

    def _update_bucket_compiled(self, prepared: list[tuple], gate: torch.Tensor) -> torch.Tensor | None:
        """One compiled graph for the whole bucket (compiled.py); None if compilation is
        unavailable here. Writes the bucket's applied flag into `gate`."""
        spec, ws, grads, projs, ms, vs, lims, rows = [], [], [], [], [], [], [], []
        for group, p, grad, st, step, proj in prepared:
            apollo = proj is not None
            spec.append((apollo, apollo and p.shape[0] <= p.shape[1], group["scale"] == "channel",
                         group["stochastic_rounding"]))
            rows.append(const_row(group, step))
            ws.append(p.data)
            grads.append(grad)
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            if apollo:
                projs.append(proj)
                lims.append(st["limiter_norm"])
        consts = self._load_consts(rows, gate.device)
        spec = tuple(spec)
        if gate.is_cuda and self._use_graphs and len(prepared) > 1 and not self._graphs.failed:
            ok = self._update_bucket_graph(prepared, spec, ws, grads, projs, ms, vs, lims, consts, gate)
            if ok is not None:
                return ok
        self._await_producer()
        self._mark_grads_used_here(grads)
        try:
            ok = COMPILED.get()(spec, ws, grads, projs, ms, vs, lims, consts, gate)
        except Exception as exc:  # noqa: BLE001 - no working compiler: use the eager path
            if self.fused is True:
                raise
            warnings.warn(f"Apollo: compiled update unavailable ({exc!r}); using eager torch ops")
            COMPILED.ok = False
            return None
        gate.copy_(ok)
        return ok

    def _update_bucket_graph(self, prepared, spec, ws, grads, projs, ms, vs, lims, consts,
                             gate) -> torch.Tensor | None:
        """Replay (or capture, on a bucket's second flush) its CUDA graph; None: run uncaptured.
        Runs with the side stream current when hook mode uses one (self._producer is set)."""
        name = self._bucket_of[prepared[0][1]]
        key = graph_key(spec, [ws, projs, ms, vs, lims, [consts, gate]])
        graph = self._graphs.lookup(name, key)
        if graph is None:
            return None
        if graph is True:
            try:
                graph = self._graphs.capture(name, key, COMPILED.get(), spec, ws, grads, projs, ms,
                                             vs, lims, consts, gate)
            except Exception as exc:  # noqa: BLE001 - capture unsupported here: no graphs
                warnings.warn(f"Apollo: CUDA graph capture failed ({exc!r}); replaying none")
                self._graphs.failed = True
                self._graphs.clear()
                return None
        graph.plan = Plan.of(prepared, ws, ms, vs, lims, gate)
        streams = None
        if self._producer is not None:
            side = torch.cuda.current_stream(gate.device)
            streams = (self._producer, side, self._events(gate.device), side)
        return graph.run(grads, streams)

    def _events(self, device: torch.device) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """(side stream's last replay done, main stream's gradient copy done), reused every bucket."""
        evs = self._stream_events.get(device)
        if evs is None:
            evs = self._stream_events[device] = (torch.cuda.Event(), torch.cuda.Event())
        return evs

    def _flush_planned(self, items: list[tuple]) -> bool:
        """Hook mode: replay the bucket's graph if `items` match its plan (then True); False, with
        nothing changed, sends the bucket down the general path."""
        graph = self._graphs.planned(self._bucket_of[items[0][1]])
        plan = graph.plan if graph is not None else None
        if (plan is None or not self._use_graphs or not self._compiled_path(plan.params[0])
                or not plan.matches(items, self.state)):
            return False
        device = plan.device
        if self._gate_last is not None and self._gate_last != device:
            return False  # the step's verdict is on another device: general path carries it over
        gate = self._gate_for(device)
        if gate is not plan.gate:
            return False
        streams = None
        if self._use_side_stream:
            side = self._side_stream_of(device)
            main = torch.cuda.current_stream(device)
            evs = self._events(device)
            main.wait_event(evs[0])  # earlier replays are done with the shared buffers
            streams = (main, side, evs, main)
        step = plan.step + 1
        if step >= plan.next_refresh and not self._refresh_projections(plan, items, step):
            return False
        self._load_plan_consts(plan, step)
        try:
            ok = graph.run([it[2] for it in items], streams, waited=True)
        except BaseException:
            self._graphs.drop(self._bucket_of[plan.params[0]])
            raise
        for st in plan.states:
            st["step"] = step
        plan.step = step
        self._flags.append((plan.params, ok))
        return True

    def _refresh_projections(self, plan: "Plan", items: list[tuple], step: int) -> bool:
        """A projection period ended: new values into the same tensors the graph reads."""
        for i, (group, p, _) in enumerate(items):
            proj = plan.projs[i]
            if proj is not None and self._projection(group, p, step, plan.ranks[i]) is not proj:
                self._graphs.drop(self._bucket_of[p])
                return False
        plan.next_refresh = plan.refresh_after(step)
        return True

    def _load_plan_consts(self, plan: "Plan", step: int) -> None:
        """This bucket's constant rows, computed and uploaded only when the shared buffer holds
        other ones: once per training step for all buckets with the same groups (the key holds the
        step serial: hyperparameters may change between steps, not within one)."""
        key = (plan.group_ids, step, self._step_serial)
        if self._const_bufs.get((plan.device, len(plan.groups)), (None, None))[1] != key:
            self._load_consts([const_row(g, step) for g in plan.groups], plan.device, key)


class Plan:
    """What a bucket's graph was captured with and the step it is at: _flush_planned replays only
    while all of it still holds (same parameters in the same order, at the same addresses, same
    state tensors, same structural hyperparameters, every parameter at the bucket's step)."""

    __slots__ = ("params", "states", "ptrs", "tensors", "groups", "group_ids", "distinct", "structure",
                 "projs", "ranks", "gate", "device", "step", "next_refresh", "gaps")

    @classmethod
    def of(cls, prepared: list[tuple], ws, ms, vs, lims, gate) -> "Plan | None":
        steps = {it[4] for it in prepared}
        if len(steps) != 1:
            return None  # parameters at different steps: the general path handles it
        plan = cls()
        plan.params = [it[1] for it in prepared]
        plan.states = [it[3] for it in prepared]
        plan.ptrs = [_where(w) for w in ws]
        plan.tensors = ms + vs + lims
        plan.groups = [it[0] for it in prepared]
        plan.group_ids = tuple(id(g) for g in plan.groups)
        plan.distinct = list({id(g): g for g in plan.groups}.values())
        plan.structure = [_structure(g) for g in plan.distinct]
        plan.projs = [it[5] for it in prepared]
        plan.ranks = [None if it[5] is None else min(it[3]["exp_avg"].shape) for it in prepared]
        plan.gaps = [g["update_proj_gap"] for g, proj in zip(plan.groups, plan.projs) if proj is not None]
        plan.gate = gate
        plan.device = gate.device
        plan.step = steps.pop()
        plan.next_refresh = plan.refresh_after(plan.step)
        return plan

    def refresh_after(self, step: int) -> int:
        """The first step after `step` that starts a new projection period of some item."""
        return min(((step - 1) // gap + 1) * gap + 1 for gap in self.gaps) if self.gaps else 1 << 62

    def matches(self, items: list[tuple], state: Any) -> bool:
        if len(items) != len(self.params):
            return False
        for (group, p, _), q, st, g in zip(items, self.params, self.states, self.groups):
            if p is not q or group is not g or st["step"] != self.step or state.get(p) is not st:
                return False
        if [_structure(g) for g in self.distinct] != self.structure:
            return False
        if [_where(p) for p in self.params] != self.ptrs:
            return False
        current = []
        for st in self.states:
            current.append(st["exp_avg"])
        for st in self.states:
            current.append(st["exp_avg_sq"])
        for st in self.states:
            if "limiter_norm" in st:
                current.append(st["limiter_norm"])
        return len(current) == len(self.tensors) and all(map(operator.is_, current, self.tensors))


def _where(t: torch.Tensor) -> tuple:
    """Address and layout: what a captured graph baked in about a weight."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def _structure(group: dict[str, Any]) -> tuple:
    """Group settings baked into a captured graph or its plan (not in the per-step constants)."""
    return (group["scale"], group["stochastic_rounding"], group["seed"], group["update_proj_gap"])
