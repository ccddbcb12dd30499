"""The compiled bucket update - the function CUDA runs, captured in graphs there - against the
eager run of the same function, on CPU (torch.compile's C++ backend), so CI checks what the GPU
executes. What needs a GPU (graph capture, streams) is in tests/gpu/optim.

Compiling costs seconds per bucket signature: the function-level tests share one signature (the
bucket `_bucket` builds), the optimizer-level ones the decoder layer of the default policy."""

import copy

import pytest
import torch

from optim_models import loss_fn, make_net, orthonormal_basis, tiny_llama, token_ids

from onlinemodel_runtime.optim import Apollo, TrainPolicy, make_optimizer
from onlinemodel_runtime.optim.bucket_update import COMPILED, ConstBuffers, Prepared, bucket_update
from onlinemodel_runtime.optim.functional import const_row, projected_shape, projection_matrix, projects_left
from onlinemodel_runtime.optim.graphs import Plan
from onlinemodel_runtime.optim.rounding import master_value

GROUP = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, alpha=2.0, norm_growth_limit=1.01)
# (shape, weight dtype, apollo, channel, rounding): both projection sides, both scales, AdamW,
# float32 and bf16 weights, the three ways of rounding, batches of experts (3-D).
S, N, C = "stochastic", "nearest", "compensated"
ITEMS = [((8, 12), torch.float32, True, False, S), ((12, 8), torch.float32, True, True, C),
         ((8, 12), torch.bfloat16, True, True, N), ((12,), torch.float32, False, False, S),
         ((12, 8), torch.bfloat16, True, False, S), ((12,), torch.bfloat16, False, False, C),
         ((3, 8, 12), torch.float32, True, False, S), ((3, 12, 8), torch.bfloat16, True, True, C),
         ((8, 12), torch.float32, True, True, S), ((8, 12), torch.float32, False, False, S),
         ((8, 12), torch.bfloat16, True, True, S), ((8, 12), torch.bfloat16, True, True, C)]
IDLE_EXPERT = 6  # ITEMS[6]'s expert 1 gets a zero gradient (no token routed to it)
# Items whose update is kept out of a basis (Apollo.keep_out; a bf16 weight's basis in bf16, as the trainer's):
# a channel scale by column, AdamW, and bf16 weights written stochastically and compensated.
KEPT = (8, 9, 10, 11)


def _bucket(step: int, seed: int = 0, reference: float = 3.0) -> dict:
    """bucket_update's arguments for ITEMS at `step`, with moments as after a few steps and
    `reference` as every matrix's limiter reference (0: no update applied yet)."""
    g = torch.Generator().manual_seed(seed)
    spec, ws, grads, projs, ms, vs, lims, res, bases = [], [], [], [], [], [], [], [], []
    for shape, dtype, apollo, channel, rounding in ITEMS:
        ws.append((torch.randn(shape, generator=g) * 0.5).to(dtype))
        if rounding == C and dtype == torch.bfloat16:  # the low bits of a float32 master from earlier writes
            res.append(torch.randint(-32768, 32768, shape, generator=g, dtype=torch.int16))
        grads.append(torch.randn(shape, generator=g).to(dtype))
        if apollo:
            left = projects_left(shape)
            projs.append(projection_matrix(shape, 2, seed + len(ws)))
            mshape = projected_shape(shape, 2)
            lims.append(torch.full(shape[:-2], reference))
        else:
            left, mshape = False, shape
        ms.append(torch.randn(mshape, generator=g) * 0.1)
        vs.append(torch.rand(mshape, generator=g) * 0.01)
        kept = len(spec) in KEPT
        if kept:
            bases.append(orthonormal_basis(shape[-1], 3, seed + len(spec)).to(dtype))
        spec.append((apollo, left, channel, rounding, kept))
    grads[IDLE_EXPERT][1] = 0.0
    rows = [const_row(GROUP, step) for _ in ITEMS]
    return dict(spec=tuple(spec), ws=ws, grads=grads, projs=projs, exp_avgs=ms, exp_avg_sqs=vs,
                limiter_norms=lims, residuals=res, bases=bases, consts=torch.tensor(rows), gate=torch.tensor(True))


def _run(fn, args: dict, **kwargs) -> tuple[dict, torch.Tensor]:
    args = copy.deepcopy(args)
    return args, fn(**args, **kwargs)


def _bf16_neighbours(exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values next to each float32 value: towards zero and away from it."""
    down = (exact.view(torch.int32) & -65536).view(torch.float32)
    up = ((exact.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, torch.where(down == exact, down, up)


@pytest.mark.parametrize("step,reference", [(1, 0.0), (3, 3.0)])  # the first-update cap, then the limiter
def test_compiled_bucket_update_equals_eager(step, reference):
    args = _bucket(step, reference=reference)
    eager, ok_e = _run(bucket_update, args, generator=torch.Generator().manual_seed(0), chunk_elems=7)
    fast, ok_c = _run(COMPILED.get(), args)
    assert bool(ok_e) and bool(ok_c)
    for key in ("exp_avgs", "exp_avg_sqs", "limiter_norms"):
        for a, b in zip(eager[key], fast[key]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # The float32 new values of every weight, unrounded: the eager update of float32 copies (of the
    # float32 masters where compensated).
    masters = iter([master_value(w, r) for w, r in zip([w for w, it in zip(args["ws"], ITEMS)
                                                        if it[1] == torch.bfloat16 and it[4] == C], args["residuals"])])
    exact_args = dict(args, ws=[next(masters) if it[1] == torch.bfloat16 and it[4] == C else w.float()
                                for w, it in zip(args["ws"], ITEMS)])
    exact, _ = _run(bucket_update, exact_args)
    moved, k = 0, 0
    for i, (shape, dtype, _, _, rounding) in enumerate(ITEMS):
        x, before = exact["ws"][i], args["ws"][i].float()
        if dtype == torch.float32:
            torch.testing.assert_close(fast["ws"][i], eager["ws"][i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(eager["ws"][i], x, rtol=0, atol=0)
            if i in KEPT:  # the change, weight decay aside, has nothing in the basis's span; the update does move
                u = args["bases"][KEPT.index(i)]
                change = x - before * (1 - GROUP["lr"] * GROUP["weight_decay"])
                assert float((change @ u).norm()) < 1e-5 * float(change.norm()) and float(change.norm()) > 1e-3
            continue
        ulp = x.abs() * 2.0**-7
        moved += int((x - before).abs().gt(4 * ulp).sum())
        if rounding == C:  # the new master is the float32 update of the old one; the weight, it to nearest
            for out in (eager, fast):
                w = out["ws"][i]
                torch.testing.assert_close(master_value(w, out["residuals"][k]), x, rtol=1e-5, atol=1e-7)
                assert ((w.float() - x).abs() <= ulp * 0.5 * (1 + 1e-3) + 1e-12).all()
            if i in KEPT:  # the master's change is off the basis (to the bf16 basis's rounding)
                u = args["bases"][KEPT.index(i)].float()
                old = master_value(args["ws"][i], args["residuals"][k])
                change = x - old * (1 - GROUP["lr"] * GROUP["weight_decay"])
                assert float((change @ u).norm()) < 2e-2 * float(change.norm()) and float(change.norm()) > 1e-3
            k += 1
            continue
        if rounding == N:  # round to nearest of (nearly) the same float32 value
            for w in (eager["ws"][i], fast["ws"][i]):
                assert ((w.float() - x).abs() <= ulp * 0.5 * (1 + 1e-3) + 1e-12).all()
            continue
        # Stochastic rounding: every value is one of the two bf16 neighbours of the exact one
        # (a wrong update, or none, lands elsewhere: most moved by more than 4 ulp).
        down, up = _bf16_neighbours(x)
        for w in (eager["ws"][i], fast["ws"][i]):
            w = w.float()
            near = (w == down) | (w == up) | ((w - x).abs() <= ulp * 1e-3)
            assert near.all(), (i, (w - x).abs().max())
    assert moved > 0.5 * sum(args["ws"][i].numel() for i, it in enumerate(ITEMS) if it[1] == torch.bfloat16)
    idle = sum(it[2] for it in ITEMS[:IDLE_EXPERT])  # its position among the limiter references
    for out in (eager, fast):
        torch.testing.assert_close(out["ws"][IDLE_EXPERT][1], args["ws"][IDLE_EXPERT][1] * (1 - 0.1 * 0.01))
        assert out["limiter_norms"][idle][1] == reference


@pytest.mark.parametrize("fault", ["gate", "nan"])
def test_compiled_bucket_update_all_or_nothing(fault):
    args = _bucket(3, seed=1)
    if fault == "gate":
        args["gate"] = torch.tensor(False)
    else:
        args["grads"][3][5] = float("nan")  # an AdamW item in the middle of the bucket
    for fn in (bucket_update, COMPILED.get()):
        out, ok = _run(fn, args)
        assert not bool(ok)
        for key in ("ws", "exp_avgs", "exp_avg_sqs", "limiter_norms", "residuals"):
            for a, b in zip(out[key], args[key]):
                assert torch.equal(a, b), (fn, key)


def _hook_train(model, opt, steps: int) -> None:
    opt.attach_to_backward()
    for t in range(steps):
        ids = token_ids(t)
        assert opt.backward_step(model(ids, labels=ids).loss).applied


def test_fused_optimizer_equals_eager_in_hook_and_step_mode():
    """Apollo(fused=True) runs every bucket through the compiled function (on CUDA it would also
    capture it): same results as fused=False, across a projection period and the first step."""
    models = [tiny_llama() for _ in range(3)]
    opts = [make_optimizer(m, TrainPolicy(), lr=1e-3, weight_decay=0.01, update_proj_gap=2, fused=f)
            for m, f in zip(models, (False, True, True))]
    _hook_train(models[0], opts[0], 5)
    _hook_train(models[1], opts[1], 5)
    for t in range(5):  # plain step() on the compiled path
        ids = token_ids(t)
        models[2](ids, labels=ids).loss.backward()
        opts[2].step()
        opts[2].zero_grad()
        assert opts[2].last_report.applied
    assert COMPILED.ok
    for fast in models[1:]:
        for (name, a), b in zip(models[0].named_parameters(), fast.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    for p, q in zip(models[1].parameters(), models[0].parameters()):
        if p.requires_grad:
            assert opts[1].state[p]["step"] == 5
            for key in ("exp_avg", "exp_avg_sq", "limiter_norm"):
                torch.testing.assert_close(opts[1].state[p][key], opts[0].state[q][key], rtol=1e-5, atol=1e-8)


def test_bases_of_a_width_per_layer_compile_one_graph_for_every_layer():
    """Bases of another width in each decoder layer (as the null space's are) are held widened by zero columns where
    the update is compiled: the layers share one compiled graph instead of one each, and the weights are those of
    the eager update with the bases as given."""
    models = [tiny_llama() for _ in range(2)]
    opts = [make_optimizer(m, TrainPolicy(), lr=1e-3, rank=4, update_proj_gap=2, fused=f)  # channel scale
            for m, f in zip(models, (False, True))]
    for model, opt in zip(models, opts):
        opt.keep_out({p: orthonormal_basis(p.shape[1], 1 + int(name.split(".")[2]), i)  # layer l: l + 1 columns
                      for i, (name, p) in enumerate(model.named_parameters())
                      if p.requires_grad and p.dim() == 2 and opt.scales_input_columns(p)})
    assert opts[1].kept_out_bytes > opts[0].kept_out_bytes  # eager: held as given
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for model, opt in zip(models, opts):
        _hook_train(model, opt, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # 3 layers, 3 widths, one graph
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_const_buffers_upload_only_changed_rows():
    bufs = ConstBuffers()
    rows = [const_row(GROUP, 1), const_row(GROUP, 1)]
    a = bufs.load(rows, torch.device("cpu"))
    assert torch.equal(a, torch.tensor(rows))
    a.fill_(0)  # not re-uploaded while the rows are the same
    assert bufs.load(rows, torch.device("cpu")) is a and not a.any()
    b = bufs.load([const_row(GROUP, 2)] * 2, torch.device("cpu"))
    assert b is a and torch.equal(b, torch.tensor([const_row(GROUP, 2)] * 2))
    bufs.new_step()
    key = ("groups", 2, bufs.serial)
    assert not bufs.holds(torch.device("cpu"), 2, key)
    bufs.load(rows, torch.device("cpu"), key)
    assert bufs.holds(torch.device("cpu"), 2, key)


def test_plan_replays_only_what_it_was_captured_with():
    net = make_net()
    opt = Apollo(net.named_parameters(), lr=1e-2, update_proj_gap=3)
    loss_fn(net, 0).backward()
    opt.step()
    groups = [opt.param_groups[0], dict(opt.param_groups[0], update_proj_gap=2)]
    params = [net.a.weight, net.b.weight]
    states = [opt.state[p] for p in params]
    prepared = [Prepared(g, p, None, st, st["step"], torch.zeros(1))
                for g, p, st in zip(groups, params, states)]
    plan = Plan.of(prepared, torch.tensor(True))
    items = [(g, p, None) for g, p in zip(groups, params)]
    assert plan.matches(items, opt.state)
    assert plan.refresh_after(1) == 3 and plan.refresh_after(3) == 4  # gaps 2 and 3
    assert not plan.matches(items[::-1], opt.state)
    assert not plan.matches([(dict(groups[0]), params[0], None), items[1]], opt.state)
    states[0]["step"] += 1
    assert not plan.matches(items, opt.state)
    states[0]["step"] -= 1
    old = states[1]["exp_avg"]
    states[1]["exp_avg"] = old.clone()  # a replaced state tensor
    assert not plan.matches(items, opt.state)
    states[1]["exp_avg"] = old
    groups[0]["scale"] = "channel"  # a structural setting baked into the graph
    assert not plan.matches(items, opt.state)
    groups[0]["scale"] = "tensor"
    net.a.weight.data = net.a.weight.data.clone()  # the weight moved
    assert not plan.matches(items, opt.state)
    mixed = [prepared[0], prepared[1]._replace(step=prepared[1].step + 1)]
    assert Plan.of(mixed, torch.tensor(True)) is None  # parameters at different steps
