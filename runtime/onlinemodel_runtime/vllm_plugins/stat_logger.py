"""The ``vllm.stat_logger_plugins`` entry: every gap between a stream's tokens, for the pacing governor.

vLLM loads stat-logger plugins in the API server process (``AsyncLLM``) and makes one logger per engine
(data-parallel rank) of that server; its output handler calls ``record`` on the event loop after each
batch of engine outputs, with the batch's ``IterationStats``. We hand each batch's token gaps to
``server/token_gaps.FEED``, which passes them on only while onlinemodel's pacing governor is attached: a
vLLM that merely has this package installed records nothing. (vLLM computes its iteration stats whenever a
stat-logger plugin is loaded, even under ``--disable-log-stats``; ``VLLM_PLUGINS`` without
``onlinemodel_token_gaps`` leaves this one out.)
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from onlinemodel_runtime.server.token_gaps import FEED
from onlinemodel_runtime.vllm_plugins import compat


class TokenGapLogger(StatLoggerBase):
    """Per-engine stat logger: vLLM calls ``TokenGapLogger(vllm_config, engine_index)``."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.engine_index = engine_index
        self._gaps = compat.iteration_token_gaps_reader()
        if self._gaps is not None:
            FEED.loggers += 1  # the governor measures only where a logger feeds it

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if FEED.sink is not None and iteration_stats is not None and self._gaps is not None:
            FEED.add(self._gaps(iteration_stats))

    def log_engine_initialized(self) -> None:
        pass  # nothing to log: the figures appear in /train/status and /metrics
