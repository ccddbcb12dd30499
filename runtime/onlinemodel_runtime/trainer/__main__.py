"""``python -m onlinemodel_runtime.trainer --config JSON``: the trainer process.

Started and supervised by the endpoint plugin. Attaches to the weights the vLLM worker exported (once),
builds the Hugging Face model on them without copying, restores optimizer state and counters from the
latest checkpoint, then serves requests over ZMQ until its parent exits or asks it to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("onlinemodel.trainer")


def build_service(cfg, counters: dict | None = None):
    import torch

    from onlinemodel_runtime.weights import shared as shared_weights
    from onlinemodel_runtime.checkpoint import CheckpointError, CheckpointStore
    from onlinemodel_runtime.weights.hf_model import build_hf_model
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.trainer.service import TrainerService

    if cfg.trainer_threads:
        torch.set_num_threads(cfg.trainer_threads)
    manifest = shared_weights.wait_for_manifest(cfg.state_dir, cfg.trainer_start_timeout)
    manifest, tensors = shared_weights.attach_weights(cfg.state_dir, manifest)
    log.info("attached %d tensors (%s, %s) of %s", len(tensors), manifest.transport, manifest.dtype,
             manifest.model)
    model = build_hf_model(cfg.model, tensors, expected_dtype=shared_weights.dtype_from_name(manifest.dtype),
                           train=True)
    model.config.use_cache = False
    optimizer = make_optimizer(model, TrainPolicy(), lr=cfg.learning_rate, rank=cfg.optimizer_rank)
    optimizer.attach_to_backward()
    store = None
    if cfg.checkpoint_dir is not None:
        store = CheckpointStore(cfg.checkpoint_dir, keep_last=cfg.checkpoint_keep)
    service = TrainerService(cfg, model, optimizer, store)
    if store is not None:
        resume(service, store, device=next(iter(tensors.values())).device)
    if counters and counters.get("weight_version", 0) > service.weight_version:
        service.adopt_counters(counters)
    if store is not None:
        try:
            store.check_writable()
        except CheckpointError as exc:
            # Serving and training go on; every checkpoint attempt reports this until it is fixed.
            log.error("%s", exc)
            service.checkpoint_state = "failed"
            service.checkpoint_error = str(exc)
    return service


def resume(service, store, device) -> None:
    """Restore optimizer state and counters if vLLM serves the latest checkpoint's weights."""
    from onlinemodel_runtime.checkpoint import CheckpointError

    info = store.latest()
    if info is None:
        return
    if Path(service.cfg.model).resolve() != info.path.resolve():
        log.warning("checkpoint %s exists but vLLM serves %s: not restoring optimizer state",
                    info.path, service.cfg.model)
        return
    try:
        optimizer_state, trainer_state = store.load_training_state(info, map_location=device)
    except CheckpointError as exc:
        log.warning("cannot read training state of %s (%s): starting with fresh optimizer state", info.path, exc)
        return
    saved_rank = (optimizer_state or {}).get("param_groups", [{}])[0].get("rank")
    if optimizer_state is not None and saved_rank not in (None, service.cfg.optimizer_rank):
        log.warning("checkpoint optimizer state has rank %s, configured rank is %s: starting it fresh",
                    saved_rank, service.cfg.optimizer_rank)
        optimizer_state = None
    if optimizer_state is not None:
        try:
            service.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            log.warning("optimizer state of %s does not fit this model (%s): starting it fresh", info.path, exc)
    service.load_state_dict(trainer_state)
    service.last_checkpoint = info.to_status()
    log.info("resumed from %s: step %d, weight version %d", info.path, service.steps, service.weight_version)


def main(argv: list[str] | None = None) -> int:
    from onlinemodel_runtime.config import RuntimeConfig
    from onlinemodel_runtime.trainer.server import serve

    parser = argparse.ArgumentParser(prog="onlinemodel-trainer")
    parser.add_argument("--config", required=True, help="RuntimeConfig as JSON")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--counters", default="{}", help="counters the supervisor saw before a restart (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[onlinemodel trainer %(process)d] %(levelname)s %(message)s")
    cfg = RuntimeConfig.model_validate_json(args.config)
    try:
        service = build_service(cfg, json.loads(args.counters))
    except Exception as exc:
        log.exception("trainer failed to start")
        print(f"onlinemodel trainer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    service.start()
    asyncio.run(serve(service, cfg.trainer_endpoint, parent_pid=args.parent_pid or os.getppid()))
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
