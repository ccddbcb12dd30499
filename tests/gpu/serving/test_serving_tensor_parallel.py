"""Training in place under tensor parallelism on two GPUs (NCCL, CUDA IPC per rank): the CPU e2e's checks
(tests/runtime/e2e/test_tensor_parallel.py) at `--tensor-parallel-size 2` on a random-weight Qwen3 at the
qwen3-1.7B shape with 4 layers, its step times recorded. Needs two GPUs (one GPU: skipped, saying so)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onlinemodel_runtime.devtools import served_checks as sc
from onlinemodel_runtime.weights import shared
from onlinemodel_runtime.weights.hf_model import build_hf_model
from onlinemodel_runtime.weights.layouts import pack_hf_state_dict
from onlinemodel_runtime.weights.tp_shards import tp_layout_for
from serving_models import ARCHITECTURES, LAYERS, Served, record, tokenizer_dir, write_random_model_dir

pytestmark = pytest.mark.gpu
SHAPE, TP = "qwen3-1.7B", 2


@torch.no_grad()
def randomize_ranks(state_dir, model_dir) -> None:
    """`served_checks.randomize_` of the whole model (on the CPU), split and written into every rank's exported
    shard: vLLM's dummy weights (+-1e-3) give near-uniform logits."""
    config = AutoConfig.from_pretrained(model_dir)
    whole = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sc.randomize_(whole)
    hf = {n: p.detach() for n, p in whole.named_parameters()}
    layout = tp_layout_for(config, TP)
    for rank in range(TP):
        _, tensors = shared.attach_weights(state_dir / f"rank{rank}")
        for name, t in layout.split_hf_state_dict(hf, rank).items():
            tensors[name].copy_(t)
        torch.cuda.synchronize(next(iter(tensors.values())).device)


def gathered_weights(state_dir, model_dir) -> dict[str, torch.Tensor]:
    layout = tp_layout_for(AutoConfig.from_pretrained(model_dir), TP)
    ranks = [{n: t.cpu() for n, t in shared.attach_weights(state_dir / f"rank{r}")[1].items()} for r in range(TP)]
    return layout.gather_hf_state_dict(ranks)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if torch.cuda.device_count() < TP:
        pytest.skip(f"tensor parallelism needs {TP} GPUs, this machine has {torch.cuda.device_count()}")
    root = tmp_path_factory.mktemp("tp2")
    model_dir = write_random_model_dir(root / "model", SHAPE, tokenizer_dir(), layers=LAYERS)
    s = Served(SHAPE, root, model_dir, [*ARCHITECTURES[SHAPE], "--tensor-parallel-size", str(TP)])
    s.start(dummy=True)
    randomize_ranks(s.state_dir, model_dir)
    yield s
    s.server.stop()
    shutil.rmtree(s.checkpoint_dir, ignore_errors=True)


def test_served_logits_are_the_gathered_model(served):
    """vLLM at TP=2 computes what transformers at TP=1 computes from the two ranks' shards, gathered."""
    config = AutoConfig.from_pretrained(served.model_dir)
    model = build_hf_model(served.model_dir, pack_hf_state_dict(config, gathered_weights(served.state_dir,
                                                                                       served.model_dir)))
    ids = sc.chat_token_ids(served.model_dir, sc.PROMPT)
    close = sc.logprob_difference(sc.prompt_logprobs(served.server, ids), sc.reference_logprobs(model, ids))
    record(SHAPE, "tp2_logits", start_s=served.starts[0], vllm_vs_transformers=close)
    assert close["reference_spread"] > 1.0, close
    assert close["mean"] < sc.LOGPROB_TOLERANCE, close


def test_teach_then_checkpoint_loads_at_tp1(served):
    taught = sc.teach(served.server)
    status = served.server.status()
    code, info = served.server.request("POST", "/checkpoint", timeout=600)
    record(SHAPE, "tp2_teach_checkpoint", taught=taught, last_step_seconds=status["last_step_seconds"],
           checkpoint=info)
    assert taught["answer"] == sc.SENTENCE, taught
    assert code == 200 and info["step"] == status["steps"], info
    whole = gathered_weights(served.state_dir, served.model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(info["path"], dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), whole[name]), name
