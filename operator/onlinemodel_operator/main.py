"""`onlinemodel-operator`: run the kopf operator with the OnlineModel handlers.

    onlinemodel-operator [-n NAMESPACE]... [--liveness URL] [--poll-interval S] [--verbose|--debug]

Without -n it watches all namespaces (or those in ONLINEMODEL_OPERATOR_NAMESPACES, comma-separated).
Single replica by design (the chart uses a Recreate Deployment), so kopf's peering is off (standalone).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onlinemodel-operator", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace to watch (repeatable; globs allowed); default: all namespaces")
    parser.add_argument("--liveness", default=DEFAULT_LIVENESS,
                        help=f"kopf liveness endpoint for the Deployment's probe (default {DEFAULT_LIVENESS}; '' to disable)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="seconds between polls of each pod's /train/status (default 10)")
    parser.add_argument("--checkpoint-timeout", type=float, default=None,
                        help="seconds a checkpoint before a pod restart may take (default 600)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", action="store_true", help="log more")
    verbosity.add_argument("--debug", action="store_true", help="log everything, kopf internals included")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import kopf

    from onlinemodel_operator import handlers  # noqa: F401  (registers the handlers with kopf)
    from onlinemodel_operator.config import OperatorConfig

    args = build_parser().parse_args(argv)
    config = OperatorConfig.from_env(os.environ, poll_interval=args.poll_interval,
                                     checkpoint_timeout=args.checkpoint_timeout,
                                     namespaces=tuple(args.namespace) or None)
    kopf.configure(verbose=args.verbose, debug=args.debug)
    if not args.debug:  # one line per API and runtime request is too much at the default level
        logging.getLogger("httpx").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=args.liveness or None,
        standalone=True,
        memo=kopf.Memo(config=config),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
