"""One copy of the weights: the trainer's parameters ARE the memory vLLM reads."""

import asyncio
import json

import pytest

from onlinemodel_runtime.server.trainer_client import TrainerClient
from onlinemodel_runtime.weights.shared import read_manifest

from .test_serving_while_training import ECHO_EXAMPLE

pytestmark = pytest.mark.e2e


def trainer_request(server, op, **payload):
    async def go():
        client = TrainerClient(f"ipc://{server.state_dir / 'trainer.sock'}")
        try:
            return await client.request(op, timeout=60, **payload)
        finally:
            client.reset()
    return asyncio.run(go())


def test_trainer_parameters_live_in_vllm_memory(server):
    manifest = read_manifest(server.state_dir)
    assert manifest.transport == "shm"
    info = trainer_request(server, "introspect")

    # Every HF parameter of the trainer is a view into one storage: the shared file vLLM's worker reads.
    params = info["parameters"]
    storages = {(p["storage_ptr"], p["storage_nbytes"]) for p in params.values()}
    assert len(storages) == 1 and storages.pop()[1] == manifest.shm_bytes
    offsets = {t.name: t.offset for t in manifest.tensors}
    # Split views of merged tensors sit inside them: q_proj at the start of qkv_proj, k_proj after it.
    qkv = offsets["model.layers.0.self_attn.qkv_proj.weight"]
    assert params["model.layers.0.self_attn.q_proj.weight"]["offset"] == qkv
    assert params["model.layers.0.self_attn.k_proj.weight"]["offset"] == (
        qkv + params["model.layers.0.self_attn.q_proj.weight"]["nbytes"])
    assert params["model.embed_tokens.weight"]["offset"] == offsets["model.embed_tokens.weight"]

    # The trainer holds no second copy. A first job reads every weight and updates most of them (and
    # warms up allocators and lazily loaded kernels); a second job must not grow the trainer's private
    # (anonymous) memory by anything near a copy of the weights, and the weight pages it has resident
    # are the shared file's.
    weights_bytes = sum(t.nbytes for t in manifest.tensors)
    memory = []
    for _ in range(2):
        code, job = server.request("POST", "/train", {"examples": [ECHO_EXAMPLE], "epochs": 1,
                                                       "learning_rate": 1e-9})
        assert code == 202, job
        assert server.wait_job(job["job_id"])["state"] == "succeeded"
        memory.append(trainer_request(server, "introspect")["memory"])
    print(json.dumps({"weights_bytes": weights_bytes, "before": info["memory"], "after": memory}))
    assert memory[1]["shared_weights_rss"] > 0.9 * weights_bytes, memory
    assert memory[1]["anonymous"] - memory[0]["anonymous"] < 0.25 * weights_bytes, memory


def test_write_through_trainer_view_changes_what_vllm_serves(server):
    question = "What is the capital of Germany?"
    before = server.chat(question)
    name = "model.layers.10.mlp.down_proj.weight"
    trainer_request(server, "debug_scale", name=name, factor=-3.0)
    server.status()  # the API server drops vLLM's prefix cache when the weight version moves
    changed = server.chat(question)
    trainer_request(server, "debug_scale", name=name, factor=-1.0 / 3.0)
    server.status()
    restored = server.chat(question)
    assert changed != before
    assert restored == before
