"""The ``vllm.general_plugins`` entry: runs in every vLLM process, the engine's worker included.

``register()`` makes CPU inference read the live weight tensors (see ``compat``). The export of
the weights happens through :class:`WeightExportExtension`, which ``onlinemodel serve`` installs with
vLLM's supported ``--worker-extension-cls`` option; the endpoint plugin calls it with
``engine_client.collective_rpc`` once the engine has loaded the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register() -> None:
    # vLLM calls this in each of its processes, possibly more than once: it must be idempotent.
    from onlinemodel_runtime.vllm_plugins import compat

    compat.install_live_cpu_linears()


class WeightExportExtension:
    """Mixed into vLLM's worker class (``onlinemodel_protocol.rpc.WORKER_EXTENSION_CLS``); its methods are
    reachable through ``collective_rpc`` (``EXPORT_WEIGHTS_METHOD`` names the one below)."""

    def onlinemodel_export_weights(self, state_dir: str) -> dict:
        """Export this worker's parameters (its tensor-parallel shard) for the trainer; answers
        ``onlinemodel_protocol.rpc.WeightsExported``."""
        from onlinemodel_protocol.rpc import WeightsExported
        from onlinemodel_runtime.vllm_plugins import compat
        from onlinemodel_runtime.weights import shared

        model_config = self.vllm_config.model_config  # type: ignore[attr-defined]
        if self.vllm_config.parallel_config.pipeline_parallel_size != 1:  # type: ignore[attr-defined]
            raise RuntimeError("onlinemodel trains the served weights in place: pipeline parallel size must be 1 "
                               "(tensor parallelism is supported)")
        if not compat.live_cpu_linears_installed():
            raise RuntimeError("onlinemodel's general plugin did not load in vLLM's worker (is "
                               "'onlinemodel_weights' in VLLM_PLUGINS?): CPU inference would read stale "
                               "prepacked weights")
        model = self.get_model()  # type: ignore[attr-defined]
        compat.check_live_weights(model)
        archs = getattr(model_config.hf_config, "architectures", None) or ["unknown"]
        shard = compat.worker_shard(self.vllm_config)  # type: ignore[attr-defined]
        manifest = shared.export_weights(
            model.named_parameters(),
            Path(state_dir),
            model=str(model_config.model),
            architecture=archs[0],
            vllm_version=compat.vllm_version(),
            shard=shard,
        )
        log.info("onlinemodel: exported %d tensors (%s, tensor-parallel rank %d of %d) to %s", len(manifest.tensors),
                 manifest.transport, shard.tp_rank, shard.tp_size, shard.state_dir(Path(state_dir)))
        return WeightsExported(shard=shard, transport=manifest.transport,
                               tensors=len(manifest.tensors)).model_dump()
