"""The learner -> follower weight stream: what a published version is, and what each side reports.

A published version is one snapshot of every tensor training changes (the trainable parameters, under
their Hugging Face names), taken under the trainer's weights lock. ``GET /replication/manifest`` answers a
``Snapshot`` (without the learner-local file); ``GET /replication/tensors?version=V&start=I`` streams
tensor frames I.. of that version. A frame is: the length of its JSON header as 8 bytes little-endian, the
header (``FrameHeader``), then ``nbytes`` raw bytes of the tensor (C order, the dtype's native
little-endian layout). No pickle anywhere. ``docs/api.md`` documents the routes.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from onlinemodel_protocol.limits import REPLICAS_MAX

FRAME_LENGTH_BYTES = 8
# A follower's readiness route: 200 once it applied a version of the learner (the operator probes it).
READY_PATH = "/replication/ready"
# Follower names as the learner lists them: a pod name (DNS-1123 subdomain).
FOLLOWER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

ReplicationRole = Literal["learner", "follower"]


class _Body(BaseModel):
    # As the API's bodies: readers ignore fields a newer runtime adds.
    model_config = ConfigDict(extra="ignore")


class FrameHeader(_Body):
    index: int = Field(ge=0)
    name: str
    dtype: str
    shape: list[int]
    nbytes: int = Field(ge=0)


class SnapshotTensor(FrameHeader):
    offset: int = Field(ge=0)  # where the tensor's frame starts in the version's stream


class Snapshot(_Body):
    """One published weight version."""

    weight_version: int = Field(ge=0)
    created_at: str
    tensors: list[SnapshotTensor]
    total_bytes: int = Field(ge=0)  # of the whole stream, frames included
    lock_seconds: float = Field(ge=0)  # training paused this long while the tensors were copied out
    write_seconds: float = Field(ge=0)  # the whole publication, the copy included


class FollowerState(_Body):
    """A follower as the learner last heard of it (each follower reports when it asks for the manifest)."""

    name: str
    weight_version: int = Field(ge=0)
    lag_versions: int = Field(0, ge=0)
    lag_seconds: float = Field(0.0, ge=0)  # since the learner first had a version the follower lacks
    last_seen: str
    last_sync_seconds: float | None = Field(None, ge=0)
    last_sync_bytes: int | None = Field(None, ge=0)


class ReplicationStatus(_Body):
    """``replication`` in ``GET /train/status``: the learner's published version and its followers, or a
    follower's view of its learner."""

    role: ReplicationRole
    published: Snapshot | None = None  # learner: the latest published version (tensor list left out)
    followers: list[FollowerState] = Field(default_factory=list, max_length=10 * REPLICAS_MAX)
    learner: str | None = None  # follower: the learner's URL
    learner_version: int | None = Field(None, ge=0)  # follower: the learner's latest published version
    synced: bool = False  # follower: applied at least one version of the learner
    last_sync_seconds: float | None = Field(None, ge=0)
    last_sync_bytes: int | None = Field(None, ge=0)
    last_sync_time: str | None = None
    resumed_transfers: int = Field(0, ge=0)  # follower: streams resumed after a broken connection
    last_error: str | None = None  # the last failed publication (learner) or sync (follower)
