"""CUDA IPC handles as JSON: the record round-trips to exactly the arguments torch's reduction gave, and
anything else is refused (checked on CPU with the structure reduce_tensor returns for a CUDA tensor; the
transport itself runs on a GPU: bench/gpu_ipc.py, tests/gpu)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.multiprocessing import reductions

from onlinemodel_runtime.weights import cuda_ipc


def cuda_like_args(size=(4, 8), event=b"\x05" * 64) -> tuple:
    """What reduce_tensor returns for a CUDA tensor: (tensor_cls, size, stride, offset, storage_cls, dtype,
    device, handle, storage bytes, storage offset, requires_grad, ref-counter handle and offset, event
    handle, event sync)."""
    stride = tuple(int(torch.tensor(size[i + 1:]).prod()) for i in range(len(size)))
    return (torch.Tensor, torch.Size(size), stride, 3, torch.storage.TypedStorage, torch.bfloat16, 0,
            b"\x00\xffhandle\n" * 4, 4096, 512, False, b"refcount\x01", 16, event, event is not None)


def record_of(args: tuple) -> dict:
    return json.loads(json.dumps(cuda_ipc.encode(reductions.rebuild_cuda_tensor, args)))


@pytest.mark.parametrize("event", [b"\x05" * 64, None])
def test_round_trip_gives_the_same_arguments(event):
    args = cuda_like_args(event=event)
    record = record_of(args)
    assert set(record) == set(cuda_ipc.FIELDS) and record["dtype"] == "bfloat16"
    decoded = cuda_ipc.decode(record)
    assert decoded == args
    assert [type(a) for a in decoded] == [type(a) for a in args]


def test_rebuild_calls_torchs_function_with_the_decoded_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *args: seen.append(args) or "tensor")
    args = cuda_like_args()
    record = json.loads(json.dumps(cuda_ipc.encode(reductions.rebuild_cuda_tensor, args)))
    assert cuda_ipc.rebuild(record) == "tensor" and seen == [args]


def test_only_the_cuda_reduction_is_written():
    with pytest.raises(cuda_ipc.HandleError, match="not a CUDA tensor's reduction"):
        cuda_ipc.encode(reductions.rebuild_meta_tensor, cuda_like_args())
    args = list(cuda_like_args())
    args[0] = dict  # a class that is not a tensor
    with pytest.raises(cuda_ipc.HandleError, match="tensor class"):
        cuda_ipc.encode(reductions.rebuild_cuda_tensor, tuple(args))


@pytest.mark.parametrize("change,message", [
    ({"tensor_cls": "os.system"}, "unknown class"),
    ({"storage_cls": "builtins.eval"}, "unknown class"),
    ({"dtype": "Tensor"}, "unknown dtype"),
    ({"dtype": 5}, "unknown dtype"),
    ({"storage_handle": "not base64!"}, "not base64"),
    ({"storage_handle": 12}, "must be str"),
    ({"tensor_offset": True}, "must be int"),
    ({"requires_grad": 1}, "must be bool"),
    ({"tensor_size": [4, -1]}, "integers >= 0"),
    ({"tensor_size": "4,8"}, "must be list"),
    ({"extra": 1}, "exactly the fields"),
])
def test_anything_else_is_refused(change, message):
    record = {**record_of(cuda_like_args()), **change}
    with pytest.raises(cuda_ipc.HandleError, match=message):
        cuda_ipc.decode(record)


def test_a_record_that_is_not_an_object_is_refused():
    with pytest.raises(cuda_ipc.HandleError, match="exactly the fields"):
        cuda_ipc.decode(["a", "list"])


def test_a_torch_whose_rebuild_function_changed_is_refused(monkeypatch):
    record = record_of(cuda_like_args())
    monkeypatch.setattr(cuda_ipc, "_TORCH_FIELDS", ("tensor_cls", "tensor_size"))
    with pytest.raises(cuda_ipc.HandleError, match="cannot be read"):
        cuda_ipc.decode(record)
    with pytest.raises(cuda_ipc.HandleError, match="cannot be read"):
        cuda_ipc.encode(reductions.rebuild_cuda_tensor, cuda_like_args())
