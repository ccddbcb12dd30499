"""bench/continual_sweep.py trains with the runtime's own pieces (job schedule, step, anchor term), so a change
of their signatures must not leave it broken (it did once: the anchor term's `record` gained an argument).
One job of the recipe that chose the defaults, on SmolLM2, and that recipe is the runtime's defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import continual_set as cs  # noqa: E402
import continual_sweep as sweep  # noqa: E402

from onlinemodel_protocol import limits  # noqa: E402
from onlinemodel_protocol.rpc import IGNORE_INDEX  # noqa: E402
from onlinemodel_runtime.devtools.launcher import CPU_DTYPE  # noqa: E402
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2  # noqa: E402

DEFAULTS = sweep.DEFAULTS


def test_the_defaults_recipe_is_the_runtimes_defaults():
    assert (DEFAULTS.lr, DEFAULTS.epochs, DEFAULTS.margin, DEFAULTS.replay, DEFAULTS.reservoir) == (
        limits.LEARNING_RATE_DEFAULT, limits.EPOCHS_DEFAULT, limits.EARLY_STOP_MARGIN_DEFAULT,
        limits.REPLAY_EXAMPLES_DEFAULT, limits.REPLAY_RESERVOIR_DEFAULT)
    assert (DEFAULTS.anchor_weight, DEFAULTS.anchor_per_step, DEFAULTS.anchor_top_k) == (
        limits.ANCHOR_WEIGHT_DEFAULT, limits.ANCHOR_PER_STEP, limits.ANCHOR_TOP_K)
    assert DEFAULTS.anchor_conversations == 0  # all the built-in ones
    assert (DEFAULTS.rank, DEFAULTS.policy) == (limits.OPTIMIZER_RANK_DEFAULT, "apollo,frozen,frozen")
    assert DEFAULTS.null_space == limits.NULL_SPACE_ENERGY_DEFAULT
    assert DEFAULTS.reproject  # the trainer gives its optimizer to the null space (trainer/service.py)


def test_one_job_trains_the_fact_with_the_anchor_term():
    # The CPU tests' dtype (devtools/launcher.CPU_FLOAT32_ARGS says why); the sweep itself runs bf16
    backend = sweep.InProcess(ensure_smollm2(), DEFAULTS, seed=0, device="cpu", batch=1,
                              dtype=getattr(torch, CPU_DTYPE))
    assert backend.anchor_term.recorded and backend.null_space.ready
    assert backend.null_space.summary()["updates_projected"] == 5 * backend.model.config.num_hidden_layers  # q k v o down
    # The anchor tokens the untouched model predicted surely: none regressed before a step
    assert backend.known and all(any(t != IGNORE_INDEX for t in ex.labels) for ex in backend.known)
    assert backend.regressed_anchors() == []
    # The greedy reply's own tokens lead their runners-up along it (teacher-forced: what generate chose)
    control = cs.load_controls()[0]
    reply = backend.ask([control.question])[0]
    assert cs.hit(reply, control.expect) and backend.answer_lead(control.question, reply, control.expect) > 0
    fact = cs.load_facts()[0]
    job = backend.teach(fact.example)
    assert job["new_steps"] >= 1 and len(job["anchor_losses"]) == job["steps"]
    assert job["losses"][-1] < job["losses"][0]
    assert 0 <= job["anchors_regressed"] <= len(backend.known)


def test_a_dithered_start_leaves_the_served_weights_as_they_are():
    from onlinemodel_runtime.optim.rounding import master_value, split_master

    net = torch.nn.Linear(16, 8, dtype=torch.bfloat16)
    before = net.weight.detach().clone()
    opt = sweep.Apollo(net.named_parameters(), rank=2, rounding="compensated")
    sweep.start_dithered(opt, seed=0)
    residual = opt.state[net.weight]["residual"]
    assert residual.dtype == torch.int16 and residual.float().std() > 10_000  # spread over the whole cell
    master = master_value(net.weight.detach(), residual)
    assert torch.equal(split_master(master)[0], before) and torch.equal(net.weight, before)
