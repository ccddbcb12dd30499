"""The files `onlinemodel serve` reads at start from ConfigMap keys the spec names: the guard file
(spec.training.guard, --guard) and the anchor file (spec.training.anchors, --anchor-file).

One table: each is checked by the runtime's own parser before the pod starts (a missing ConfigMap or key, or a
bad file, refuses the spec with the parser's words), mounted read-only into the learner's pod (never a
follower's: followers do not train), passed by its flag, and its text is part of the spec hash (an edit
replaces the pod, which reads it only at start).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from onlinemodel_operator.models_spec import ConfigMapKeyRef, OnlineModelSpec
from onlinemodel_protocol.anchors import parse_anchor_file
from onlinemodel_protocol.guard import parse_guard_file


@dataclass(frozen=True)
class ConfigFile:
    field: str  # of spec.training, whose configMapRef names the ConfigMap key
    flag: str  # of `onlinemodel serve`
    volume: str  # the pod's volume name
    dir: str  # where it is mounted
    file: str  # the file's name there
    parse: Callable[..., Any]  # the runtime's parser: (text, source=...) -> the file, or ValueError
    hash_key: str  # under which its text's hash enters the spec hash

    @property
    def path(self) -> str:
        return f"{self.dir}/{self.file}"


GUARD = ConfigFile("guard", "--guard", "guard", "/etc/onlinemodel/guard", "guard.yaml", parse_guard_file, "guardFile")
ANCHORS = ConfigFile("anchors", "--anchor-file", "anchors", "/etc/onlinemodel/anchors", "anchors.yaml",
                     parse_anchor_file, "anchorFile")
CONFIG_FILES = (GUARD, ANCHORS)


def config_file_refs(spec: OnlineModelSpec) -> list[tuple[ConfigFile, ConfigMapKeyRef]]:
    """The config files this spec's learner reads (none when training is off), with their ConfigMap keys."""
    if not spec.training.enabled:
        return []
    return [(f, section.config_map_ref) for f in CONFIG_FILES
            if (section := getattr(spec.training, f.field)) is not None]


def config_file_error(file: ConfigFile, text: Optional[str], namespace: str, ref: ConfigMapKeyRef) -> Optional[str]:
    """Why the file `text` (the key `ref` of the ConfigMap; None if either is missing) cannot be used, or None."""
    where = f"spec.training.{file.field}.configMapRef: ConfigMap {namespace}/{ref.name}"
    if text is None:
        return f"{where} does not exist or has no key {ref.key!r}"
    try:
        file.parse(text, source=f"{where} key {ref.key!r}")
    except ValueError as exc:  # GuardFileError, AnchorFileError
        return str(exc)
    return None


def config_file_volumes(spec: OnlineModelSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the pod's volumes, the container's mounts) of the config files."""
    refs = config_file_refs(spec)
    volumes = [{"name": f.volume, "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": f.file}]}}
               for f, ref in refs]
    mounts = [{"name": f.volume, "mountPath": f.dir, "readOnly": True} for f, _ in refs]
    return volumes, mounts


def config_file_args(spec: OnlineModelSpec) -> list[str]:
    return [a for f, _ in config_file_refs(spec) for a in (f.flag, f.path)]


def config_file_hashes(files: Mapping[str, str]) -> dict[str, str]:
    """The spec hash's entries for the texts of the config files (`files`: by field)."""
    return {f.hash_key: hashlib.sha256(files[f.field].encode()).hexdigest() for f in CONFIG_FILES if f.field in files}
