"""Stream tensors into Hugging Face-layout safetensors files, one tensor at a time.

The safetensors header (names, dtypes, shapes, byte offsets) must precede the data, so the writer
takes every tensor's spec first and then receives the tensors one by one, in spec order. Each
tensor is copied to host memory in bounded chunks (a CUDA tensor through one reusable staging
buffer) and written straight to disk: no copy of the whole model ever exists, on the host or the
device. Files are sharded HF-style (`model-00001-of-00003.safetensors` plus
`model.safetensors.index.json`) or written as one `model.safetensors`; each file's sha256 is
computed from the bytes as they are written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .errors import CheckpointError
from .fsutil import write_all

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Hugging Face's historical default shard size ("5GB", decimal).
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
# Host bytes copied per step; bounds the staging buffer (and host RAM) whatever the tensor size.
DEFAULT_CHUNK_BYTES = 64 << 20
# Chunks at least this big are hashed on a helper thread while being written.
_OVERLAP_MIN_BYTES = 1 << 20
# A header larger than this is not a real safetensors file (the Rust reader uses the same limit).
_MAX_HEADER_BYTES = 100_000_000

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _code
ST_ITEMSIZE: dict[str, int] = {code: torch.empty((), dtype=dt).element_size()
                               for dt, code in DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about one tensor before its bytes arrive."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == "__metadata__":
            raise CheckpointError(f"invalid tensor name {self.name!r}")
        if self.dtype not in DTYPE_TO_ST:
            raise CheckpointError(f"tensor {self.name!r}: dtype {self.dtype} has no safetensors code")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise CheckpointError(f"tensor {self.name!r}: invalid shape {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(name, tensor.dtype, tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[DTYPE_TO_ST[self.dtype]]


def specs_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """Specs for (name, tensor) pairs; reads only metadata, never tensor data."""
    return [TensorSpec.of(name, t) for name, t in tensors]


@dataclass(frozen=True)
class WrittenFile:
    name: str  # path relative to the model directory
    size: int
    sha256: str


@dataclass(frozen=True)
class WeightFiles:
    """What the writer produced: weight files (in shard order), the optional index, totals."""

    files: tuple[WrittenFile, ...]
    index: WrittenFile | None
    tensor_bytes: int
    num_tensors: int

    @property
    def content_hash(self) -> str:
        """sha256 over the weight files' (name, size, sha256): equal weights give equal hashes."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.name}\t{f.size}\t{f.sha256}\n".encode())
        return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class _Shard:
    filename: str
    first: int  # index into specs of its first tensor
    stop: int  # one past its last tensor
    header: bytes  # 8-byte length prefix + padded JSON


def _encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        end = offset + spec.nbytes
        header[spec.name] = {"dtype": DTYPE_TO_ST[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces to 8 bytes so the data (and every 8-byte dtype after it) stays aligned.
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int,
                metadata: Mapping[str, str]) -> list[_Shard]:
    """Cut specs, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    groups: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, spec in enumerate(specs):
        if i > start and size + spec.nbytes > max_shard_bytes:
            groups.append((start, i))
            start, size = i, 0
        size += spec.nbytes
    groups.append((start, len(specs)))
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    return [_Shard(name, a, b, _encode_header(specs[a:b], metadata)) for name, (a, b) in zip(names, groups)]


class SafetensorsStreamWriter:
    """Write `specs` into `directory` as HF safetensors; feed tensors with `write` in spec order.

    Usage: `with SafetensorsStreamWriter(d, specs) as w: for n, t in pairs: w.write(n, t)`, then
    `w.result`. Files are closed but not fsynced (the caller syncs the whole directory once).
    On error or an incomplete stream the context manager closes the open file; removing the
    directory is the caller's job.
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not specs:
            raise CheckpointError("no tensors to write")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointError(f"duplicate tensor names: {dup[:5]}")
        if max_shard_bytes <= 0 or chunk_bytes <= 0:
            raise CheckpointError("max_shard_bytes and chunk_bytes must be positive")
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self._dir = Path(directory)
        self._specs = list(specs)
        self._shards = plan_shards(self._specs, max_shard_bytes, meta)
        self._chunk = int(chunk_bytes)
        self._next = 0  # index of the next expected tensor
        self._shard_no = -1
        self._fd = -1
        self._digest = hashlib.sha256()
        self._size = 0
        self._written: list[WrittenFile] = []
        self._staging: torch.Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.result: WeightFiles | None = None

    @property
    def expected_name(self) -> str | None:
        return self._specs[self._next].name if self._next < len(self._specs) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise CheckpointError(f"unexpected tensor {name!r}: all {len(self._specs)} tensors already written")
        spec = self._specs[self._next]
        if name != spec.name:
            raise CheckpointError(f"tensor #{self._next} is {name!r} but the specs expect {spec.name!r} "
                                  "(tensors must arrive in spec order)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)} but its spec "
                                  f"says {spec.dtype}{spec.shape}")
        if self._fd < 0:
            self._open_next_shard()
        for chunk in self._host_chunks(tensor):
            if len(chunk) >= _OVERLAP_MIN_BYTES:
                # sha256 and write(2) both release the GIL: hash on a helper thread while this
                # one writes the same (read-only) bytes; wait before the buffer is reused.
                hashed = self._hasher().submit(self._digest.update, chunk)
                try:
                    write_all(self._fd, chunk)
                finally:
                    hashed.result()
            else:
                self._digest.update(chunk)
                write_all(self._fd, chunk)
            self._size += len(chunk)
        self._next += 1
        if self._next == self._shards[self._shard_no].stop:
            self._close_shard()
        if self._next == len(self._specs):
            self._finish()

    def write_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightFiles:
        for name, tensor in tensors:
            self.write(name, tensor)
        return self.close()

    def close(self) -> WeightFiles:
        if self.result is None:
            missing = [s.name for s in self._specs[self._next:]]
            self.abort()
            raise CheckpointError(f"{len(missing)} tensor(s) never arrived, first {missing[:3]}")
        return self.result

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._release()

    def _release(self) -> None:
        self._staging = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _hasher(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-sha256")
        return self._pool

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.result is None:
            self.abort()

    # -- internals -------------------------------------------------------------------------

    def _open_next_shard(self) -> None:
        self._shard_no += 1
        shard = self._shards[self._shard_no]
        self._fd = os.open(self._dir / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._digest = hashlib.sha256(shard.header)
        write_all(self._fd, shard.header)
        self._size = len(shard.header)

    def _close_shard(self) -> None:
        shard = self._shards[self._shard_no]
        os.close(self._fd)
        self._fd = -1
        self._written.append(WrittenFile(shard.filename, self._size, self._digest.hexdigest()))

    def _finish(self) -> None:
        self._release()
        index = None
        if len(self._shards) > 1:
            weight_map = {s.name: shard.filename for shard in self._shards
                          for s in self._specs[shard.first:shard.stop]}
            total = sum(s.nbytes for s in self._specs)
            body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                              indent=2, sort_keys=True).encode() + b"\n"
            fd = os.open(self._dir / INDEX_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, body)
            finally:
                os.close(fd)
            index = WrittenFile(INDEX_FILE, len(body), hashlib.sha256(body).hexdigest())
        self.result = WeightFiles(tuple(self._written), index, sum(s.nbytes for s in self._specs),
                                  len(self._specs))

    def _host_chunks(self, tensor: torch.Tensor) -> Iterator[memoryview]:
        """Yield the tensor's bytes as host memoryviews of at most chunk_bytes each."""
        t = tensor.detach()
        if t.device.type == "meta":
            raise CheckpointError("meta tensors have no data to save")
        if t.numel() == 0:
            return
        if not t.is_contiguous():
            # Rare for weights (un-merged packed weights are row slices, hence contiguous); copying
            # this one tensor to the host keeps device memory flat.
            t = t.to("cpu").contiguous()
        flat = t.reshape(-1).view(torch.uint8)
        on_host = flat.device.type == "cpu"
        for start in range(0, flat.numel(), self._chunk):
            piece = flat[start:start + self._chunk]
            if not on_host:
                piece = self._stage(piece)
            yield memoryview(piece.numpy())

    def _stage(self, piece: torch.Tensor) -> torch.Tensor:
        """Copy a device chunk into the reusable (pinned when possible) host buffer; synchronous."""
        if self._staging is None:
            pin = piece.device.type == "cuda"
            self._staging = torch.empty(self._chunk, dtype=torch.uint8, pin_memory=pin)
        out = self._staging[:piece.numel()]
        out.copy_(piece)
        return out


def write_safetensors(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      specs: Sequence[TensorSpec] | None = None, **kwargs) -> WeightFiles:
    """Write (name, tensor) pairs to `directory`; without `specs`, `tensors` must be re-iterable."""
    if specs is None:
        tensors = list(tensors)  # (name, view) pairs only: no tensor data is copied
        specs = specs_of(tensors)
    with SafetensorsStreamWriter(Path(directory), specs, **kwargs) as writer:
        return writer.write_all(tensors)


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors file's header; return (header, size of the whole file).

    Checks what a truncated or overwritten file breaks: the length prefix, the JSON, offsets
    that tile the data region exactly, and the file size those offsets imply.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            itemsize = ST_ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad header entry for {name!r}: {exc!r}") from exc
        if end - begin != count * itemsize:
            raise CheckpointError(f"{path}: {name!r} spans {end - begin} bytes, expected {count * itemsize}")
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: data of {name!r} starts at {begin}, expected {cursor}")
        cursor = end
    if 8 + n + cursor != size:
        raise CheckpointError(f"{path}: file is {size} bytes but its header describes {8 + n + cursor}")
    return header, size
