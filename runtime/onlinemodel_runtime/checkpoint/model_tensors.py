"""The (name, tensor) pairs of a Hugging Face model that a checkpoint should hold, under the base
checkpoint's own names.

The trainer's model is a transformers causal LM; the checkpoint must be a directory that vLLM and
transformers load as the base model's architecture. Where the two differ, a `CheckpointNames` (declared
per architecture by `weights/layouts.py`) says how: a multimodal model keeps its language model under
another prefix (`model.language_model.*`), transformers 5 writes fused experts one expert at a time
(`mlp.experts.{e}.gate_proj.weight`, as `save_pretrained` and the published checkpoints do), and tensors
the trainer never holds (a vision tower, multi-token-prediction heads) are carried over from the base
model's files (`base_weights.py`). Every name maps to views of the live tensors: nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from .safetensors_stream import TensorSpec

# transformers 5's fused experts (E, 2I, H) and (E, H, I), and their per-expert names on disk.
_FUSED_GATE_UP = "mlp.experts.gate_up_proj"
_FUSED_DOWN = "mlp.experts.down_proj"


@dataclass(frozen=True)
class CheckpointNames:
    """How the trainer's tensor names become the base checkpoint's.

    renames: (trainer prefix, checkpoint prefix), the first match applies. experts_per_expert: split
    fused experts into one tensor per expert and projection. carried: checkpoint-name prefixes of the
    base model's tensors that the trainer does not hold; they are copied from the base files.
    """

    renames: tuple[tuple[str, str], ...] = ()
    experts_per_expert: bool = False
    carried: tuple[str, ...] = ()

    def parts(self, name: str, shape: Sequence[int]) -> list[tuple[str, tuple]]:
        """(checkpoint name, index into the tensor) for the trainer's tensor `name` of `shape`."""
        for old, new in self.renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if not self.experts_per_expert:
            return [(name, ())]
        head, _, _ = name.rpartition(".")  # "...mlp.experts"
        if name.endswith(_FUSED_GATE_UP) and len(shape) == 3:
            half = shape[1] // 2
            return [item for e in range(shape[0]) for item in (
                (f"{head}.{e}.gate_proj.weight", (e, slice(0, half))),
                (f"{head}.{e}.up_proj.weight", (e, slice(half, 2 * half))))]
        if name.endswith(_FUSED_DOWN) and len(shape) == 3:
            return [(f"{head}.{e}.down_proj.weight", (e,)) for e in range(shape[0])]
        return [(name, ())]

    def specs(self, specs: Iterable[TensorSpec]) -> list[TensorSpec]:
        """The checkpoint's specs for the trainer's (in the same order as `tensors` yields them)."""
        out = []
        for spec in specs:
            meta = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            out += [TensorSpec(name, spec.dtype, tuple(meta[index].shape)) for name, index in
                    self.parts(spec.name, spec.shape)]
        return out

    def tensors(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, view) pairs for the trainer's, lazily and in order."""
        for name, tensor in pairs:
            for new_name, index in self.parts(name, tuple(tensor.shape)):
                yield new_name, tensor[index]


def hf_weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`model.state_dict()` order, tied duplicates dropped (the first name wins, as in
    `save_pretrained`: `lm_head.weight` tied to `model.embed_tokens.weight` is left out).

    The tensors are detached views of the live parameters: nothing is copied.
    """
    seen: set[tuple] = set()
    out: list[tuple[str, torch.Tensor]] = []
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.numel() > 0 and tensor.device.type != "meta":
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                   tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
        out.append((name, tensor))
    return out
