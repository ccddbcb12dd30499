"""export_weights / attach_weights through the shm transport, across two real processes.

The owner (this test process) holds a tiny Qwen3 in vLLM's packed layout and exports it; a child
process (this file run as a script) attaches, builds the HF model on the views, trains with the
project's optimizer and writes a marker through a view; the owner then sees every change in its own
tensors and forward. The CUDA IPC transport is exercised on a GPU by bench/gpu_ipc.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
MARK = (3, 4, 7.0)  # row, column, value the child writes into layer 0's up_proj through a view


def tiny_config():
    from transformers import Qwen3Config

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=256, tie_word_embeddings=True,
                      max_position_embeddings=128, architectures=["Qwen3ForCausalLM"])
    cfg.dtype = torch.bfloat16
    return cfg


def checksums(tensors) -> dict[str, float]:
    return {n: float(t.detach().double().sum()) for n, t in tensors.items()}


def ids():
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def exported(tmp_path, monkeypatch):
    """A tiny packed Qwen3 exported by this process (module state restored afterwards)."""
    from transformers import AutoModelForCausalLM

    from onlinemodel_runtime.weights import shared
    from onlinemodel_runtime.weights.layouts import pack_hf_state_dict

    monkeypatch.setattr(shared, "_SHM_EXPORT", None)
    cfg = tiny_config()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = {n: torch.nn.Parameter(t, requires_grad=False)
              for n, t in pack_hf_state_dict(cfg, hf.state_dict()).items()}
    state_dir = tmp_path / "state"
    manifest = shared.export_weights(params.items(), state_dir, model="tiny-qwen3",
                                             architecture="Qwen3ForCausalLM", vllm_version="test",
                                             shm_dir=tmp_path)
    return cfg, params, state_dir, manifest


def test_export_moves_parameters_into_one_shared_mapping(exported):
    _, params, state_dir, manifest = exported
    assert manifest.transport == "shm" and Path(manifest.shm_path).is_file()
    assert json.loads((state_dir / "weights.json").read_text())["transport"] == "shm"
    # Every parameter now lives in the one mapped file (vLLM reads the shared pages).
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 1
    assert [t.name for t in manifest.tensors] == list(params)


def test_child_trains_owner_sees_it(exported):
    from transformers import AutoModelForCausalLM

    from onlinemodel_runtime.weights.hf_model import build_hf_model

    cfg, params, state_dir, _ = exported
    owner = build_hf_model(cfg, params, expected_dtype=torch.bfloat16)  # stands in for vLLM's forward
    with torch.no_grad():
        before = owner(ids(), use_cache=False).logits
    sums0 = checksums(params)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, str(state_dir)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])

    assert child["transport"] == "shm" and child["views_ok"]
    assert len(child["losses"]) == 2 and all(math.isfinite(x) for x in child["losses"]), child["losses"]
    # Both processes read the same values: what the child wrote is what the owner holds.
    sums1 = checksums(params)
    assert sums1 == child["checksums"]
    row, col, value = MARK
    inter = cfg.intermediate_size
    assert params["model.layers.0.mlp.gate_up_proj.weight"][inter + row, col].item() == value
    trained = {n for n in params if n.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight",
                                                "down_proj.weight"))}
    assert {n for n in params if sums1[n] != sums0[n]} == trained  # default policy: block linears only

    with torch.no_grad():
        after = owner(ids(), use_cache=False).logits
        reference = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        reference.load_state_dict({k: v.clone() for k, v in owner.state_dict().items()})
        expected = reference(ids(), use_cache=False).logits
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


def test_second_attach_sees_same_memory(exported):
    from onlinemodel_runtime.weights.shared import attach_weights

    _, params, state_dir, _ = exported
    _, a = attach_weights(state_dir)
    _, b = attach_weights(state_dir)
    name = "model.layers.1.self_attn.o_proj.weight"
    a[name][0, 0] = 1.5
    assert b[name][0, 0].item() == 1.5 and params[name][0, 0].item() == 1.5


def _rewrite_manifest(state_dir: Path, **changes) -> None:
    path = state_dir / "weights.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_attach_errors(exported, tmp_path):
    from onlinemodel_runtime.weights.hf_model import build_hf_model
    from onlinemodel_runtime.weights.layouts import LayoutError
    from onlinemodel_runtime.weights.shared import AttachError, attach_weights

    cfg, _, state_dir, manifest = exported
    with pytest.raises(AttachError, match="no weights manifest"):
        attach_weights(tmp_path / "nothing-here")

    # The HF config says 3 layers, the exported weights have 2: refused before any view is made.
    _, tensors = attach_weights(state_dir)
    wrong = tiny_config()
    wrong.num_hidden_layers = 3
    with pytest.raises(LayoutError, match="missing"):
        build_hf_model(wrong, tensors, expected_dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match="dtype"):
        build_hf_model(cfg, tensors, expected_dtype=torch.float16)

    original = (state_dir / "weights.json").read_text()
    for changes, message in (
        (dict(format=99), "format"),
        (dict(transport="carrier-pigeon"), "unknown transport"),
        (dict(shm_bytes=manifest.shm_bytes + 64), "bytes"),
        (dict(shm_path=str(tmp_path / "gone.weights")), "is gone"),
        (dict(tensors=[dict(t, dtype="float99") for t in json.loads(original)["tensors"]]), "unknown dtype"),
    ):
        (state_dir / "weights.json").write_text(original)
        _rewrite_manifest(state_dir, **changes)
        with pytest.raises(AttachError, match=message):
            attach_weights(state_dir)


def test_cuda_handles_must_match_manifest(tmp_path, monkeypatch):
    """The CUDA IPC branch checks each rebuilt tensor against the manifest (checked here with a CPU
    stand-in for torch's rebuild function: the check, not the transport)."""
    from torch.multiprocessing import reductions

    from onlinemodel_runtime.weights.shared import (
        CUDA_HANDLES, MANIFEST, AttachError, Manifest, TensorSpec, attach_weights)
    from test_weights_cuda_ipc import cuda_like_args, record_of

    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *args: torch.zeros(tuple(args[1]), dtype=args[5]))
    spec = TensorSpec("model.norm.weight", "bfloat16", (4,))
    manifest = Manifest(transport="cuda_ipc", device="cuda:0", model="m", architecture="Qwen3ForCausalLM",
                        dtype="bfloat16", vllm_version="test", tensors=(spec,))
    (tmp_path / MANIFEST).write_text(json.dumps(manifest.to_json()))
    for name, size in (("model.norm.weight", 4), ("model.norm.weight", 5), ("other", 4)):
        record = record_of(cuda_like_args(size=(size,)))
        (tmp_path / CUDA_HANDLES).write_text(json.dumps([{"name": name, "handle": record}]))
        if (name, size) == ("model.norm.weight", 4):
            assert tuple(attach_weights(tmp_path)[1]["model.norm.weight"].shape) == (4,)
        else:
            with pytest.raises(AttachError, match="does not match the manifest"):
                attach_weights(tmp_path)
    for bad in ('{"not": "a list"}', '[{"name": "x"}]', "not json",
                json.dumps([{"name": "model.norm.weight", "handle": {"tensor_cls": "os.system"}}])):
        (tmp_path / CUDA_HANDLES).write_text(bad)
        with pytest.raises(AttachError):
            attach_weights(tmp_path)


def test_the_shm_file_is_locked_while_its_owner_lives(exported, tmp_path):
    from onlinemodel_runtime.weights import shared

    _, _, _, manifest = exported
    path = Path(manifest.shm_path)
    assert path.parent == tmp_path and path.name.startswith("onlinemodel-v3-") and path.stat().st_mode & 0o777 == 0o600
    # Another server's sweep leaves it alone, whatever the pid in its name says.
    assert shared.remove_stale_shm_files(tmp_path) == [] and path.exists()
    assert not shared.remove_if_stale(path)


def test_only_unlocked_weight_files_are_swept(tmp_path):
    import fcntl

    from onlinemodel_runtime.weights import shared

    dead = tmp_path / "onlinemodel-v3-1-dead.weights"  # its owner is gone: nobody holds the lock
    dead.write_bytes(b"x")
    alive = tmp_path / f"onlinemodel-v3-{os.getpid()}-alive.weights"
    alive.write_bytes(b"x")
    holder = os.open(alive, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    (tmp_path / "onlinemodel-v3-2-link.weights").symlink_to(target)  # never followed
    other = tmp_path / "unrelated.weights"
    other.write_bytes(b"x")
    older = tmp_path / "onlinemodel-3-1764600000.weights"  # an older runtime's: it holds no lock
    older.write_bytes(b"x")
    try:
        assert shared.remove_stale_shm_files(tmp_path) == [dead]
    finally:
        os.close(holder)
    assert alive.exists() and target.read_bytes() == b"keep" and other.exists() and older.exists()
    assert shared.remove_if_stale(alive) and not alive.exists()  # its owner let go


def test_export_errors(tmp_path, monkeypatch):
    from onlinemodel_runtime.weights import shared
    from onlinemodel_runtime.weights.shared import AttachError, export_weights

    monkeypatch.setattr(shared, "_SHM_EXPORT", None)
    kw = dict(model="m", architecture="Qwen3ForCausalLM", vllm_version="test", shm_dir=tmp_path)
    with pytest.raises(AttachError, match="no parameters"):
        export_weights([], tmp_path / "s", **kw)
    two = [("a", torch.nn.Parameter(torch.zeros(2))), ("b", torch.nn.Parameter(torch.zeros(2, device="meta")))]
    with pytest.raises(AttachError, match="several devices"):
        export_weights(two, tmp_path / "s", **kw)
    with pytest.raises(AttachError, match="not supported"):
        export_weights(two[1:], tmp_path / "s", **kw)
    assert not (tmp_path / "s" / "weights.json").exists()  # nothing half-published


def _child(state_dir: str) -> None:
    """Trainer side: attach, build the HF model on the views, train, write a marker, report."""
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.trainer.loop import train_step
    from onlinemodel_runtime.weights.hf_model import assert_views_of, build_hf_model
    from onlinemodel_runtime.weights.shared import attach_weights

    torch.set_num_threads(1)
    manifest, tensors = attach_weights(Path(state_dir))
    model = build_hf_model(tiny_config(), tensors, expected_dtype=torch.bfloat16, requires_grad=True, train=True)
    opt = make_optimizer(model, TrainPolicy(), lr=1e-2, rank=1)
    opt.attach_to_backward()
    seq = ids()[0].tolist()
    losses = [train_step(model, opt, seq, seq).loss for _ in range(2)]
    row, col, value = MARK
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[row, col] = value
    assert_views_of(model, tensors)
    print(json.dumps(dict(transport=manifest.transport, losses=losses, views_ok=True,
                          checksums=checksums(tensors))))


if __name__ == "__main__":
    _child(sys.argv[1])


def test_a_tensor_parallel_rank_exports_into_its_own_directory(tmp_path, monkeypatch):
    from onlinemodel_protocol.rpc import WorkerShard
    from onlinemodel_runtime.weights import shared

    monkeypatch.setattr(shared, "_SHM_EXPORT", None)
    params = [("model.norm.weight", torch.nn.Parameter(torch.ones(4), requires_grad=False))]
    shard = WorkerShard(tp_rank=1, tp_size=3)
    manifest = shared.export_weights(params, tmp_path / "s", model="m", architecture="LlamaForCausalLM",
                                     vllm_version="test", shard=shard, shm_dir=tmp_path)
    assert shared.exported_manifest_dirs(tmp_path / "s") == [tmp_path / "s" / "rank1"]
    assert shared.read_manifest(tmp_path / "s" / "rank1").shard == shard == manifest.shard
    assert not (tmp_path / "s" / shared.MANIFEST).exists()  # rank 0 of size 1 alone writes there
