"""Export the served model's parameters to another process without copying them, and attach to them.

The vLLM worker calls :func:`export_weights` once after loading; the trainer calls
:func:`attach_weights` once at start. Two transports:

* ``cuda_ipc``: every parameter is shared with ``torch.multiprocessing``'s CUDA IPC reduction; the
  trainer's tensors are the very GPU memory vLLM reads. The handles cross as JSON data (``cuda_ipc.py``),
  never as a pickle.
* ``shm`` (CPU): the parameters are moved, once, into one file in ``/dev/shm`` mapped shared by both
  processes; vLLM's parameters become views of that mapping, so both sides read and write the same pages.
  The owner holds an exclusive ``flock`` on the file while it lives: a file whose lock can be taken is
  stale (its owner died without cleaning up) and the only kind anyone deletes.

A ``weights.json`` manifest (written atomically, last) tells the trainer what to expect: model path,
architecture, dtype, every tensor's name, shape and offset, the vLLM version, and which tensor-parallel shard
the worker holds (``WorkerShard``: rank r of N > 1 exports into ``state_dir/rank{r}/``). The trainer checks it
against the HF config before it touches anything (see ``layouts.validate``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from onlinemodel_protocol.rpc import WEIGHTS_FORMAT_VERSION, WorkerShard
from onlinemodel_runtime.checkpoint.fsutil import atomic_write_bytes
from onlinemodel_runtime.weights import cuda_ipc

MANIFEST = "weights.json"
CUDA_HANDLES = "cuda_handles.json"
# 2: CUDA handles as JSON (cuda_ipc.py), shm files locked by their owner; 3: the tensor-parallel shard.
FORMAT_VERSION = WEIGHTS_FORMAT_VERSION
_ALIGN = 64
# Shared-memory weight files carry the format in their name: files of older runtimes, which hold no lock,
# are never taken for stale ones.
SHM_PREFIX = f"onlinemodel-v{FORMAT_VERSION}-"
SHM_GLOB = f"{SHM_PREFIX}*.weights"

# (manifest, mapping, fd holding the file's flock) once the CPU parameters were moved into shared
# memory in this process; the fd stays open, and the lock held, for the life of the process.
_SHM_EXPORT: tuple[Manifest, torch.Tensor, int] | None = None


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
    shard: WorkerShard = WorkerShard()

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            **self.shard.model_dump(),
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
            shard=WorkerShard(tp_rank=data["tp_rank"], tp_size=data["tp_size"]),
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
    shard: WorkerShard = WorkerShard(),
    shm_dir: Path = Path("/dev/shm"),
) -> Manifest:
    """Publish the parameters for the trainer. On CPU this moves them into shared memory (once).

    Must be called in the process that owns the parameters (vLLM's worker, which holds `shard` of the
    model); the manifest goes to ``shard.state_dir(state_dir)``. Idempotent on CPU: a second call
    re-publishes the same mapping.
    """
    state_dir = shard.state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    params = list(named_params)
    if not params:
        raise AttachError("the model has no parameters to export")
    devices = {p.device for _, p in params}
    if len(devices) != 1:
        raise AttachError(f"parameters live on several devices {sorted(map(str, devices))}; "
                          "onlinemodel exports one device per vLLM worker")
    device = devices.pop()
    dtypes = {p.dtype for _, p in params}
    main_dtype = max(dtypes, key=lambda d: sum(p.numel() for _, p in params if p.dtype == d))
    common = dict(
        model=model, architecture=architecture, dtype=dtype_name(main_dtype),
        vllm_version=vllm_version, owner_pid=os.getpid(), created=time.time(), shard=shard,
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
        handles.append({"name": name, "handle": cuda_ipc.encode(*reduce_tensor(p.detach()))})
        specs.append(TensorSpec(name, dtype_name(p.dtype), tuple(p.shape)))
    atomic_write_bytes(state_dir / CUDA_HANDLES, json.dumps(handles).encode(), mode=0o600)
    return Manifest(transport="cuda_ipc", device=str(device), tensors=tuple(specs), **common)


def _export_shm(params, state_dir: Path, shm_dir: Path, common: dict) -> Manifest:
    global _SHM_EXPORT
    if _SHM_EXPORT is not None:  # already moved into shared memory: publish the same mapping again
        manifest, mapping, _ = _SHM_EXPORT
        lo, hi = mapping.data_ptr(), mapping.data_ptr() + manifest.shm_bytes
        same = [t.name for t in manifest.tensors] == [n for n, _ in params] and all(
            lo <= p.data_ptr() < hi for _, p in params)
        if not same:
            raise AttachError("this process already exported different parameters to shared memory")
        return manifest
    remove_stale_shm_files(shm_dir)
    specs, offset = [], 0
    for name, p in params:
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        specs.append(TensorSpec(name, dtype_name(p.dtype), tuple(p.shape), offset))
        offset += specs[-1].nbytes
    total = max(offset, 1)
    path, fd = _create_locked_file(Path(shm_dir), total)
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
    _SHM_EXPORT = (manifest, mapping, fd)  # mapping and lock live as long as the worker process
    return manifest


def _create_locked_file(shm_dir: Path, size: int) -> tuple[Path, int]:
    """A new file of `size` reserved bytes, flock()ed by the returned fd (kept open by the caller)."""
    name = f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}.weights"
    # Created under a name the stale-file sweep does not match, locked, then renamed: no other
    # server's sweep can see it unlocked.
    tmp = shm_dir / f".{name}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise AttachError(f"cannot create a shared-memory weights file in {shm_dir}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        try:
            # Reserve every page now: a sparse file on a full tmpfs would crash the worker with SIGBUS
            # at the first write instead of failing here with a message.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            fs = os.statvfs(shm_dir)
            free = fs.f_bavail * fs.f_frsize
            raise AttachError(f"cannot place {size / 2**30:.2f} GiB of weights in {shm_dir} ({free / 2**30:.2f} "
                              f"GiB free): {exc.strerror}; give the container a larger /dev/shm "
                              "(OnlineModel spec.resources.shmSize)") from exc
        os.rename(tmp, shm_dir / name)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return shm_dir / name, fd


def remove_if_stale(path: Path) -> bool:
    """Delete a shared-memory weights file if nobody holds its lock (its owner is gone); True if deleted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # gone, a symlink, or not ours to read
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # locked: its owner is alive
        # Still the file we locked (not replaced under the same name meanwhile).
        if os.fstat(fd).st_ino != os.lstat(path).st_ino:
            return False
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_shm_files(shm_dir: Path) -> list[Path]:
    """Delete weight files of owners that died without cleaning up (kill -9, OOM): /dev/shm is memory."""
    return [path for path in sorted(Path(shm_dir).glob(SHM_GLOB)) if remove_if_stale(path)]


def read_manifest(state_dir: Path) -> Manifest:
    path = Path(state_dir) / MANIFEST
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise AttachError(f"no weights manifest at {path}: has the vLLM worker exported its weights?") from None


def exported_manifest_dirs(state_dir: Path) -> list[Path]:
    """The directories holding a weights manifest: the state directory, or its per-rank ones."""
    state_dir = Path(state_dir)
    return [d for d in (state_dir, *sorted(state_dir.glob("rank*"))) if (d / MANIFEST).is_file()]


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
            entries = json.loads((Path(state_dir) / CUDA_HANDLES).read_bytes())
        except FileNotFoundError:
            raise AttachError(f"no CUDA handles in {state_dir}: has the vLLM worker exported its weights?") from None
        except ValueError as exc:
            raise AttachError(f"unreadable CUDA handles in {state_dir}: {exc}") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and set(e) == {"name", "handle"}
                                                    for e in entries):
            raise AttachError(f"{CUDA_HANDLES} in {state_dir} is not a list of {{name, handle}} records")
        tensors = {}
        for entry in entries:
            name = entry["name"]
            try:
                tensors[name] = cuda_ipc.rebuild(entry["handle"])
            except cuda_ipc.HandleError as exc:
                raise AttachError(f"bad CUDA IPC handle record for {name}: {exc}") from None
            except Exception as exc:  # the owner exited, or another GPU
                raise AttachError(f"cannot open the CUDA IPC handle of {name} (owner pid {manifest.owner_pid}): "
                                  f"{exc}") from exc
        for spec in manifest.tensors:
            t = tensors.get(spec.name)
            if t is None or tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
                raise AttachError(f"CUDA handle for {spec.name} does not match the manifest")
        return manifest, tensors
    raise AttachError(f"unknown transport {manifest.transport!r} in weights manifest")
