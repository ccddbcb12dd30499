"""A Hugging Face model whose parameters are zero-copy views into vLLM's weight tensors.

The model is built on the meta device (no weight memory), then every parameter is replaced by a view
from `layouts.ModelLayout.hf_views`. Non-persistent buffers (rotary `inv_freq`) are recomputed on the
weights' device the way transformers computes them. Nothing here copies a weight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .layouts import LayoutError, ModelLayout


def _load_config(config_or_dir: Any) -> tuple[Any, Path | None]:
    if isinstance(config_or_dir, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(config_or_dir)
        return AutoConfig.from_pretrained(path), path
    return config_or_dir, None


def _common_device(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise LayoutError(f"vLLM tensors lie on several devices {sorted(map(str, devices))}; expected one")
    return devices.pop()


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf not in module._parameters:
        raise LayoutError(f"HF model has no parameter {name!r}")
    # Assigning into _parameters keeps the Parameter object as-is (no copy, no re-registration checks).
    module._parameters[leaf] = param


def _rebuild_rotary_buffers(model: nn.Module, device: torch.device) -> None:
    """Recreate modules whose buffers are still on meta (rotary embeddings) on `device`.

    transformers computes `inv_freq` in the module's __init__ from the config; re-running __init__ under
    the real device computes them exactly as `from_pretrained` would.
    """
    for name, module in list(model.named_modules()):
        meta_bufs = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta_bufs:
            continue
        if "inv_freq" not in meta_bufs or not hasattr(module, "config"):
            raise LayoutError(f"cannot materialize buffers {meta_bufs} of {name or 'model'} "
                              f"({type(module).__name__}): unknown buffer kind")
        with torch.device(device):
            fresh = type(module)(config=module.config)
        fresh.to(device)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, fresh)
    leftover = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if leftover:
        raise LayoutError(f"buffers still on the meta device after materialization: {leftover}")


def storage_ranges(tensors: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> list[tuple[int, int]]:
    """(start, end) byte addresses of the storages behind `tensors`."""
    items = tensors.values() if isinstance(tensors, Mapping) else tensors
    ranges = set()
    for t in items:
        storage = t.untyped_storage()
        ranges.add((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return sorted(ranges)


def assert_views_of(model: nn.Module, vllm_tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise LayoutError unless every parameter's bytes lie inside one of `vllm_tensors`' storages."""
    ranges = storage_ranges(vllm_tensors)
    for name, p in model.named_parameters(remove_duplicate=False):
        start = p.data_ptr()
        end = start + p.numel() * p.element_size()
        if not any(lo <= start and end <= hi for lo, hi in ranges):
            raise LayoutError(f"parameter {name} is not a view of the vLLM tensors (data_ptr {start:#x})")


def build_hf_model(config_or_dir: Any, vllm_tensors: Mapping[str, torch.Tensor],
                   expected_dtype: torch.dtype | None = None, *, requires_grad: bool = False,
                   train: bool = False, attn_implementation: str | None = None) -> Any:
    """Build a transformers causal LM whose parameters are views into `vllm_tensors`.

    `config_or_dir`: a transformers config or a model directory (then its generation config is loaded
    too). `vllm_tensors`: vLLM's `named_parameters()` (tensor parallel size 1), e.g. attached through
    CUDA IPC or shared memory. `expected_dtype`: the dtype vLLM serves (default: the config's).
    Raises `LayoutError` on any name/shape/dtype mismatch. Parameters get `requires_grad`; the model is
    in train mode if `train`, else eval mode.
    """
    from transformers import AutoModelForCausalLM

    config, path = _load_config(config_or_dir)
    layout = ModelLayout(config)
    views = layout.hf_views(vllm_tensors, expected_dtype)
    device = _common_device(vllm_tensors)
    dtype = next(iter(views.values())).dtype

    import transformers

    # transformers 5 names it `dtype`; 4.x `torch_dtype`.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_kw: dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        # A multimodal model's layout names its text config: the trainer gets the causal LM only.
        model = AutoModelForCausalLM.from_config(layout.hf_config, **kwargs)

    hf_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    missing = [n for n in hf_names if n not in views]
    extra = [n for n in views if n not in hf_names]
    if missing or extra:
        raise LayoutError(f"the transformers {type(model).__name__} does not match the layout table: "
                          f"parameters without a view {missing[:5]}, views without a parameter {extra[:5]}")

    # One Parameter per distinct view, so tied names (lm_head/embed_tokens) share one object.
    params: dict[int, nn.Parameter] = {}
    for name in hf_names:
        view = views[name]
        param = params.get(id(view))
        if param is None:
            param = params[id(view)] = nn.Parameter(view, requires_grad=requires_grad)
        _set_parameter(model, name, param)
    if layout.tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise LayoutError("tied embeddings came apart while attaching views")

    _rebuild_rotary_buffers(model, device)
    assert_views_of(model, vllm_tensors)

    if path is not None:
        _load_generation_config(model, path)
    model.train(train)
    return model


def _load_generation_config(model: Any, path: Path) -> None:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


__all__ = ["build_hf_model", "assert_views_of", "storage_ranges", "LayoutError"]
