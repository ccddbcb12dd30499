"""CUDA IPC handles as JSON data: what crosses from vLLM's worker to the trainer, without pickle.

``torch.multiprocessing.reductions.reduce_tensor`` gives, for a CUDA tensor, the function
``rebuild_cuda_tensor`` and its arguments: two classes, shapes and offsets, a dtype, a device index, and
the IPC handles themselves (bytes). Only the arguments are written, as a JSON object with one field per
parameter of ``rebuild_cuda_tensor`` (bytes in base64, classes and dtype by name, each from a fixed
list); the reader rebuilds with that one function and refuses anything else. Unpickling a file would run
whatever code it names; reading this one can only open a CUDA allocation.
"""

from __future__ import annotations

import base64
import binascii
import inspect
from typing import Any

import torch
from torch.multiprocessing import reductions

# rebuild_cuda_tensor's parameters, in order (checked against the installed torch's before any use).
FIELDS = ("tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype",
          "storage_device", "storage_handle", "storage_size_bytes", "storage_offset_bytes", "requires_grad",
          "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
_TENSOR_CLASSES = {"Tensor": torch.Tensor, "Parameter": torch.nn.Parameter}
_STORAGE_CLASSES = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}
_INTS = ("tensor_offset", "storage_device", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset")
_BOOLS = ("requires_grad", "event_sync_required")
_BYTES = ("storage_handle", "ref_counter_handle", "event_handle")  # or None (torch: no event, empty storage)
_SHAPES = ("tensor_size", "tensor_stride")
_TORCH_FIELDS = tuple(inspect.signature(reductions.rebuild_cuda_tensor).parameters)


class HandleError(ValueError):
    """A handle record that is not what ``encode`` writes."""


def _check_torch() -> None:
    if _TORCH_FIELDS != FIELDS:
        raise HandleError(f"torch {torch.__version__}'s rebuild_cuda_tensor takes {_TORCH_FIELDS}, not the "
                          f"{FIELDS} this runtime knows: its CUDA IPC handles cannot be read")


def _name_of(value: Any, table: dict[str, Any], what: str) -> str:
    for name, known in table.items():
        if value is known:
            return name
    raise HandleError(f"{what} {value!r} is not one of {sorted(table)}")


def encode(rebuild: Any, args: tuple) -> dict[str, Any]:
    """The JSON record of one ``reduce_tensor`` result (``rebuild``, ``args``)."""
    _check_torch()
    if rebuild is not reductions.rebuild_cuda_tensor:
        raise HandleError(f"not a CUDA tensor's reduction: {getattr(rebuild, '__name__', rebuild)!r}")
    values = dict(zip(FIELDS, args, strict=True))
    record: dict[str, Any] = {
        "tensor_cls": _name_of(values["tensor_cls"], _TENSOR_CLASSES, "tensor class"),
        "storage_cls": _name_of(values["storage_cls"], _STORAGE_CLASSES, "storage class"),
        "dtype": str(values["dtype"]).removeprefix("torch."),
    }
    for key in _SHAPES:
        record[key] = [int(d) for d in values[key]]
    for key in _INTS:
        record[key] = int(values[key])
    for key in _BOOLS:
        record[key] = bool(values[key])
    for key in _BYTES:
        raw = values[key]
        record[key] = None if raw is None else base64.b64encode(bytes(raw)).decode("ascii")
    return record


def _typed(record: dict[str, Any], key: str, kind: type) -> Any:
    value = record[key]
    # bool is an int to Python: a flag in an int field (or the reverse) is a malformed record.
    if type(value) is not kind:
        raise HandleError(f"{key} must be {kind.__name__}, found {type(value).__name__}")
    return value


def decode(record: Any) -> tuple:
    """The arguments of ``rebuild_cuda_tensor`` from a record ``encode`` wrote; HandleError otherwise."""
    _check_torch()
    if not isinstance(record, dict) or set(record) != set(FIELDS):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise HandleError(f"a handle record has exactly the fields {sorted(FIELDS)}, found {found}")
    values: dict[str, Any] = {
        "tensor_cls": _TENSOR_CLASSES.get(record["tensor_cls"]),
        "storage_cls": _STORAGE_CLASSES.get(record["storage_cls"]),
        "dtype": getattr(torch, record["dtype"], None) if isinstance(record["dtype"], str) else None,
    }
    if values["tensor_cls"] is None or values["storage_cls"] is None:
        raise HandleError(f"unknown class in handle record: {record['tensor_cls']!r}, {record['storage_cls']!r}")
    if not isinstance(values["dtype"], torch.dtype):
        raise HandleError(f"unknown dtype {record['dtype']!r} in handle record")
    for key in _SHAPES:
        dims = _typed(record, key, list)
        if any(type(d) is not int or d < 0 for d in dims):
            raise HandleError(f"{key} must be a list of integers >= 0")
    values["tensor_size"] = torch.Size(record["tensor_size"])
    values["tensor_stride"] = tuple(record["tensor_stride"])
    for key in _INTS:
        values[key] = _typed(record, key, int)
    for key in _BOOLS:
        values[key] = _typed(record, key, bool)
    for key in _BYTES:
        if record[key] is None:
            values[key] = None
            continue
        try:
            values[key] = base64.b64decode(_typed(record, key, str), validate=True)
        except binascii.Error as exc:
            raise HandleError(f"{key} is not base64: {exc}") from None
    return tuple(values[key] for key in FIELDS)


def rebuild(record: Any) -> torch.Tensor:
    """The tensor a record names, opened in this process (the one function allowed to rebuild it)."""
    return reductions.rebuild_cuda_tensor(*decode(record))
