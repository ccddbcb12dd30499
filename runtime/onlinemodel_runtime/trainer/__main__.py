"""``python -m onlinemodel_runtime.trainer --config JSON``: the trainer process.

Started and supervised by ``server/supervisor.py`` in vLLM's API server. Attaches to the weights the vLLM
worker exported (once), builds the Hugging Face model on them without copying, restores optimizer state
and counters (``TrainerService.restore``), then serves requests over ZMQ until its parent exits or asks it
to stop.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("onlinemodel.trainer")


def build_service(cfg, counters=None):
    import torch
    from transformers import AutoConfig

    from onlinemodel_runtime.checkpoint import CheckpointStore
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.trainer.service import TrainerService
    from onlinemodel_runtime.weights import shared
    from onlinemodel_runtime.weights.hf_model import build_hf_model
    from onlinemodel_runtime.weights.layouts import layout_for

    if cfg.trainer_threads:
        torch.set_num_threads(cfg.trainer_threads)
    manifest = shared.wait_for_manifest(cfg.state_dir, cfg.trainer_start_timeout)
    manifest, tensors = shared.attach_weights(cfg.state_dir, manifest)
    log.info("attached %d tensors (%s, %s) of %s", len(tensors), manifest.transport, manifest.dtype,
             manifest.model)
    model = build_hf_model(cfg.model, tensors, expected_dtype=shared.dtype_from_name(manifest.dtype), train=True)
    model.config.use_cache = False
    device = next(model.parameters()).device
    if activation_recompute(cfg, device):
        # Non-reentrant: each layer is recomputed in backward before any of its gradients exist, so the
        # optimizer's per-layer updates never reach a weight its recomputation still reads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, TrainPolicy(), lr=cfg.learning_rate, rank=cfg.optimizer_rank)
    optimizer.attach_to_backward()
    store = None
    if cfg.checkpoint_dir is not None:
        # Checkpoints take the base checkpoint's names (a multimodal model's, experts one by one).
        names = layout_for(AutoConfig.from_pretrained(cfg.model)).checkpoint_names
        store = CheckpointStore(cfg.checkpoint_dir, keep_last=cfg.checkpoint_keep, names=names)
    service = TrainerService(cfg, model, optimizer, store, pacer=make_pacer(cfg, model, device),
                             probes=make_probes(cfg), anchors=make_anchors(cfg))
    service.restore(counters)
    return service


def make_probes(cfg):
    """The guard file's probes, asked of the API server's vLLM; None without --guard."""
    if cfg.guard is None:
        return None
    from transformers import AutoTokenizer

    from onlinemodel_runtime.trainer.guard import ProbeSet
    from onlinemodel_runtime.trainer.served_answers import ServedAnswers

    if cfg.serving_url is None or cfg.served_model_name is None:
        raise ValueError("the guard asks vLLM its probes, but the API server's address is unknown "
                         "(vLLM serving on a Unix socket?)")
    return ProbeSet(cfg.guard, AutoTokenizer.from_pretrained(cfg.model),
                    ServedAnswers(cfg.serving_url, cfg.served_model_name))


def make_anchors(cfg):
    """The anchor term's conversations in the served model's chat template; None when it is off."""
    if not cfg.anchor_weight:
        return None
    from transformers import AutoTokenizer

    from onlinemodel_runtime.trainer.anchor import encode_anchors

    return encode_anchors(AutoTokenizer.from_pretrained(cfg.model))


def activation_recompute(cfg, device) -> bool:
    """Per-layer recomputation: as configured, else on a GPU (where activations are what limits an
    example's length) and not on CPU (where memory is plentiful and compute is not)."""
    return cfg.activation_recompute if cfg.activation_recompute is not None else device.type == "cuda"


def make_pacer(cfg, model, device):
    """The pacer on the API server's load signal, its hooks installed; None without a signal."""
    from onlinemodel_runtime.server.load_signal import LoadSignalError, LoadSignalReader
    from onlinemodel_runtime.trainer.pacing import Pacer

    try:
        signal = LoadSignalReader(cfg.load_signal_path)
    except LoadSignalError as exc:
        log.warning("no load signal (%s): training is not paced by serving", exc)
        return None
    pacer = Pacer.for_device(device, signal, enabled=cfg.pacing_enabled)
    pacer.install(model)
    return pacer


def main(argv: list[str] | None = None) -> int:
    from onlinemodel_runtime.trainer.server import run_process

    return run_process("trainer", build_service, argv)


if __name__ == "__main__":
    sys.exit(main())
