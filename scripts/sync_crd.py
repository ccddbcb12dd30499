#!/usr/bin/env python3
"""Copy the OnlineModel CRD into the Helm chart, or check that the chart's copy is current.

The chart renders the CRD from a template (so `helm upgrade` updates it), and a template can only read
files inside the chart, so the chart keeps a copy of crds/onlinemodel.dev_onlinemodels.yaml.

    python scripts/sync_crd.py          # copy crds/... -> charts/onlinemodel/files/...
    python scripts/sync_crd.py --check  # exit 1 if the copy differs (what CI's test checks)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CRD_NAME = "onlinemodel.dev_onlinemodels.yaml"
SOURCE = REPO / "crds" / CRD_NAME
CHART_COPY = REPO / "charts" / "onlinemodel" / "files" / CRD_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the copy is stale")
    args = parser.parse_args(argv)
    if not SOURCE.is_file():
        print(f"error: {SOURCE.relative_to(REPO)} does not exist", file=sys.stderr)
        return 2
    source = SOURCE.read_bytes()
    current = CHART_COPY.read_bytes() if CHART_COPY.is_file() else None
    if args.check:
        if current != source:
            print(f"{CHART_COPY.relative_to(REPO)} is stale: run python scripts/sync_crd.py", file=sys.stderr)
            return 1
        print("chart CRD copy is current")
        return 0
    if current == source:
        print("chart CRD copy already current")
        return 0
    CHART_COPY.parent.mkdir(parents=True, exist_ok=True)
    CHART_COPY.write_bytes(source)
    print(f"copied {SOURCE.relative_to(REPO)} -> {CHART_COPY.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
