"""The OnlineModel resource: the root of its CRD schema, the one class `crd.py` generates the CRD from.

It checks metadata's name and holds the spec (`models_spec`) and the status (`models_status`); `models_base`
says how these models and the generated CRD stay one.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import ConfigDict, Field, model_validator

from onlinemodel_operator.models_base import FrozenCamelModel, cel
from onlinemodel_operator.models_spec import OnlineModelSpec
from onlinemodel_operator.models_status import OnlineModelStatus

MAX_NAME_LENGTH = 63
RESOURCE_NAME_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class ObjectMeta(FrozenCamelModel):
    """The part of metadata the schema checks (the API server owns the rest)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="allow")
    name: Optional[str] = None


class OnlineModel(FrozenCamelModel):
    """The whole resource (root of the CRD schema)."""

    CEL = (cel(f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{RESOURCE_NAME_RE}')",
               f"metadata.name must be a DNS-1035 label (lower case letters, digits, '-', starting with a letter) "
               f"of at most {MAX_NAME_LENGTH} characters: it names the pod, the Service and the volume"),)
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")
    api_version: Optional[str] = None
    kind: Optional[str] = None
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: OnlineModelSpec
    status: Optional[OnlineModelStatus] = None

    @model_validator(mode="after")
    def _name(self) -> "OnlineModel":
        error = name_error(self.metadata.name) if self.metadata.name is not None else None
        if error:
            raise ValueError(error)
        return self


def name_error(name: str) -> Optional[str]:
    """Why `name` cannot name an OnlineModel (its pod, Service and claim take the name), or None."""
    if len(name) > MAX_NAME_LENGTH or not re.match(RESOURCE_NAME_RE, name):
        return OnlineModel.CEL[0]["message"]
    return None
