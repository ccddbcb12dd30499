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


def build_service(cfg, counters=None, shard=None, tp_init=None):
    """Rank 0 (the only rank at tensor parallel size 1): the TrainerService. Ranks > 0 of a tensor-parallel
    group (`shard`, joined through `tp_init`): their `TensorParallelGroup`, which follows rank 0."""
    import torch
    from transformers import AutoConfig

    from onlinemodel_protocol.rpc import WorkerShard
    from onlinemodel_runtime.checkpoint import CheckpointStore
    from onlinemodel_runtime.trainer.service import TrainerService
    from onlinemodel_runtime.weights import shared
    from onlinemodel_runtime.weights.hf_model import build_hf_model
    from onlinemodel_runtime.weights.layouts import layout_for

    shard = shard or WorkerShard()
    if cfg.trainer_threads:
        torch.set_num_threads(cfg.trainer_threads)
    weights_dir = shard.state_dir(cfg.state_dir)
    manifest = shared.wait_for_manifest(weights_dir, cfg.trainer_start_timeout)
    if manifest.shard != shard:
        raise shared.AttachError(f"{weights_dir} holds tensor-parallel rank {manifest.shard.tp_rank} of "
                                 f"{manifest.shard.tp_size}, this trainer is rank {shard.tp_rank} of {shard.tp_size}")
    manifest, tensors = shared.attach_weights(weights_dir, manifest)
    log.info("attached %d tensors (%s, %s, rank %d of %d) of %s", len(tensors), manifest.transport, manifest.dtype,
             shard.tp_rank, shard.tp_size, manifest.model)
    dtype = shared.dtype_from_name(manifest.dtype)
    group = tp_layout = None
    if shard.tp_size == 1:
        model = build_hf_model(cfg.model, tensors, expected_dtype=dtype, train=True)
    else:
        from onlinemodel_runtime.trainer.tp_group import TensorParallelGroup
        from onlinemodel_runtime.weights.tp_model import build_tp_rank_model
        from onlinemodel_runtime.weights.tp_shards import tp_layout_for

        refuse_under_tensor_parallelism(cfg)
        tp_layout = tp_layout_for(AutoConfig.from_pretrained(cfg.model), shard.tp_size)
        group = TensorParallelGroup(shard, tp_init, next(iter(tensors.values())).device)
        model = build_tp_rank_model(tp_layout.layout.hf_config, tensors, shard.tp_rank, shard.tp_size, group.group,
                                    expected_dtype=dtype, train=True)
    model.config.use_cache = False
    device = next(model.parameters()).device
    if activation_recompute(cfg, device):
        # Non-reentrant: each layer is recomputed in backward before any of its gradients exist, so the
        # optimizer's per-layer updates never reach a weight its recomputation still reads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_trainer_optimizer(cfg, model, tp_layout, group.group if group else None)
    if group is not None:
        group.bind(model, optimizer, tp_layout, tensors)
        if shard.tp_rank > 0:
            return group
        group.start_heartbeat()
    store = None
    if cfg.checkpoint_dir is not None:
        # Checkpoints take the base checkpoint's names (a multimodal model's, experts one by one).
        names = layout_for(AutoConfig.from_pretrained(cfg.model)).checkpoint_names
        store = CheckpointStore(cfg.checkpoint_dir, keep_last=cfg.checkpoint_keep, names=names)
    service = TrainerService(cfg, model, optimizer, store, pacer=make_pacer(cfg, model, device),
                             probes=make_probes(cfg), tp=group,
                             anchors=None if group is not None else make_anchors(cfg))
    service.restore(counters)
    return service


def make_trainer_optimizer(cfg, model, tp_layout=None, group=None):
    """The optimizer, built here only. Under tensor parallelism (`tp_layout`, the ranks' `group`) every rank
    builds it over its shard with the context that makes it compute TP=1's update (optim/tensor_parallel.py)."""
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer

    tp = {}
    if tp_layout is not None:
        from onlinemodel_runtime.optim.tensor_parallel import TensorParallel

        tp = {"tp": TensorParallel.from_layout(tp_layout, group)}
    optimizer = make_optimizer(model, TrainPolicy(), lr=cfg.learning_rate, rank=cfg.optimizer_rank,
                               rounding=cfg.weight_rounding, **tp)
    optimizer.attach_to_backward()
    return optimizer


def refuse_under_tensor_parallelism(cfg) -> None:
    """What a tensor-parallel trainer cannot do yet (docs/tensor-parallel.md, "What is left"): refused at
    start (EXIT_PERMANENT) rather than done wrong on one rank's shard."""
    if cfg.guard is not None:
        raise ValueError("under tensor parallelism the trainer does not support the guard (--guard) yet")


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
    """The anchor term's conversations (built-in and --anchor-file) in the served model's chat template, which
    the null-space projection also reads; None when both are off. ValueError (refused at start) if one of the
    file's does not fit."""
    if not cfg.anchor_weight and not cfg.null_space_energy:
        return None
    from transformers import AutoTokenizer

    from onlinemodel_runtime.trainer.anchor import encode_anchors

    return encode_anchors(AutoTokenizer.from_pretrained(cfg.model), cfg.anchor_file)


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
