"""The names vLLM finds the plugins by: pyproject's entry points, the protocol's names, the real objects."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

from onlinemodel_protocol.rpc import (ENDPOINT_PLUGIN, EXPORT_WEIGHTS_METHOD, GENERAL_PLUGIN, STAT_LOGGER_PLUGIN,
                                      WORKER_EXTENSION_CLS)

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())


def _load(target: str):
    module, _, attr = target.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_entry_points_are_the_protocol_names_and_load():
    entry_points = PYPROJECT["project"]["entry-points"]
    assert list(entry_points["vllm.general_plugins"]) == [GENERAL_PLUGIN]
    assert list(entry_points["vllm.endpoint_plugins"]) == [ENDPOINT_PLUGIN]
    assert callable(_load(entry_points["vllm.general_plugins"][GENERAL_PLUGIN]))
    assert _load(entry_points["vllm.endpoint_plugins"][ENDPOINT_PLUGIN])().name == ENDPOINT_PLUGIN
    assert list(entry_points["vllm.stat_logger_plugins"]) == [STAT_LOGGER_PLUGIN]
    from vllm.v1.metrics.loggers import StatLoggerBase  # what vLLM's loader demands of the class

    assert issubclass(_load(entry_points["vllm.stat_logger_plugins"][STAT_LOGGER_PLUGIN]), StatLoggerBase)


def test_worker_extension_has_the_export_method():
    assert callable(getattr(_load(WORKER_EXTENSION_CLS), EXPORT_WEIGHTS_METHOD))
