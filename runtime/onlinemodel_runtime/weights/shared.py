"""Export the served model's parameters to another process without copying them, and attach to them.

The vLLM worker calls :func:`export_weights` once after loading; the trainer calls
:func:`attach_weights` once at start. Two transports:

* ``cuda_ipc``: every parameter is shared with ``torch.multiprocessing``'s CUDA IPC reduction; the
  trainer's tensors are the very GPU memory vLLM reads.
* ``shm`` (CPU): the parameters are moved, once, into one file in ``/dev/shm`` mapped shared by both
  processes; vLLM's parameters become views of that mapping, so both sides read and write the same pages.

A ``weights.json`` manifest (written atomically, last) tells the trainer what to expect: model path,
architecture, dtype, every tensor's name, shape and offset, and the vLLM version. The trainer checks it
against the HF config before it touches anything (see ``layouts.validate``).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from onlinemodel_runtime.checkpoint.fsutil import atomic_write_bytes

MANIFEST = "weights.json"
CUDA_HANDLES = "cuda_handles.pkl"
FORMAT_VERSION = 1
_ALIGN = 64

# (manifest, mapping) once the CPU parameters were moved into shared memory in this process.
_SHM_EXPORT: tuple[Manifest, torch.Tensor] | None = None


class AttachError(RuntimeError):
    """The exported weights cannot be attached (missing, stale, or not what the manifest says)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # byte offset in the shm file (shm transport only)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class Manifest:
    transport: str  # "shm" | "cuda_ipc"
    device: str
    model: str
    architecture: str
    dtype: str
    vllm_version: str
    tensors: tuple[TensorSpec, ...]
    shm_path: str | None = None
    shm_bytes: int = 0
    owner_pid: int = 0
    created: float = 0.0

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "transport": self.transport,
            "device": self.device,
            "model": self.model,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "vllm_version": self.vllm_version,
            "shm_path": self.shm_path,
            "shm_bytes": self.shm_bytes,
            "owner_pid": self.owner_pid,
            "created": self.created,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset}
                for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        if data.get("format") != FORMAT_VERSION:
            raise AttachError(f"weights manifest format {data.get('format')!r}, expected {FORMAT_VERSION}")
        return cls(
            transport=data["transport"],
            device=data["device"],
            model=data["model"],
            architecture=data["architecture"],
            dtype=data["dtype"],
            vllm_version=data["vllm_version"],
            shm_path=data.get("shm_path"),
            shm_bytes=int(data.get("shm_bytes", 0)),
            owner_pid=int(data.get("owner_pid", 0)),
            created=float(data.get("created", 0.0)),
            tensors=tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), int(t.get("offset", 0)))
                for t in data["tensors"]
            ),
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise AttachError(f"unknown dtype {name!r} in weights manifest")
    return dtype


def export_weights(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    state_dir: Path,
    *,
    model: str,
    architecture: str,
    vllm_version: str,
    shm_dir: Path = Path("/dev/shm"),
) -> Manifest:
    """Publish the parameters for the trainer. On CPU this moves them into shared memory (once).

    Must be called in the process that owns the parameters (vLLM's worker). Idempotent on CPU: a
    second call re-publishes the same mapping.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    params = list(named_params)
    if not params:
        raise AttachError("the model has no parameters to export")
    devices = {p.device for _, p in params}
    if len(devices) != 1:
        raise AttachError(f"parameters live on several devices {sorted(map(str, devices))}; "
                          "onlinemodel supports one device (tensor parallel size 1)")
    device = devices.pop()
    dtypes = {p.dtype for _, p in params}
    main_dtype = max(dtypes, key=lambda d: sum(p.numel() for _, p in params if p.dtype == d))
    common = dict(
        model=model, architecture=architecture, dtype=dtype_name(main_dtype),
        vllm_version=vllm_version, owner_pid=os.getpid(), created=time.time(),
    )
    if device.type == "cuda":
        manifest = _export_cuda(params, state_dir, device, common)
    elif device.type == "cpu":
        manifest = _export_shm(params, state_dir, shm_dir, common)
    else:
        raise AttachError(f"device {device} is not supported (cuda or cpu)")
    atomic_write_bytes(state_dir / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode())
    return manifest


def _export_cuda(params, state_dir: Path, device: torch.device, common: dict) -> Manifest:
    from torch.multiprocessing.reductions import reduce_tensor

    specs, handles = [], []
    for name, p in params:
        rebuild, args = reduce_tensor(p.detach())
        handles.append((name, rebuild, args))
        specs.append(TensorSpec(name, dtype_name(p.dtype), tuple(p.shape)))
    # The handles file is written by our own worker into our own state dir (mode 0600) and read by our
    # own trainer: pickle is the format torch's IPC reduction produces.
    atomic_write_bytes(state_dir / CUDA_HANDLES, pickle.dumps(handles), mode=0o600)
    return Manifest(transport="cuda_ipc", device=str(device), tensors=tuple(specs), **common)


def _export_shm(params, state_dir: Path, shm_dir: Path, common: dict) -> Manifest:
    global _SHM_EXPORT
    if _SHM_EXPORT is not None:  # already moved into shared memory: publish the same mapping again
        manifest, mapping = _SHM_EXPORT
        lo, hi = mapping.data_ptr(), mapping.data_ptr() + manifest.shm_bytes
        same = [t.name for t in manifest.tensors] == [n for n, _ in params] and all(
            lo <= p.data_ptr() < hi for _, p in params)
        if not same:
            raise AttachError("this process already exported different parameters to shared memory")
        return manifest
    _remove_stale_shm_files(shm_dir)
    specs, offset = [], 0
    for name, p in params:
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        specs.append(TensorSpec(name, dtype_name(p.dtype), tuple(p.shape), offset))
        offset += specs[-1].nbytes
    total = max(offset, 1)
    path = Path(shm_dir) / f"onlinemodel-{os.getpid()}-{int(time.time())}.weights"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Reserve every page now: a sparse file on a full tmpfs would crash the worker with SIGBUS
        # at the first write instead of failing here with a message.
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        fs = os.statvfs(shm_dir)
        free = fs.f_bavail * fs.f_frsize
        raise AttachError(f"cannot place {total / 2**30:.2f} GiB of weights in {shm_dir} ({free / 2**30:.2f} GiB "
                          f"free): {exc.strerror}; give the container a larger /dev/shm "
                          "(OnlineModel spec.resources.shmSize)") from exc
    os.close(fd)
    mapping = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    for spec, (_, p) in zip(specs, params):
        view = mapping[spec.offset : spec.offset + spec.nbytes].view(p.dtype).view(p.shape)
        view.copy_(p.detach())
        # Swap the parameter's storage for the shared view: from now on vLLM reads the shared pages.
        p.data = view
    manifest = Manifest(
        transport="shm", device="cpu", tensors=tuple(specs), shm_path=str(path), shm_bytes=total,
        **common,
    )
    _SHM_EXPORT = (manifest, mapping)  # the mapping lives as long as the worker process
    return manifest


def _remove_stale_shm_files(shm_dir: Path) -> None:
    """Delete weight files of owners that died without cleaning up (kill -9, OOM): /dev/shm is memory."""
    for path in Path(shm_dir).glob("onlinemodel-*.weights"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def read_manifest(state_dir: Path) -> Manifest:
    path = Path(state_dir) / MANIFEST
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise AttachError(f"no weights manifest at {path}: has the vLLM worker exported its weights?") from None


def wait_for_manifest(state_dir: Path, timeout: float, poll: float = 0.2) -> Manifest:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_manifest(state_dir)
        except AttachError:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)


def attach_weights(state_dir: Path, manifest: Manifest | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Map the exported parameters into this process: name -> tensor sharing the owner's memory."""
    manifest = manifest or read_manifest(state_dir)
    if manifest.transport == "shm":
        if not manifest.shm_path or not Path(manifest.shm_path).exists():
            raise AttachError(f"shared-memory file {manifest.shm_path} is gone: the vLLM worker exited?")
        size = Path(manifest.shm_path).stat().st_size
        if size != manifest.shm_bytes:
            raise AttachError(f"shared-memory file is {size} bytes, manifest says {manifest.shm_bytes}")
        mapping = torch.from_file(manifest.shm_path, shared=True, size=size, dtype=torch.uint8)
        tensors = {
            t.name: mapping[t.offset : t.offset + t.nbytes].view(t.torch_dtype).view(t.shape)
            for t in manifest.tensors
        }
        return manifest, tensors
    if manifest.transport == "cuda_ipc":
        try:
            raw = (Path(state_dir) / CUDA_HANDLES).read_bytes()
        except FileNotFoundError:
            raise AttachError(f"no CUDA handles in {state_dir}: has the vLLM worker exported its weights?") from None
        tensors = {}
        for name, rebuild, args in pickle.loads(raw):
            try:
                tensors[name] = rebuild(*args)
            except Exception as exc:  # the owner exited, or another GPU
                raise AttachError(f"cannot open the CUDA IPC handle of {name} (owner pid {manifest.owner_pid}): "
                                  f"{exc}") from exc
        for spec in manifest.tensors:
            t = tensors.get(spec.name)
            if t is None or tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
                raise AttachError(f"CUDA handle for {spec.name} does not match the manifest")
        return manifest, tensors
    raise AttachError(f"unknown transport {manifest.transport!r} in weights manifest")
