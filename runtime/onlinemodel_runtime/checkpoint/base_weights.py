"""The base model's safetensors, read tensor by tensor: what a checkpoint carries over unchanged.

A checkpoint holds the tensors the trainer has (its model) and, for the rest of the base model (a
multimodal model's vision tower, multi-token-prediction heads), the base files' own bytes. Only the
headers are parsed up front; each carried tensor is a view of a private read-only mapping of its file,
so the checkpoint writer streams it from disk in bounded chunks and no tensor is loaded whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError
from .safetensors_stream import DTYPE_TO_ST, INDEX_FILE, SINGLE_FILE, TensorSpec, read_header

ST_TO_DTYPE = {code: dtype for dtype, code in DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class _Entry:
    file: Path
    begin: int  # byte offset of the data in the file
    spec: TensorSpec


class BaseWeights:
    """Tensor name -> where its bytes are, for a model directory's safetensors (sharded or not)."""

    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries
        self._maps: dict[Path, torch.Tensor] = {}

    @classmethod
    def of(cls, model_dir: Path) -> BaseWeights:
        """The directory's safetensors weights; empty if it has none (e.g. served with random weights)."""
        model_dir = Path(model_dir)
        index = model_dir / INDEX_FILE
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{index}: unreadable weight index: {exc!r}") from exc
        else:
            files = [SINGLE_FILE] if (model_dir / SINGLE_FILE).is_file() else []
        entries: dict[str, _Entry] = {}
        for rel in files:
            path = model_dir / rel
            header, size = read_header(path)  # checked: header, then data filling the rest of the file
            data_start = size - max((e["data_offsets"][1] for n, e in header.items() if n != "__metadata__"),
                                    default=0)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype = ST_TO_DTYPE.get(entry["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, unknown here")
                entries[name] = _Entry(path, data_start + entry["data_offsets"][0],
                                       TensorSpec(name, dtype, tuple(entry["shape"])))
        return cls(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def specs(self, prefixes: tuple[str, ...], exclude: set[str]) -> list[TensorSpec]:
        """Specs of the tensors under `prefixes`, in file order, except the names in `exclude`."""
        return [e.spec for name, e in self._entries.items() if name.startswith(prefixes) and name not in exclude]

    def tensors(self, specs: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, CPU tensor mapped from its file) for each of `specs`; pages are read on access."""
        for spec in specs:
            entry = self._entries[spec.name]
            mapping = self._maps.get(entry.file)
            if mapping is None:
                size = entry.file.stat().st_size
                # shared=False: a private mapping, so nothing can write through to the base files.
                mapping = self._maps[entry.file] = torch.from_file(str(entry.file), shared=False, size=size,
                                                                   dtype=torch.uint8)
            data = mapping[entry.begin:entry.begin + spec.nbytes]
            yield spec.name, data.view(spec.dtype).view(spec.shape)
