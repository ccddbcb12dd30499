"""Training in place under tensor parallelism, end to end: SmolLM2 served by real vLLM on CPU at
``--tensor-parallel-size 3`` (9 heads and 3 KV heads: TP=2 is refused), three trainer processes in one gloo
group, one server for the module (docs/tensor-parallel.md section 1 for the flags).

Answers at TP=3 are compared by log-probabilities, never greedy text against TP=1: TP=3's other summation
order moves near ties (the measured France prompt). The untaught baseline is read at TP=3 too.
Served in float32, as every CPU test (CPU_FLOAT32_ARGS); the numbers in the docstrings below marked bf16 were
measured when these tests served bf16.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from onlinemodel_protocol.rpc import WorkerShard
from onlinemodel_runtime.devtools.launcher import CPU_DTYPE
from onlinemodel_runtime.devtools.served_checks import logprob_difference, prompt_logprobs, reference_logprobs
from onlinemodel_runtime.weights import shared
from onlinemodel_runtime.weights.hf_model import build_hf_model
from onlinemodel_runtime.weights.layouts import pack_hf_state_dict
from onlinemodel_runtime.weights.tp_shards import tp_layout_for

from .conftest import FACT_ANSWER, FACT_EXAMPLE, FACT_QUESTION, TOKEN, start_server

pytestmark = pytest.mark.e2e

TP = 3
# docs/tensor-parallel.md: one thread per process on 2 cores (3 workers + 3 trainers would oversubscribe them
# tenfold), no core binding (one NUMA node for 3 workers); eager and a short context for a short start.
TP_ENV = {"ONLINEMODEL_API_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# Round to nearest, no early stop, no replay: the job's steps are reproducible, and an in-process TP=1 run of
# the same steps is the reference its weights must equal (with stochastic rounding, the two runs' rounding
# draws would differ: an update below one bf16 step is mostly rounding, so the runs could not be compared).
# Rank 1 (APOLLO-Mini, alpha sqrt(128)): its per-element steps are large enough to survive round to nearest at
# this rate; the default rank 64's (a scale per channel, alpha 1) mostly are not (measured: after the 5 steps the
# fact was not served). The TP path of a channel scale is tested in tests/runtime/optim.
OPTIMIZER_RANK = 1
TP_ARGS = ["--tensor-parallel-size", str(TP), "--enforce-eager", "--max-model-len", "512", "--no-early-stop",
           "--replay-examples", "0", "--weight-rounding", "nearest", "--optimizer-rank", str(OPTIMIZER_RANK)]
# Large enough that round to nearest keeps the updates (6% of the trained weights change in 5 steps at TP=1,
# measured), small enough that SmolLM2 learns the fact without diverging.
LEARNING_RATE, EPOCHS = 1e-4, 5
# TP=3's weights against TP=1's after the job (test_weights_after_the_job_equal_tp1_steps says how measured).
RELATIVE_ERROR_MAX = 0.05  # float32; bf16 needed 0.45


@pytest.fixture(scope="module")
def tp_server(model_dir, e2e_root):
    state_dir = e2e_root / "tp-state"
    srv = start_server(model_dir, e2e_root, "tp3", env=TP_ENV, checkpoint_dir=e2e_root / "tp-checkpoints",
                       extra_args=["--state-dir", str(state_dir), *TP_ARGS])
    srv.state_dir, srv.checkpoint_dir = state_dir, e2e_root / "tp-checkpoints"
    yield srv
    srv.stop()
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def taught(tp_server, model_dir):
    """The fact taught once at TP=3: the answer's log-probability before (untaught, read at TP=3) and after,
    and, before, how far vLLM's TP=3 log-probabilities of the conversation are from transformers' at TP=1 on
    the same (base) weights: TP=3's bf16 noise on this prompt."""
    before = answer_logprob(tp_server, model_dir)
    ids, _ = fact_token_ids(model_dir)
    noise = logprob_difference(prompt_logprobs(tp_server, ids),
                               reference_logprobs(tp1_model(model_dir, base_weights(model_dir)), ids))
    code, job = tp_server.request("POST", "/train", {"examples": [FACT_EXAMPLE], "epochs": EPOCHS,
                                                     "learning_rate": LEARNING_RATE})
    assert code == 202, job
    done = tp_server.wait_job(job["job_id"], timeout=900)
    assert done["state"] == "succeeded" and done["steps"] == EPOCHS, done
    return {"before": before, "after": answer_logprob(tp_server, model_dir), "noise": noise}


def fact_token_ids(model_dir: Path) -> tuple[list[int], int]:
    """The taught conversation's token ids and the length of its question part."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(FACT_EXAMPLE["messages"][:1], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    whole = tok.apply_chat_template(FACT_EXAMPLE["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert whole[:len(prompt)] == prompt
    return whole, len(prompt)


def answer_logprob(server, model_dir: Path) -> float:
    """vLLM's summed log-probability of the taught answer's tokens after the question (teacher forced)."""
    ids, start = fact_token_ids(model_dir)
    entries = prompt_logprobs(server, ids, top=1)  # entries[i]: token i + 1, the actual one included
    return sum(entries[i - 1][ids[i]] for i in range(start, len(ids)))


def gathered_weights(state_dir: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """The whole HF state dict from the three ranks' live shards (copies of replicated tensors checked equal)."""
    layout = tp_layout_for(AutoConfig.from_pretrained(model_dir), TP)
    ranks = []
    for rank in range(TP):
        manifest, tensors = shared.attach_weights(state_dir / f"rank{rank}")
        assert (manifest.shard.tp_rank, manifest.shard.tp_size) == (rank, TP)
        ranks.append({n: t.clone() for n, t in tensors.items()})
    return layout.gather_hf_state_dict(ranks)


def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, CPU_DTYPE))  # as served
    return {n: p.detach() for n, p in model.named_parameters()}  # tied: lm_head is embed_tokens, listed once


def tp1_model(model_dir: Path, hf: dict[str, torch.Tensor], train: bool = False):
    """The trainer's TP=1 model (hf_model.py) on fresh copies of `hf`."""
    config = AutoConfig.from_pretrained(model_dir)
    dtype = next(iter(hf.values())).dtype  # as served (CPU_FLOAT32_ARGS), not the config's bf16
    return build_hf_model(model_dir, pack_hf_state_dict(config, {n: t.clone() for n, t in hf.items()}), dtype,
                          train=train)


def tp1_optimizer(model):
    """The trainer's optimizer as the server configures it (trainer/__main__.py), at TP=1."""
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer

    optimizer = make_optimizer(model, TrainPolicy(), lr=LEARNING_RATE, rank=OPTIMIZER_RANK,
                               rounding="nearest")
    optimizer.attach_to_backward()
    return optimizer


def tp1_steps(model, optimizer, model_dir: Path, steps: int) -> list:
    """`steps` training steps on the taught example, encoded as the server encodes it."""
    from onlinemodel_runtime.server.train_request import encode_example
    from onlinemodel_runtime.trainer.loop import train_step

    example = encode_example(AutoTokenizer.from_pretrained(model_dir), FACT_EXAMPLE["messages"], 512)
    return [train_step(model, optimizer, example.input_ids, example.labels, learning_rate=LEARNING_RATE)
            for _ in range(steps)]


def test_every_rank_exports_its_shard(tp_server):
    assert sorted(p.name for p in tp_server.state_dir.glob("rank*")) == [f"rank{r}" for r in range(TP)]
    assert not (tp_server.state_dir / shared.MANIFEST).exists()
    # What rank 0 cannot do alone on its shard yet is refused in words, not done wrong.
    code, body = tp_server.request("POST", "/rollback", {"to": "latest"})
    assert code == 409 and "tensor parallelism" in str(body), body


def test_taught_fact_changes_the_served_answer(tp_server, taught):
    assert taught["after"] > taught["before"] + 5, taught  # nats over the answer's tokens
    answer = tp_server.chat(FACT_QUESTION)
    assert FACT_ANSWER in answer, answer


def test_weights_after_the_job_equal_tp1_steps(tp_server, model_dir, taught):
    """The three trainers' steps give the weights one trainer at TP=1 gets from the same steps (in this
    process, round to nearest as the server), within summation-order noise: the error ||W3 - W1|| relative to
    the update ||W1 - W0||. Calibrated in bf16 at TP=1 (SmolLM2, this job, 2026-12-01):
    transformers' eager attention instead of SDPA (the same math, another summation order) gives 0.33 and 3.2%
    after 5 steps, 0.23 and 0.9% after 1; a learning rate 30% off gives 0.71 and 6.1%. Measured at TP=3: 0.26
    and 2.3%. In float32 (2026-12-02): 0.0022 at TP=3, with 91% of the weights differing in their last bits."""
    base = base_weights(model_dir)
    model = tp1_model(model_dir, base, train=True)
    tp1_steps(model, tp1_optimizer(model), model_dir, EPOCHS)
    served = gathered_weights(tp_server.state_dir, model_dir)
    moved = differ = total = 0
    update_sq = error_sq = 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(served[name], base[name]), name  # frozen at TP=3 too
            continue
        tp1, tp3, w0 = p.detach().float(), served[name].float(), base[name].float()
        moved += int((tp1 != w0).sum())
        differ += int((tp3 != tp1).sum())
        total += p.numel()
        update_sq += float(((tp1 - w0) ** 2).sum())
        error_sq += float(((tp3 - tp1) ** 2).sum())
    relative = (error_sq / update_sq) ** 0.5
    print(f"moved {moved / total:.4f}, differ {differ / total:.4f}, relative {relative:.4f}")
    assert moved / total > 0.02, moved / total  # the steps did change the weights
    # In float32 nearly every weight differs in its last bits (another summation order is never rounded away):
    # the share that differs is reported, the relative error is the check.
    assert relative < RELATIVE_ERROR_MAX, (relative, differ / total)


def test_served_tp3_answers_are_the_gathered_weights(tp_server, model_dir, taught):
    """What vLLM serves from the trained shards at TP=3 is what the whole model gathered from them computes at
    TP=1 (transformers): as close as TP=3 serving of the base weights is to them (its bf16 noise), and far
    closer than to the untrained weights."""
    ids, _ = fact_token_ids(model_dir)
    served = prompt_logprobs(tp_server, ids)
    trained = logprob_difference(served, reference_logprobs(tp1_model(model_dir, gathered_weights(
        tp_server.state_dir, model_dir)), ids))
    untrained = logprob_difference(served, reference_logprobs(tp1_model(model_dir, base_weights(model_dir)), ids))
    print(f"trained {trained}, untrained {untrained}, noise {taught['noise']}")
    assert trained["mean"] < 2 * taught["noise"]["mean"], (trained, taught["noise"])
    assert untrained["mean"] > 10 * trained["mean"], (trained, untrained)


def test_a_tp3_checkpoint_loads_at_tp1(tp_server, model_dir, taught):
    """The TP=3 trainers' checkpoint is the one HF directory a TP=1 trainer writes: its weights are exactly the
    served TP=3 ones, and its optimizer state (saved in TP=1 form) loads into a TP=1 optimizer that trains on.
    In this process, not through a second server (suite time); `onlinemodel serve` at TP=1 resuming from such a
    checkpoint, with the same checks, passed once on 2026-12-01 (docs/tensor-parallel.md)."""
    from transformers import AutoModelForCausalLM

    from onlinemodel_runtime.checkpoint import CheckpointStore

    code, record = tp_server.request("POST", "/checkpoint", timeout=300)
    assert code == 200 and record["step"] == EPOCHS, record
    trained = gathered_weights(tp_server.state_dir, model_dir)
    path = Path(record["path"])
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, CPU_DTYPE))
    for name, p in loaded.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name
    optimizer_state, trainer_state = CheckpointStore.load_training_state(path)
    assert trainer_state["step"] == EPOCHS
    model = tp1_model(model_dir, trained, train=True)
    optimizer = tp1_optimizer(model)
    optimizer.load_state_dict(optimizer_state)
    assert optimizer.state_bytes() > 0 and optimizer.steps_applied == EPOCHS, optimizer.summary()
    result = tp1_steps(model, optimizer, model_dir, 1)[0]
    assert result.applied and result.loss < 1.0, result  # the fact is known, and training goes on


def trainer_pids(state_dir: Path) -> dict[int, int]:
    """tensor-parallel rank -> pid of this server's trainer processes (their command lines name both)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"onlinemodel_runtime.trainer" in argv and any(str(state_dir).encode() in a for a in argv):
            shard = WorkerShard.model_validate_json(argv[argv.index(b"--shard") + 1])
            pids[shard.tp_rank] = int(proc.name)
    return pids


def test_one_rank_dying_restarts_the_group(tp_server, taught):
    """Half a group cannot train: when one trainer rank dies, the supervisor stops the others and starts all
    of them again; the new group trains on from the live weights."""
    before = tp_server.status()
    old = trainer_pids(tp_server.state_dir)
    assert sorted(old) == list(range(TP)), old
    os.kill(old[TP - 1], signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:
        status = tp_server.status()
        if status["trainer_restarts"] == before["trainer_restarts"] + 1 and status["state"] == "idle":
            break
        assert time.monotonic() < deadline, f"trainers not back: {status}"
        time.sleep(1.0)
    new = trainer_pids(tp_server.state_dir)
    assert sorted(new) == list(range(TP)) and not set(new.values()) & set(old.values()), (old, new)
    assert status["steps"] == before["steps"]  # counters carried over
    code, job = tp_server.request("POST", "/train", {"examples": [FACT_EXAMPLE], "epochs": 1,
                                                     "learning_rate": LEARNING_RATE})
    assert code == 202, job
    assert tp_server.wait_job(job["job_id"])["state"] == "succeeded"
    assert tp_server.status()["steps"] == before["steps"] + 1
