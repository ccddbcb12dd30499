"""APOLLO-Mini / APOLLO as a torch.optim.Optimizer that updates bf16 weights in place.

Two ways to drive it:
- `step()` (torch.optim contract): gradients of the whole model exist; a step whose gradients are
  not all finite is skipped before anything is written.
- hook mode: `attach_to_backward()` once, then per step `backward_step(loss)` (or `begin_step()`,
  `loss.backward()`, `finish_step()`). Parameters are updated in buckets (one decoder layer each)
  as soon as the bucket's gradients are complete, and the gradients are dropped: at most one
  layer's gradients are held, no full-model gradient buffer exists.

Apollo owns the parameters' registry (names, groups, buckets), `state` and the step counters, and
these components, each with its own state and tests: `BackwardHooks` (hooks.py, hook mode's
gradient collection), `StepGate` (gate.py, the device-side all-or-nothing verdict),
`Projections` (projections.py), `RoundingGenerators` (rounding.py), `ConstBuffers` and the one
bucket update (bucket_update.py), `CompiledBuckets` (compiled_buckets.py, the compiled call and
its CUDA-graph replay) and `SideStreams` (streams.py). See docs/optimizer.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .bucket_update import BucketArgs, ConstBuffers, Prepared, bucket_update, same_width
from .compiled_buckets import CompiledBuckets
from .functional import const_row, effective_rank, grad_norm, projected_shape, projects_left
from .gate import StepGate
from .hooks import BackwardHooks
from .hyperparams import DEFAULT_LR, StepReport, check_group, rank_defaults, upgrade_group
from .projections import Projections
from .rounding import DEFAULT_CHUNK_ELEMS, RoundingGenerators, needs_residual
from .streams import SideStreams
from .tensor_parallel import TensorParallel

Item = tuple[dict[str, Any], torch.Tensor, torch.Tensor]  # (group, param, gradient)
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")


def bucket_key(name: str | None, index: int) -> str:
    """Parameters are updated in buckets: all parameters of one decoder layer
    ("model.layers.7.*") form one; any other parameter is a bucket of its own."""
    if name is None:
        return f"#{index}"
    match = _LAYER.match(name)
    return match.group(1) if match else name


class Apollo(torch.optim.Optimizer):
    """APOLLO for 2-D weights (rank 1 + tensor scale = APOLLO-Mini), dense AdamW for the rest.

    params: `model.named_parameters()` (or a filtered list of (name, param), or groups with
    "params" and "param_names"): names seed each matrix's projection. A 3-D parameter (E, m, n)
    is a batch of E matrices (fused MoE experts): each gets its own projection, moments, scale and
    limiter, as if it were a parameter of its own (pass other 3-D parameters, e.g. convolution
    kernels, in an algorithm="adamw" group: `policy.py` does). Parameters of other shapes, and
    groups with algorithm="adamw", get dense AdamW with float32 moments.
    scale/alpha default by rank: rank 1 -> "tensor", sqrt(128) (APOLLO-Mini); else "channel", 1.
    norm_growth_limit=None: no limiter and no first-step cap (the authors' `disable_nl`).
    fused (None: compiled on CUDA, eager on CPU; True: compiled everywhere, errors raise; False:
    eager everywhere), cuda_graphs and side_stream choose how the same update runs, not what it
    computes; they are not hyperparameters and are not saved.
    tp: this rank's TensorParallel context (tensor_parallel.py) when the parameters are one tensor-
    parallel rank's pieces; every rank then computes TP=1's update of the whole tensors (eager path,
    one collective per bucket). None: TP=1.
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
        norm_growth_limit: float | None = 1.01,
        rounding: str = "stochastic",
        algorithm: str = "apollo",
        seed: int = 0,
        fused: bool | None = None,
        cuda_graphs: bool = True,
        side_stream: bool = True,
        tp: TensorParallel | None = None,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (an int >= 1)")
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, rank=rank,
            scale=scale if scale is not None else rank_defaults(rank)["scale"],
            alpha=alpha if alpha is not None else rank_defaults(rank)["alpha"],
            update_proj_gap=update_proj_gap, norm_growth_limit=norm_growth_limit,
            rounding=rounding, algorithm=algorithm, seed=seed,
        )
        check_group(dict(defaults))
        if tp is not None and fused:
            raise ValueError("fused=True: the compiled update does not run under tensor parallelism yet")
        self._tp = tp
        self.skipped_steps = 0
        self.steps_applied = 0
        self.last_report: StepReport | None = None
        self._names: dict[torch.Tensor, str] = {}
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._order: dict[torch.Tensor, int] = {}  # position among all managed parameters
        self._bucket_of: dict[torch.Tensor, str] = {}
        self._streams = SideStreams(side_stream)
        self._consts = ConstBuffers()
        self._compiled = CompiledBuckets(self._streams, self._consts, fused, cuda_graphs)
        self._gate = StepGate(self._streams)
        self._projections = Projections()
        self._rounding = RoundingGenerators()
        self._hooks = BackwardHooks(self._flush)
        self._kept_out: dict[torch.Tensor, torch.Tensor] = {}  # param -> basis its updates stay out of
        super().__init__(params, defaults)
        if tp is not None:
            keys = ("algorithm", "lr", "rank", "scale", "alpha", "betas", "eps", "weight_decay", "norm_growth_limit",
                    "update_proj_gap", "rounding", "seed")
            # Each bucket's collective pairs up across ranks: the same buckets, the same shared tensors.
            tp.check_same([sorted(set(self._bucket_of.values())),
                           [(self._names.get(p), tuple(p.shape), [g[k] for k in keys])
                            for g in self.param_groups for p in g["params"] if tp.shard(self._names.get(p))]])

    @property
    def fused(self) -> bool | None:
        return self._compiled.fused

    @property
    def tp(self) -> TensorParallel | None:
        """The tensor-parallel context (None at TP=1)."""
        return self._tp

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
            if self._uses_apollo(group, p) and names is None:
                raise ValueError(
                    "Apollo derives each matrix's projection seed from its name: pass "
                    "model.named_parameters() (or (name, param) pairs), not bare parameters"
                )
            if names is not None:
                self._names[p] = names[i]
            self._group_of[p] = group
            self._order[p] = len(self._order)
            self._bucket_of[p] = bucket_key(names[i] if names is not None else None, self._order[p])
        if self._hooks.attached:
            self._hooks.attach((p, self._bucket_of[p]) for p in group["params"])

    @staticmethod
    def _uses_apollo(group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["algorithm"] == "apollo" and p.dim() in (2, 3)

    # ------------------------------------------------------------------ updates kept out of input directions
    def scales_input_columns(self, p: torch.Tensor) -> bool:
        """Whether `p`'s update multiplies its gradient by a factor per input column or per element (APOLLO's
        channel scale of a matrix projected on the left, or AdamW): then a gradient with no component in some
        directions of the input space (G U = 0) gives an update that has one, and keep_out() is what keeps it
        out. A tensor scale, or a channel scale by output row, leaves G U = 0 as it is."""
        group = self._group_of.get(p)
        if group is None:
            raise ValueError("scales_input_columns: a parameter this optimizer does not update")
        if not self._uses_apollo(group, p):
            return True
        return group["scale"] == "channel" and projects_left(tuple(p.shape))

    def keep_out(self, bases: dict[torch.Tensor, torch.Tensor]) -> None:
        """From the next step on, each update of each `p` in `bases` is projected off the orthonormal columns of
        its basis U (in_features x k, on p's device), after every scale and coefficient: the applied change dW
        has dW U = 0 (in float32 weights; bf16 weights get the projected update rounded, and the rounding is not
        projected), so it changes nothing the matrix computes on inputs in U's span. Weight decay is not projected
        (it shrinks the whole weight); the norm-growth limiter's reference is the update's norm before the
        projection. Replaces any earlier bases; {}: none. Held (compiled: widened to one width per kind, same_width),
        not state (the caller rebuilds them). Checks that every basis is finite (one device sync)."""
        for p, u in bases.items():
            if p not in self._group_of:
                raise ValueError("keep_out: a parameter this optimizer does not update")
            if p.dim() != 2:
                raise ValueError(f"keep_out: only matrices, got a parameter of shape {tuple(p.shape)}")
            if u.dim() != 2 or u.shape[0] != p.shape[1] or u.shape[1] > p.shape[1]:
                raise ValueError(f"keep_out: a basis for a {tuple(p.shape)} matrix is ({p.shape[1]}, k), "
                                 f"got {tuple(u.shape)}")
            if u.device != p.device or u.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"keep_out: the basis must be float32 or bfloat16 on {p.device}, got {u.dtype} "
                                 f"on {u.device}")
            if not bool(torch.isfinite(u).all()):  # the step's all-or-nothing check sees the update before this
                raise ValueError("keep_out: a basis with a non-finite value")
        if bases and self._tp is not None:
            raise ValueError("keep_out: not under tensor parallelism (a rank holds a shard of each matrix)")
        self._kept_out = {**bases, **same_width({p: u for p, u in bases.items() if self._compiled.applies(p)})}
        self._compiled.clear()  # captured graphs baked in the bases they were captured with

    @property
    def kept_out_bytes(self) -> int:
        """The bytes of the bases keep_out holds, each tensor once (the widened copies and the bases as given)."""
        return sum(u.numel() * u.element_size() for u in {id(u): u for u in self._kept_out.values()}.values())

    # ------------------------------------------------------------------ one bucket
    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = 0
            apollo = self._uses_apollo(group, p)
            if self._tp is not None:
                shape = self._tp.moment_shape(self._names.get(p), p, group)
            elif apollo:
                shape = projected_shape(tuple(p.shape), effective_rank(p.shape, group["rank"]))
            else:
                shape = p.shape
            st["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            st["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            if apollo:  # one reference per matrix: () or (E,) for a batch of experts
                st["limiter_norm"] = torch.zeros(p.shape[:-2], dtype=torch.float32, device=p.device)
        if needs_residual(group["rounding"], p):
            if "residual" not in st:  # also when a group turns compensated later: nothing carried yet
                st["residual"] = torch.zeros(p.shape, dtype=torch.int16, device=p.device)
        else:
            st.pop("residual", None)  # what another way of rounding left: nothing to carry
        return st

    @torch.no_grad()
    def _update_bucket(self, name: str, items: list[Item], gate: torch.Tensor) -> torch.Tensor:
        """Update the parameters of one bucket (same device) from their gradients, all or none:
        committed only where `gate` and every item's gradient and update are finite. Never syncs
        with the device. Returns the bucket's 0-dim bool applied flag, also written into `gate`."""
        prepared = []
        for group, p, grad in items:
            st = self._init_state(group, p)
            step = st["step"] + 1
            proj = None
            if self._uses_apollo(group, p):
                shape = self._tp.projection_shape(self._names[p], p) if self._tp is not None else tuple(p.shape)
                proj = self._projections.get(p, self._names[p], group["seed"], group["update_proj_gap"],
                                             step, effective_rank(shape, group["rank"]), shape)
            prepared.append(Prepared(group, p, grad, st, step, proj, self._kept_out.get(p)))
        if self._tp is not None:
            consts = self._consts.load([const_row(it.group, it.step) for it in prepared], gate.device)
            ok = self._tp.update_bucket(prepared, self._names, consts, gate, self._rounding)
            for it in prepared:
                it.state["step"] = it.step
            return ok
        args = BucketArgs.of(prepared)
        consts = self._consts.load(args.rows, gate.device)
        ok = None
        if self._compiled.applies(items[0][1]):
            ok = self._compiled.update(name, prepared, args, consts, gate)
        if ok is None:
            self._streams.await_producer()
            self._streams.mark_used(args.grads)
            rng = self._rounding.get(gate.device, items[0][0]["seed"])
            ok = args.call(bucket_update, consts, gate, generator=rng, chunk_elems=DEFAULT_CHUNK_ELEMS)
            gate.copy_(ok)
        for it in prepared:
            it.state["step"] = it.step  # rolled back in _settle() if `ok` turns out false
        return ok

    def _new_step(self) -> None:
        """Start of a step (step() or begin_step()), on the current stream."""
        self._consts.new_step()
        self._gate.reset()
        self._streams.new_step()

    def _settle(self, reason: str | None) -> StepReport:
        """One host sync: roll back the step counters of parameters whose update was gated off
        (their moments and weights were left as they were), then report."""
        applied, gated_off = self._gate.settle()
        for p in gated_off:
            self.state[p]["step"] -= 1
        return self._report(applied, applied + len(gated_off), reason)

    def _report(self, applied: int, total: int, reason: str | None) -> StepReport:
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
        if self._hooks.armed:
            raise RuntimeError("step() called between begin_step() and finish_step() (hook mode)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, p in work:
            by_device.setdefault(p.grad.device, []).append(grad_norm(p.grad))
        finite = all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in by_device.values())
        if self._tp is not None:  # every rank skips, or none
            finite = self._tp.agree(finite, next(iter(by_device), torch.device("cpu")))
        if not finite:
            self._report(0, len(work), "non-finite gradient")
            return loss
        self._new_step()
        buckets: dict[tuple[str, torch.device], list[Item]] = {}
        for group, p in work:
            buckets.setdefault((self._bucket_of[p], p.device), []).append((group, p, p.grad))
        for (name, device), items in buckets.items():
            ok = self._update_bucket(name, items, self._gate.for_device(device))
            self._gate.record([p for _, p, _ in items], ok)
        self._settle(None)
        return loss

    # ------------------------------------------------------------------ hook mode
    def attach_to_backward(self) -> None:
        """Register post-accumulate-grad hooks on every managed parameter (idempotent; groups
        added later get theirs in add_param_group)."""
        self._hooks.attach((p, self._bucket_of[p]) for g in self.param_groups for p in g["params"])

    def detach_from_backward(self) -> None:
        """Remove the hooks; a step in progress is ended first (reported as skipped, what was
        already applied stays, counters settled)."""
        if self._hooks.armed:
            self.finish_step("detached during the step")
        self._hooks.detach()

    def begin_step(self) -> None:
        """Arm the hooks for one backward pass; stale gradients are dropped."""
        if not self._hooks.attached:
            raise RuntimeError("begin_step() needs attach_to_backward() first")
        if self._hooks.armed:
            raise RuntimeError("begin_step() called twice without finish_step()")
        self.zero_grad(set_to_none=True)
        self._new_step()
        self._hooks.arm()

    def finish_step(self, reason: str | None = None) -> StepReport:
        """Disarm the hooks and report (one device sync). `reason` marks the step skipped."""
        if not self._hooks.armed:
            raise RuntimeError("finish_step() without begin_step()")
        self._hooks.disarm(flush_held=reason is None)
        self._streams.join()
        return self._settle(reason)

    def backward_step(self, loss: torch.Tensor) -> StepReport:
        """begin_step + loss.backward() + finish_step, skipping the backward if the loss is not
        finite (then nothing is touched)."""
        self.begin_step()
        if not bool(torch.isfinite(loss.detach()).all()):
            return self.finish_step("non-finite loss")
        try:
            loss.backward()
        except BaseException:
            self.finish_step("backward failed")
            raise
        return self.finish_step()

    def _flush(self, name: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A complete bucket's gradients (BackwardHooks): replay its captured graph if its plan
        still holds, else update it on the general path, per device, on the side stream."""
        pairs.sort(key=lambda pg: self._order[pg[0]])  # the order step() uses
        items = [(self._group_of[p], p, g) for p, g in pairs]  # groups in force now
        replayed = self._compiled.replay_planned(name, items, self.state, self._gate,
                                                 self._projections, self._names)
        if replayed is not None:
            for st in replayed.states:
                st["step"] = replayed.step
            self._gate.record(replayed.params, replayed.applied)
            return
        by_device: dict[torch.device, list[Item]] = {}
        for it in items:
            by_device.setdefault(it[1].device, []).append(it)
        for device, part in by_device.items():
            with self._streams.updating(device):
                # Once one gradient is non-finite, every later bucket in this step is gated off
                # too: each update reads and writes the device's step gate.
                ok = self._update_bucket(name, part, self._gate.for_device(device))
            self._gate.record([p for _, p, _ in part], ok)

    # ------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        """Plain-JSON description for /train/status's "optimizer" field."""
        g = self.param_groups[0]
        return {"name": "apollo", "rank": g["rank"], "scale": g["scale"], "alpha": g["alpha"],
                "lr": g["lr"], "rounding": g["rounding"],
                "groups": [{"algorithm": x["algorithm"], "params": len(x["params"])} for x in self.param_groups],
                "trained_params": sum(p.numel() for x in self.param_groups for p in x["params"]),
                "state_bytes": self.state_bytes(), "steps_applied": self.steps_applied,
                "skipped_steps": self.skipped_steps}

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for st in self.state.values()
                   for v in st.values() if isinstance(v, torch.Tensor))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rng"] = self._rounding.state_dict()
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
            ng = {k: v for k, v in upgrade_group(saved).items() if k not in ("params", "param_names")}
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
        self._compiled.clear()
        self.state.clear()
        self.state.update(state)
        self._rounding.load_state_dict(state_dict.get("rng", {}), new_groups[0]["seed"])
        counters = state_dict.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.steps_applied = int(counters.get("steps_applied", 0))
