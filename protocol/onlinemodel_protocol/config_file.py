"""Reading a file that configures the runtime (the guard file, the anchor file): YAML or JSON, bounded in
size, validated by a pydantic model, every problem reported in one message that names `source` and the field.

Pure pydantic plus PyYAML, so the operator validates a ConfigMap's key with it and without torch.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """A part of a config file: immutable, unknown keys refused (a typo is an error, not a default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_config_file(text: str | bytes, model: type[Model], *, source: str, max_bytes: int, what: str, shape: str,
                      error: type[ValueError]) -> Model:
    """`text` (YAML or JSON) validated as `model`; `error` naming `source` otherwise (`what`: the file's name
    for a problem of the whole file; `shape`: what its top level must be, for a file that is not a mapping)."""
    import yaml

    if len(text) > max_bytes:
        raise error(f"{source}: larger than {max_bytes} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not YAML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{source}: must be a mapping with {shape}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors(include_url=False))
        raise error(f"{source}: {problems}") from None
