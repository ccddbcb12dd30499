"""The KV cache size `onlinemodel serve` picks on CPU when the user picked none."""

from __future__ import annotations

import pytest

from onlinemodel_runtime import cpu_kv_cache
from onlinemodel_runtime.cpu_kv_cache import (GiB, KV_MAX, KV_MIN, choose_kv_cache_bytes, kv_cache_args,
                                              tensor_parallel_size, user_chose)


@pytest.mark.parametrize(("available", "weights", "training", "expected"), [
    (6 * GiB, GiB // 4, True, int((6 - 0.5 - 4) / 2 * GiB)),  # a busy laptop: 0.75 GiB
    (5 * GiB, 0, False, int((5 - 2) / 2 * GiB)),  # no trainer, no files known: 1.5 GiB
    (14 * GiB, GiB // 4, True, KV_MAX),  # plenty (this CI machine): capped
    (3 * GiB, GiB, True, KV_MIN),  # too little: the floor (and a warning)
])
def test_size_from_free_memory_weights_and_trainer(available, weights, training, expected):
    assert choose_kv_cache_bytes(available, weights, training) == expected


def test_a_users_choice_is_left_alone():
    assert user_chose(["--gpu-memory-utilization", "0.5"], {})
    assert user_chose(["--kv-cache-memory-bytes=1000000000"], {})
    assert user_chose([], {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert not user_chose(["--max-model-len", "1024"], {"VLLM_CPU_KVCACHE_SPACE": ""})


def test_args_only_on_cpu_and_only_without_a_choice(monkeypatch, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(cpu_kv_cache, "available_memory", lambda: 12 * GiB)
    monkeypatch.setattr(cpu_kv_cache, "on_cpu", lambda: True)
    flag, size = kv_cache_args(str(tmp_path), ["--model", "m"], training=True, env={})
    assert flag == "--kv-cache-memory-bytes" and int(size) == choose_kv_cache_bytes(12 * GiB, 1000, True)
    assert kv_cache_args(str(tmp_path), ["--gpu-memory-utilization", "0.9"], training=True, env={}) == []
    monkeypatch.setattr(cpu_kv_cache, "on_cpu", lambda: False)
    assert kv_cache_args(str(tmp_path), [], training=True, env={}) == []


def test_tensor_parallel_workers_share_the_memory():
    # Each worker gets the size asked for and, with its trainer, its own reserve.
    assert choose_kv_cache_bytes(20 * GiB, GiB, True, tp_size=3) == (20 * GiB - 2 * GiB - 3 * 4 * GiB) // 2 // 3
    assert choose_kv_cache_bytes(20 * GiB, GiB, True, tp_size=1) == KV_MAX
    for argv, size in ((["--tensor-parallel-size", "3"], 3), (["-tp=2"], 2), (["--tensor-parallel-size=4"], 4),
                       (["--model", "m"], 1), (["-tp", "x"], 1)):
        assert tensor_parallel_size(argv) == size, argv
