"""Checkpoints under tensor parallelism: one HF directory, whatever the TP (docs/tensor-parallel.md).

Saving, every rank calls `save_tp_checkpoint`: rank 0 gathers the ranks' tensors one decoder layer at a time
(`dist.gather`, so it never holds more than one layer of the other ranks), turns them into HF tensors with
`tp_shards.gather_hf_state_dict` (which refuses replicated copies that differ: ranks that disagree must not
be saved) and streams them into `CheckpointStore.save`, which writes the directory a TP=1 trainer writes:
vLLM loads it at any TP. The optimizer state is saved in TP=1 form (`optimizer_state_tp1`): what a TP=1
Apollo's state_dict holds, sharded moments joined, replicated ones once, plus each rank's rounding streams
(`tp_rng`, for a restart at the same TP). Restarting at any TP=M, every rank reads that file and keeps its
part (`optimizer_state_for_rank`); at TP=1 it loads as it is.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from ..weights.tp_model import rank0_only_names
from .safetensors_stream import TensorSpec

_LAYER = re.compile(r"^(model\.layers\.\d+)\.")


def hf_state_dict_of(layout: Any, ranks: Sequence[Mapping[str, torch.Tensor]],
                     names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The whole HF state dict from every rank's vLLM tensors (`tp_shards.gather_hf_state_dict`), with rank 0's
    copy of the tensors only rank 0 trains (row-parallel biases: the other ranks' copies are never read)."""
    rank0 = rank0_only_names(layout)  # unpacked: the same names in vLLM
    fixed = [dict(r, **{n: ranks[0][n] for n in rank0 if n in r}) if i else r for i, r in enumerate(ranks)]
    return layout.gather_hf_state_dict(fixed, names)


def hf_names_in_order(layout: Any) -> list[str]:
    """The HF tensors a TP=1 checkpoint of this model holds, in the order a TP=1 trainer writes them
    (`model_tensors.hf_weight_tensors`: the model's state_dict, a tied lm_head left out)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(layout.layout.hf_config)
    shapes = layout.layout.hf_shapes()
    tied = getattr(layout.layout, "tied", False)
    return [n for n in model.state_dict() if n in shapes and not (tied and n == "lm_head.weight")]


def _by_layer(layout: Any, rank: int) -> list[tuple[list[str], list[str]]]:
    """(HF names in checkpoint order, the vLLM tensors holding them) per decoder layer, and per other tensor."""
    holders: dict[str, set[str]] = {}
    for t in layout.rank_tensors(rank).values():
        for p in t.pieces:
            holders.setdefault(p.hf_name, set()).add(t.name)
    groups: dict[str, list[str]] = {}
    for name in hf_names_in_order(layout):
        match = _LAYER.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return [(hf, sorted(set().union(*(holders[n] for n in hf)))) for hf in groups.values()]


class GatheredWeights:
    """Rank 0's (HF name, tensor) pairs of the whole model, gathered from every rank a layer at a time as
    they are consumed; `specs` describes them before any arrives. The other ranks send with `send()`. Rank 0
    must call `drain()` if it stops consuming early, so the ranks' collectives still pair up."""

    def __init__(self, layout: Any, tensors: Mapping[str, torch.Tensor], group: Any = None) -> None:
        self.layout, self.tensors, self.group = layout, tensors, group
        self.rank = dist.get_rank(group)
        self._layers = _by_layer(layout, 0)  # every rank holds every vLLM name: the same order everywhere
        self._done = 0
        dtypes = {n: t.dtype for n, t in tensors.items()}
        shapes = layout.layout.hf_shapes()
        self.specs = [TensorSpec(n, self._dtype(n, dtypes), shapes[n]) for hf, _ in self._layers for n in hf]

    def _dtype(self, hf_name: str, dtypes: Mapping[str, torch.dtype]) -> torch.dtype:
        for t in self.layout.rank_tensors(0).values():
            if any(p.hf_name == hf_name for p in t.pieces):
                return dtypes[t.name]
        raise KeyError(hf_name)

    def _gather(self, names: list[str]) -> list[dict[str, torch.Tensor]] | None:
        ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size(self.group))]
        for name in names:
            t = self.tensors[name].contiguous()
            parts = [torch.empty_like(t) for _ in ranks] if self.rank == 0 else None
            dist.gather(t, parts, group=self.group, group_dst=0)
            if parts is not None:
                for r, part in enumerate(parts):
                    ranks[r][name] = part
        return ranks if self.rank == 0 else None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.rank != 0:
            raise RuntimeError("only rank 0 consumes the gathered weights; the others send()")
        while self._done < len(self._layers):
            hf, names = self._layers[self._done]
            ranks = self._gather(names)
            self._done += 1
            whole = hf_state_dict_of(self.layout, ranks, set(names))
            for name in hf:
                yield name, whole[name]

    def send(self) -> None:
        """A rank > 0's part: every layer's tensors, in rank 0's order."""
        for _, names in self._layers:
            self._gather(names)

    def drain(self) -> None:
        """Rank 0: gather (and drop) the layers not consumed yet."""
        while self._done < len(self._layers):
            self._gather(self._layers[self._done][1])
            self._done += 1


def save_tp_checkpoint(store: Any, layout: Any, tensors: Mapping[str, torch.Tensor], optimizer: Any = None, *,
                       group: Any = None, **save_kwargs: Any) -> Any:
    """Every rank calls it with its vLLM tensors (and its Apollo, with `tp`): rank 0 writes the checkpoint
    (`store.save(..., optimizer_state=<TP=1 form>, **save_kwargs)`) and returns its CheckpointInfo, the other
    ranks return None once they have sent everything. A failure raises on rank 0 only."""
    state = optimizer_state_tp1(optimizer, group) if optimizer is not None else None
    weights = GatheredWeights(layout, tensors, group)
    if weights.rank != 0:
        weights.send()
        return None
    try:
        return store.save(iter(weights), weights.specs, optimizer_state=state, **save_kwargs)
    finally:
        weights.drain()


# ---------------------------------------------------------------------- optimizer state
def _named(sd: Mapping[str, Any]) -> Iterator[tuple[int, int, str]]:
    """(group index, state index, name) of every parameter of a torch.optim state_dict."""
    for gi, g in enumerate(sd["param_groups"]):
        for idx, name in zip(g["params"], g["param_names"]):
            yield gi, idx, name


def optimizer_state_tp1(optimizer: Any, group: Any = None) -> dict[str, Any] | None:
    """Collective: on rank 0, the TP=1 form of the ranks' Apollo state (None on the others)."""
    tp = optimizer.tp
    sd = optimizer.state_dict()
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    mine: dict[str, Any] = {"rng": sd["rng"], "pieces": {}}
    for (p, g), (_, idx, name) in zip(params, _named(sd)):
        for key, value in sd["state"].get(idx, {}).items():
            shard = tp.state_shard(name, p, g, key) if isinstance(value, torch.Tensor) else None
            if shard is not None:
                mine["pieces"][(name, key)] = (value.detach().cpu(), shard)
    everyone = [None] * tp.size if tp.rank == 0 else None
    dist.gather_object(mine, everyone, group=group, group_dst=0)
    if tp.rank != 0:
        return None
    for (p, g), (_, idx, name) in zip(params, _named(sd)):
        for key in list(sd["state"].get(idx, {})):
            if (name, key) not in mine["pieces"]:
                continue
            _, shard = mine["pieces"][(name, key)]
            whole = torch.zeros(shard.global_shape, dtype=torch.float32)
            for other in everyone:
                piece, s = other["pieces"][(name, key)]
                s.mine(whole).copy_(piece)
            sd["state"][idx][key] = whole
    sd["rng"] = {}  # a TP=1 optimizer starts its own streams; TP=N's are kept for a restart at N
    sd["tp_rng"] = [other["rng"] for other in everyone]
    return sd


def optimizer_state_for_rank(state: Mapping[str, Any], optimizer: Any) -> dict[str, Any]:
    """This rank's Apollo state_dict from a TP=1-form one (saved at any TP, or by a TP=1 trainer)."""
    tp = optimizer.tp
    if tp is None:
        return dict(state)
    saved: dict[str, tuple[int, dict[str, Any]]] = {name: (gi, state["state"].get(idx, {}))
                                                    for gi, idx, name in _named(state)}
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    out_state: dict[int, dict[str, Any]] = {}
    groups, index = [], 0
    for gi, g in enumerate(optimizer.param_groups):
        hyper = {k: v for k, v in state["param_groups"][gi].items() if k not in ("params", "param_names")}
        groups.append(dict(hyper, params=list(range(index, index + len(g["params"]))),
                           param_names=list(g["param_names"])))
        for p, name in zip(g["params"], g["param_names"]):
            if name not in saved or saved[name][0] != gi:
                raise ValueError(f"the saved optimizer state has no {name!r} in group {gi}")
            st = {}
            for key, value in saved[name][1].items():
                shard = tp.state_shard(name, p, g, key) if isinstance(value, torch.Tensor) else None
                if isinstance(value, torch.Tensor):  # its own copy: in-place updates must not reach `state`
                    value = (shard.mine(value) if shard is not None else value).clone()
                st[key] = value
            if st:
                out_state[index] = st
            index += 1
    rng = state.get("tp_rng") or []
    return {"state": out_state, "param_groups": groups, "counters": state.get("counters", {}),
            "rng": rng[tp.rank] if len(rng) == tp.size else {}}
