"""Tests that need a CUDA GPU. They are collected only when the marker expression names `gpu`
(`make test-gpu`: `pytest -q -m gpu tests/gpu`), so `make test` on a CPU-only CI machine never
collects them, not even as skips. Where they are asked for, a missing GPU is a failure."""

from __future__ import annotations

import pytest
import torch


def pytest_ignore_collect(collection_path, config):
    if "gpu" not in (config.getoption("markexpr") or ""):
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def _cuda_present() -> None:  # session scope: checked before any module starts a server
    assert torch.cuda.is_available(), "the GPU tests need a CUDA device: run them where one is"
