"""Start-up choices of the trainer process: recomputation by device, the pacer on the load signal."""

from __future__ import annotations

import pytest
import torch

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_runtime.server.load_signal import LoadSignalWriter
from onlinemodel_runtime.trainer.__main__ import activation_recompute, make_pacer

from trainer_fixtures import tiny_llama


def config(tmp_path, **kw) -> RuntimeConfig:
    return RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path, **kw)


@pytest.mark.parametrize("setting,device,expected", [
    (None, "cuda", True), (None, "cpu", False), (True, "cpu", True), (False, "cuda", False)])
def test_recomputation_defaults_to_the_gpu(tmp_path, setting, device, expected):
    assert activation_recompute(config(tmp_path, activation_recompute=setting), torch.device(device)) is expected


def test_pacer_follows_the_signal_and_the_budget(tmp_path):
    model = tiny_llama(layers=1)
    assert make_pacer(config(tmp_path), model, torch.device("cpu")) is None  # no signal: not paced
    LoadSignalWriter.create(tmp_path / "load-signal", mode="measured", duty=0.2, max_decode_slowdown=1.25)
    pacer = make_pacer(config(tmp_path), model, torch.device("cpu"))
    assert pacer.enabled and pacer.status().mode == "measured"
    assert any(m._forward_pre_hooks for m in model.modules())
    pacer.remove()
    off = make_pacer(config(tmp_path, max_decode_slowdown=0), model, torch.device("cpu"))
    assert not off.enabled and off.status().mode == "off"
    assert not any(m._forward_pre_hooks for m in model.modules())
