"""APOLLO-Mini / APOLLO as a torch.optim.Optimizer that updates bf16 weights in place.

Two ways to drive it:
- `step()` (torch.optim contract): gradients of the whole model exist; a step whose gradients are
  not all finite is skipped before anything is written.
- hook mode: `attach_to_backward()` once, then per step `backward_step(loss)` (or `begin_step()`,
  `loss.backward()`, `finish_step()`). Parameters are updated in buckets (one decoder layer each)
  as soon as the bucket's gradients are complete, and the gradients are dropped: at most one
  layer's gradients are held, no full-model gradient buffer exists. On CUDA a bucket's update is
  one compiled graph replayed as a CUDA graph on a side stream that overlaps backward
  (compiled_buckets.py, graphs.py).
See docs/optimizer.md for the guarantees of each mode.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .compiled_buckets import CompiledBuckets
from .graphs import GraphCache
from .functional import (
    adamw_direction,
    apollo_direction,
    grad_norm,
    param_seed,
    projected_shape,
    projection_matrix,
    projection_seed,
)
from .hook_mode import HookMode, Item
from .hyperparams import DEFAULT_LR, MINI_ALPHA, StepReport, check_group
from .rounding import apply_update_
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")


def bucket_key(name: str | None, index: int) -> str:
    """Hook mode updates parameters in buckets: all parameters of one decoder layer
    ("model.layers.7.*") form one; any other parameter is a bucket of its own."""
    if name is None:
        return f"#{index}"
    match = _LAYER.match(name)
    return match.group(1) if match else name


class Apollo(HookMode, CompiledBuckets, torch.optim.Optimizer):
    """APOLLO for 2-D weights (rank 1 + tensor scale = APOLLO-Mini), dense AdamW for the rest.

    params: `model.named_parameters()` (or a filtered list of (name, param), or groups with
    "params" and "param_names"): names seed each matrix's projection. Parameters that are not
    2-D, and groups with algorithm="adamw", get dense AdamW with float32 moments.
    scale/alpha default by rank: rank 1 -> "tensor", sqrt(128) (APOLLO-Mini); else "channel", 1.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 1,
        scale: str | None = None,
        alpha: float | None = None,
        update_proj_gap: int = 200,
        norm_growth_limit: float = 1.01,
        stochastic_rounding: bool = True,
        algorithm: str = "apollo",
        seed: int = 0,
        fused: bool | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (an int >= 1)")
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, rank=rank,
            scale=scale if scale is not None else ("tensor" if rank == 1 else "channel"),
            alpha=alpha if alpha is not None else (MINI_ALPHA if rank == 1 else 1.0),
            update_proj_gap=update_proj_gap, norm_growth_limit=norm_growth_limit,
            stochastic_rounding=stochastic_rounding, algorithm=algorithm, seed=seed,
        )
        check_group(dict(defaults))
        # fused=None: one compiled graph per parameter update on CUDA (compiled.py), eager on CPU;
        # True: compiled everywhere (errors raise); False: eager torch ops everywhere.
        self.fused = fused
        self.skipped_steps = 0
        self.steps_applied = 0
        self.last_report: StepReport | None = None
        self._names: dict[torch.Tensor, str] = {}
        self._proj_gens: dict[torch.device, torch.Generator] = {}
        self._sr_gens: dict[str, torch.Generator] = {}
        self._hooked: dict[torch.Tensor, Any] = {}  # parameter -> its hook handle (hook mode)
        self._attached = False
        self._hook_lock = threading.Lock()
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._armed = False
        # One bool per device, True until a bucket of the step is not applied; every later bucket
        # of the step reads it (all on the device, no host round trip). _gate_last: the device
        # whose flag holds the step's verdict so far.
        self._gate_bufs: dict[torch.device, torch.Tensor] = {}
        self._gate_last: torch.device | None = None
        self._flags: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (bucket's params, applied)
        self._order: dict[torch.Tensor, int] = {}  # position among all managed parameters
        self._bucket_of: dict[torch.Tensor, str] = {}
        self._bucket_size: dict[str, int] = {}
        self._pending: list[Item] = []  # gradients of the bucket being filled (hook mode)
        self._pending_key: str | None = None
        self._graphs = GraphCache()
        self._use_graphs = True  # CUDA-graph replay of multi-parameter buckets (compiled path)
        self._use_side_stream = True  # hook mode on CUDA: bucket updates overlap backward
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._side_synced: set[torch.device] = set()  # side streams that waited this step
        self._proj_cache: dict[torch.Tensor, tuple[tuple[int, int], torch.Tensor]] = {}
        self._seeds: dict[tuple[str, int], int] = {}  # param_seed(name, base seed), hashed once
        self._const_bufs: dict[tuple, tuple[torch.Tensor, Any]] = {}  # (buffer, rows loaded)
        self._step_serial = 0  # counts steps begun: hyperparameters may change between steps
        self._stream_events: dict[torch.device, tuple] = {}  # hook mode's side stream handshake
        self._producer: torch.cuda.Stream | None = None  # the stream gradients come from (hook mode)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and names
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        check_group(group)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"Apollo supports float32 and bfloat16 parameters, got {p.dtype}")
            if self._uses_apollo(group, p):
                if names is None:
                    raise ValueError(
                        "Apollo derives each matrix's projection seed from its name: pass "
                        "model.named_parameters() (or (name, param) pairs), not bare parameters"
                    )
            if names is not None:
                self._names[p] = names[i]
            self._group_of[p] = group
            self._order[p] = len(self._order)
            self._bucket_of[p] = bucket_key(names[i] if names is not None else None, self._order[p])
        if self._attached:
            self._hook_params(group["params"])

    @staticmethod
    def _uses_apollo(group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["algorithm"] == "apollo" and p.dim() == 2

    # ------------------------------------------------------------------ per-parameter update
    def _proj_gen(self, device: torch.device) -> torch.Generator:
        gen = self._proj_gens.get(device)
        if gen is None:
            gen = self._proj_gens[device] = torch.Generator(device=device)
        return gen

    def _sr_gen(self, device: torch.device, seed: int) -> torch.Generator:
        key = str(device)
        gen = self._sr_gens.get(key)
        if gen is None:
            gen = self._sr_gens[key] = torch.Generator(device=device)
            gen.manual_seed(param_seed(f"stochastic-rounding:{key}", seed))
        return gen

    def _projection(self, group: dict[str, Any], p: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """The projection in force at `step`, regenerated from its seed when the period changes.
        Kept between steps in a small cache (r * min(m, n) floats, never in state_dict) so a step
        costs no RNG launches."""
        # Keyed by (base seed, period): the two sha256 hashes run once per projection period.
        tag = (group["seed"], (step - 1) // group["update_proj_gap"])
        hit = self._proj_cache.get(p)
        if hit is not None and hit[0] == tag and hit[1].device == p.device and hit[1].shape[0] == rank:
            return hit[1]
        name_key = (self._names[p], group["seed"])
        base = self._seeds.get(name_key)
        if base is None:
            base = self._seeds[name_key] = param_seed(*name_key)
        seed = projection_seed(base, step, group["update_proj_gap"])
        proj = projection_matrix(tuple(p.shape), rank, seed, device=p.device,
                                 generator=self._proj_gen(p.device))
        if hit is not None and hit[1].device == p.device and hit[1].shape == proj.shape:
            proj = hit[1].copy_(proj)  # same address: a captured CUDA graph reads the new values
        self._proj_cache[p] = (tag, proj)
        return proj

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = 0
            if self._uses_apollo(group, p):
                rank = min(group["rank"], *p.shape)
                shape = projected_shape(tuple(p.shape), rank)
                st["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                st["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                st["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return st

    @torch.no_grad()
    def _update_bucket(self, items: list[Item], gate: torch.Tensor) -> torch.Tensor:
        """Update the parameters of one bucket (same device) from their gradients, all or none:
        committed only where `gate` and every item's gradient and update are finite. Never syncs
        with the device. Returns the 0-dim bool 'applied' flag of the whole bucket and writes it
        into `gate` (the device's step gate, see _gate_for)."""
        prepared = []
        for group, p, grad in items:
            st = self._init_state(group, p)
            step = st["step"] + 1
            proj = None
            if self._uses_apollo(group, p):
                proj = self._projection(group, p, step, min(st["exp_avg"].shape))
            prepared.append((group, p, grad, st, step, proj))
        ok = None
        if self._compiled_path(items[0][1]):
            ok = self._update_bucket_compiled(prepared, gate)
        if ok is None:
            ok = self._update_bucket_eager(prepared, gate)
        for _, _, _, st, step, _ in prepared:
            st["step"] = step  # rolled back in _settle() if `ok` turns out false
        return ok

    def _update_bucket_eager(self, prepared: list[tuple], gate: torch.Tensor) -> torch.Tensor:
        """Torch ops, two phases: every item's new values first, then one commit flag for all."""
        self._await_producer()
        self._mark_grads_used_here([it[2] for it in prepared])
        results = []
        for group, p, grad, st, step, proj in prepared:
            beta1, beta2 = group["betas"]
            if proj is not None:
                d = apollo_direction(
                    grad, proj, st["exp_avg"], st["exp_avg_sq"], st["limiter_norm"], step,
                    beta1=beta1, beta2=beta2, eps=group["eps"], alpha=group["alpha"],
                    scale_kind=group["scale"], norm_growth_limit=group["norm_growth_limit"],
                )
                results.append((d.exp_avg, d.exp_avg_sq, grad, d.scale * (-group["lr"]),
                                d.update_norm, d.ok))
            else:
                m, v, direction, ok_d = adamw_direction(
                    grad, st["exp_avg"], st["exp_avg_sq"], step, beta1=beta1, beta2=beta2,
                    eps=group["eps"])
                coeff = torch.full((), -group["lr"], dtype=torch.float32, device=p.device)
                results.append((m, v, direction, coeff, None, ok_d))
        ok = gate & torch.stack([r[5] for r in results]).all()
        for (group, p, _, st, _, _), (m, v, direction, coeff, update_norm, _) in zip(prepared, results):
            if update_norm is not None:
                st["limiter_norm"].copy_(torch.where(ok, update_norm, st["limiter_norm"]))
            st["exp_avg"].copy_(torch.where(ok, m, st["exp_avg"]))
            st["exp_avg_sq"].copy_(torch.where(ok, v, st["exp_avg_sq"]))
            apply_update_(p.data, direction, coeff, decay=1.0 - group["lr"] * group["weight_decay"],
                          ok=ok, stochastic=group["stochastic_rounding"],
                          generator=self._sr_gen(p.device, group["seed"]))
        gate.copy_(ok)
        return ok

    def _gate_for(self, device: torch.device) -> torch.Tensor:
        """The step gate of `device`: a persistent 0-dim bool (so captured graphs read and write it
        in place). Set True at the start of each step (_new_step); when the step moves to
        another device, the verdict so far is carried over."""
        buf = self._gate_bufs.get(device)
        if buf is None:
            buf = self._gate_bufs[device] = torch.ones((), dtype=torch.bool, device=device)
        last = self._gate_last
        if last is not None and last != device:
            # A cross-device copy runs on the source's current stream: order it after the
            # source's side-stream updates, which wrote the flag.
            side = self._side_streams.get(last)
            if side is not None:
                torch.cuda.current_stream(last).wait_stream(side)
            buf.copy_(self._gate_bufs[last])
        self._gate_last = device
        return buf

    def _new_step(self) -> None:
        """Start of a step (step() or begin_step()), on the current stream (bucket updates are
        ordered after it): gates set True, a new serial for the per-step constants."""
        self._step_serial += 1
        for buf in self._gate_bufs.values():
            buf.fill_(True)
        self._gate_last = None

    def _settle(self, flags: list[tuple[list[torch.Tensor], torch.Tensor]]) -> tuple[int, int]:
        """One host sync per step: read every bucket's applied flag, roll back step counters of
        parameters whose update was gated off (their moments and weights were left as they were).
        Returns (parameters updated, parameters with a gradient)."""
        if not flags:
            return 0, 0
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, f) in enumerate(flags):
            by_device.setdefault(f.device, []).append(i)
        values = [False] * len(flags)
        for idx in by_device.values():  # one transfer per device
            for i, v in zip(idx, torch.stack([flags[i][1] for i in idx]).tolist()):
                values[i] = v
        applied = total = 0
        for (params, _), ok in zip(flags, values):
            total += len(params)
            if ok:
                applied += len(params)
            else:
                for p in params:
                    self.state[p]["step"] -= 1
        return applied, total

    def _record(self, applied: int, total: int, reason: str | None) -> StepReport:
        skipped = reason is not None or applied < total
        if skipped:
            self.skipped_steps += 1
            reason = reason or "non-finite gradient or update"
        else:
            self.steps_applied += 1
        report = StepReport(applied=not skipped, skipped=skipped, reason=reason,
                            step=self.steps_applied, params_updated=applied, params_total=total,
                            partial=skipped and applied > 0)
        self.last_report = report
        return report

    # ------------------------------------------------------------------ plain step()
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """torch.optim step: returns the closure's loss; the StepReport is in `last_report`.
        If any gradient is not finite, nothing (weights, moments, counters) changes."""
        if self._armed:
            raise RuntimeError("step() called between begin_step() and finish_step() (hook mode)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not work:
            self._record(0, 0, None)
            return loss
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, p in work:
            by_device.setdefault(p.grad.device, []).append(
                grad_norm(p.grad))
        if not all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in by_device.values()):
            self._record(0, len(work), "non-finite gradient")
            return loss
        buckets: dict[tuple[str, torch.device], list[Item]] = {}
        for group, p in work:
            buckets.setdefault((self._bucket_of[p], p.device), []).append((group, p, p.grad))
        flags = []
        self._new_step()
        for (_, device), items in buckets.items():
            ok = self._update_bucket(items, self._gate_for(device))
            flags.append(([p for _, p, _ in items], ok))
        applied, total = self._settle(flags)
        self._record(applied, total, None)
        return loss

    # ------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        """Plain-JSON description for /train/status's "optimizer" field."""
        g = self.param_groups[0]
        return {"name": "apollo", "rank": g["rank"], "scale": g["scale"], "alpha": g["alpha"],
                "lr": g["lr"], "stochastic_rounding": g["stochastic_rounding"],
                "groups": [{"algorithm": x["algorithm"], "params": len(x["params"])} for x in self.param_groups],
                "trained_params": sum(p.numel() for x in self.param_groups for p in x["params"]),
                "state_bytes": self.state_bytes(), "steps_applied": self.steps_applied,
                "skipped_steps": self.skipped_steps}

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for st in self.state.values()
                   for v in st.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rng"] = {k: g.get_state() for k, g in self._sr_gens.items()}
        sd["counters"] = {"skipped_steps": self.skipped_steps, "steps_applied": self.steps_applied}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict(). Tensors go to each parameter's device and keep their float32
        dtype (torch's default loader would cast moments to a bf16 parameter's dtype)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_map: dict[int, torch.Tensor] = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("loaded state dict contains a group that doesn't match the size of optimizer's group")
            if "param_names" in saved and "param_names" in group and saved["param_names"] != group["param_names"]:
                raise ValueError("loaded state dict names its parameters differently from this optimizer")
            id_map.update(zip(saved["params"], group["params"]))
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            ng = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            ng["betas"] = tuple(ng["betas"])
            ng["params"] = group["params"]
            if "param_names" in group:
                ng["param_names"] = group["param_names"]
            check_group(ng)
            new_groups.append(ng)
        state: dict[torch.Tensor, dict[str, Any]] = {}
        for pid, st in state_dict["state"].items():
            p = id_map[pid]
            state[p] = {k: (v.to(device=p.device) if isinstance(v, torch.Tensor) else v)
                        for k, v in st.items()}
        self.param_groups = new_groups
        for group in new_groups:
            for p in group["params"]:
                self._group_of[p] = group
        self._graphs.clear()  # they read the state tensors being replaced
        self.state.clear()
        self.state.update(state)
        for key, gen_state in state_dict.get("rng", {}).items():
            device = torch.device(key)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # CUDA rounding stream saved, resumed on CPU: nothing to restore
            self._sr_gen(device, new_groups[0]["seed"]).set_state(gen_state)
        counters = state_dict.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.steps_applied = int(counters.get("steps_applied", 0))
