"""The shared base of the OnlineModel resource's frozen pydantic models, and the schema types they share.

The models are the one source of truth for the resource's schema, one declarative class per CRD object, the
way the CRD reads: `models_spec` holds the spec classes and `models_status` the status classes (neither
imports the other; both build on this module), and `models` the resource itself, the root of the schema.

`crd.py` generates the CRD's OpenAPI schema (types, bounds, defaults, descriptions, CEL rules) from these
classes, and a test checks that the CRD in `crds/` is exactly that output. Each CEL rule (`CEL` below, read
by the generator) has a Python twin in a `model_validator`, so the operator refuses the same specs the API
server refuses (kmock and old clusters do not run CEL); a test evaluates both on the same cases.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel

# Kubernetes quantity ("20Gi", "500m", 4): an int or a string; the string's form is checked by a pattern.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
Quantity = Union[int, Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)]]

# Field-level schema extras the generator copies into the CRD verbatim.
# (controller-gen writes resource.Quantity the same way)
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True}
PRESERVE_UNKNOWN = {"x-kubernetes-preserve-unknown-fields": True}
DATE_TIME = {"format": "date-time"}


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class FrozenCamelModel(BaseModel):
    """Base: frozen, camelCase aliases, unknown fields refused (the API server prunes them; kmock does not)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True, extra="forbid")
    # CEL rules of this object, as CRD `x-kubernetes-validations` entries.
    CEL: ClassVar[tuple[dict[str, str], ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

