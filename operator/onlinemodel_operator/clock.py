"""Time as the status and the Kubernetes API write it: UTC, RFC 3339 to the second, with a 'Z'."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> Optional[dt.datetime]:
    """An RFC 3339 / ISO 8601 time (naive means UTC), or None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
