"""The (name, tensor) pairs of a Hugging Face model that a checkpoint should hold."""

from __future__ import annotations

import torch


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
