"""trainer/null_space.py on a tiny real model: the bases are orthonormal directions of each matrix's inputs, every
gradient is projected off them (so a plain SGD step leaves the layer's output on those directions unchanged),
a model whose moments exceed the memory bound gathers them in several passes to the same bases, and the trainer
builds it at the first job."""

from __future__ import annotations

import pytest
import torch

from onlinemodel_runtime.trainer.null_space import NullSpace, input_bases, input_spaces, moment_bytes, plan_passes
from tests.runtime.trainer.test_trainer_service import EXAMPLE, build, run_all, tiny_dir  # noqa: F401
from tests.runtime.trainer.test_trainer_service_continual import submit


@pytest.fixture(scope="module")
def anchors(tiny_dir):  # noqa: F811
    from transformers import AutoTokenizer

    from onlinemodel_runtime.trainer.anchor import encode_anchors

    return encode_anchors(AutoTokenizer.from_pretrained(tiny_dir))[:16]


def tiny(tiny_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def test_the_bases_are_orthonormal_and_shared_by_matrices_that_read_the_same_input(tiny_dir, anchors):  # noqa: F811
    model = tiny(tiny_dir)
    bases = input_bases(model, anchors, 0.9)
    layer = "model.layers.0"
    assert {f"{layer}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} <= set(bases)
    assert bases[f"{layer}.self_attn.q_proj.weight"] is bases[f"{layer}.self_attn.v_proj.weight"]
    assert bases[f"{layer}.mlp.gate_proj.weight"] is bases[f"{layer}.mlp.up_proj.weight"]
    assert bases[f"{layer}.self_attn.o_proj.weight"] is not bases[f"{layer}.self_attn.q_proj.weight"]
    for u in bases.values():
        assert 1 <= u.shape[1] < u.shape[0]
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-4, rtol=0)
    # More energy, more directions
    more = input_bases(model, anchors, 0.99)
    assert all(more[n].shape[1] >= u.shape[1] for n, u in bases.items())
    assert sum(more[n].shape[1] for n in bases) > sum(u.shape[1] for u in bases.values())


def test_a_step_leaves_each_matrix_unchanged_on_its_kept_directions(tiny_dir, anchors):  # noqa: F811
    model = tiny(tiny_dir)
    space = NullSpace(anchors, 0.9, max_bytes=2**30)
    space.build(model)
    assert space.ready and space.summary()["matrices"] == len(space._bases) > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([EXAMPLE.input_ids])
    model(input_ids=ids, labels=torch.tensor([EXAMPLE.labels])).loss.backward()
    sgd.step()
    moved = 0
    for name, p in model.named_parameters():
        if name in space._bases:
            delta = p.detach() - before[name]
            u = space._bases[name]
            assert float((delta @ u).norm()) <= 1e-5 * max(float(delta.norm()), 1e-12), name
            moved += float(delta.norm()) > 0
    assert moved == len(space._bases)  # every projected matrix still learns, in the other directions

    space.detach()  # without the hooks the same step moves the kept directions too
    model.zero_grad()
    model(input_ids=ids, labels=torch.tensor([EXAMPLE.labels])).loss.backward()
    name = "model.layers.0.mlp.down_proj.weight"
    g = dict(model.named_parameters())[name].grad
    assert float((g @ space._bases[name]).norm()) > 1e-3 * float(g.norm())


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_with_the_optimizer_every_matrix_s_whole_update_stays_off_its_kept_directions(tiny_dir, anchors,  # noqa: F811
                                                                                      with_optimizer):
    # APOLLO at rank 64 scales q, k, v, o and down_proj's updates per input column, which brings back into U what the
    # gradient's projection took out; given the optimizer, the null space has it project those updates too.
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer

    model = tiny(tiny_dir)
    opt = make_optimizer(model, TrainPolicy(), lr=1e-3, rank=64)
    space = NullSpace(anchors, 0.9, max_bytes=2**30, optimizer=opt if with_optimizer else None)
    space.build(model)
    left = {n for n in space._bases if opt.scales_input_columns(dict(model.named_parameters())[n])}
    assert left and len(left) < len(space._bases)
    assert space.summary()["updates_projected"] == (len(left) if with_optimizer else 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=torch.tensor([EXAMPLE.input_ids]), labels=torch.tensor([EXAMPLE.labels])).loss.backward()
    opt.step()
    leaks = {}
    for name, p in model.named_parameters():
        if name in space._bases:
            delta = p.detach() - before[name]
            assert float(delta.norm()) > 0, name
            leaks[name] = float((delta @ space._bases[name]).norm() / delta.norm())
    assert max(leaks[n] for n in space._bases if n not in left) < 1e-4  # a scale per row: the gradient's suffices
    if with_optimizer:
        assert max(leaks[n] for n in left) < 1e-4
    else:
        assert min(leaks[n] for n in left) > 1e-3
    if with_optimizer:
        assert len(opt._kept_out) == len(left)
        space.detach()
        assert opt._kept_out == {}


def test_the_input_spaces_are_found_in_forward_order_with_their_readers(tiny_dir, anchors):  # noqa: F811
    model = tiny(tiny_dir)
    spaces = input_spaces(model, anchors[0].input_ids[:8])
    layer = "model.layers.0"
    assert spaces[:4] == [[f"{layer}.self_attn.{m}_proj.weight" for m in "qkv"], [f"{layer}.self_attn.o_proj.weight"],
                          [f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"],
                          [f"{layer}.mlp.down_proj.weight"]]
    assert len(spaces) == 4 * model.config.num_hidden_layers


def test_passes_pack_spaces_under_the_bound_and_skip_a_space_larger_than_it(tiny_dir, anchors):  # noqa: F811
    model = tiny(tiny_dir)
    spaces = input_spaces(model, anchors[0].input_ids[:8])
    sizes = [moment_bytes(model, s) for s in spaces]
    passes, skipped = plan_passes(model, spaces, sum(sizes))
    assert passes == [spaces] and skipped == []
    small = min(sizes)
    passes, skipped = plan_passes(model, spaces, small)  # only the smallest spaces fit, one per pass
    assert all(len(p) == 1 for p in passes) and len(passes) == sizes.count(small)
    assert len(skipped) == len(spaces) - len(passes)
    bound = 2 * max(sizes)
    passes, _ = plan_passes(model, spaces, bound)
    assert [s for p in passes for s in p] == spaces and len(passes) > 1
    assert all(sum(moment_bytes(model, s) for s in p) <= bound for p in passes)


def test_a_model_past_the_memory_bound_gathers_the_same_bases_in_several_passes(tiny_dir, anchors):  # noqa: F811
    model = tiny(tiny_dir)
    one = NullSpace(anchors, 0.9, max_bytes=2**30)
    one.build(model)
    spaces = input_spaces(model, anchors[0].input_ids[:8])
    bound = 2 * max(moment_bytes(model, s) for s in spaces)
    several = NullSpace(anchors, 0.9, max_bytes=bound)
    several.build(model)
    assert one.summary()["passes"] == 1 and several.summary()["passes"] > 1
    assert several.ready and several._bases.keys() == one._bases.keys()
    for name, u in one._bases.items():
        torch.testing.assert_close(several._bases[name] @ several._bases[name].T, u @ u.T, atol=1e-4, rtol=0)
    # The anchor record's forwards gather the first pass; build() the rest.
    from onlinemodel_protocol import limits
    from onlinemodel_runtime.trainer.anchor import AnchorTerm

    shared = NullSpace(anchors, 0.9, max_bytes=bound)
    with shared.gathering(model):
        AnchorTerm(anchors, 1.0, limits.ANCHOR_PER_STEP, limits.ANCHOR_TOP_K).record(model, untouched=True)
    assert not shared.ready and shared.summary()["passes"] == 1
    shared.build(model)
    assert shared.ready and shared.summary()["passes"] == several.summary()["passes"]
    assert shared.directions == several.directions


def test_a_bound_no_input_space_fits_turns_it_off_with_the_reason(tiny_dir, anchors):  # noqa: F811
    model = tiny(tiny_dir)
    spaces = input_spaces(model, anchors[0].input_ids[:8])
    smallest = min(moment_bytes(model, s) for s in spaces)
    space = NullSpace(anchors, 0.9, max_bytes=smallest - 1)
    space.build(model)
    summary = space.summary()
    assert not space.enabled and not space.ready and "GiB" in summary["reason"]
    assert summary["skipped"] == sum(len(s) for s in spaces) and summary["passes"] == 0


@pytest.mark.parametrize("energy", [-0.1, 1.0, 2, True, "0.9"])
def test_an_energy_outside_zero_to_one_is_refused(anchors, energy):
    with pytest.raises(ValueError, match="energy"):
        NullSpace(anchors, energy, max_bytes=2**30)


def test_an_energy_without_conversations_is_refused():
    with pytest.raises(ValueError, match="conversation"):
        NullSpace([], 0.9, max_bytes=2**30)
    assert NullSpace([], 0.0, max_bytes=2**30).summary()["reason"] == "off (energy 0)"


def test_the_trainer_builds_it_at_the_first_job_and_learns(tiny_dir, tmp_path, anchors):  # noqa: F811
    service = build(tiny_dir, tmp_path, anchors, null_space_energy=0.9)
    with torch.no_grad():
        untouched_loss = float(service.model(input_ids=torch.tensor([EXAMPLE.input_ids]),
                                             labels=torch.tensor([EXAMPLE.labels])).loss)
    assert service.status().null_space.model_dump() == {
        "energy": 0.9, "enabled": True, "matrices": 0, "updates_projected": 0, "directions": 0, "basis_bytes": 0,
        "passes": 0, "skipped": 0, "reason": None}
    submit(service, EXAMPLE, epochs=20, learning_rate=2e-2)
    run_all(service)
    status = service.status()
    assert status.jobs[0].state == "succeeded" and status.jobs[0].steps == 20
    assert status.null_space.matrices > 0 and status.null_space.directions > 0 and status.null_space.basis_bytes > 0
    # build()'s optimizer is APOLLO-Mini: one scale per matrix keeps a projected gradient's update projected
    assert status.null_space.updates_projected == 0 and service.null_space.optimizer is service.optimizer
    assert status.jobs[0].last_loss < 0.5 * untouched_loss


def test_the_anchor_records_forwards_build_the_same_bases(tiny_dir, anchors):  # noqa: F811
    from onlinemodel_protocol import limits
    from onlinemodel_runtime.trainer.anchor import AnchorTerm

    model = tiny(tiny_dir)
    own = NullSpace(anchors, 0.9, max_bytes=2**30)
    own.build(model)
    shared = NullSpace(anchors, 0.9, max_bytes=2**30)
    with shared.gathering(model):
        AnchorTerm(anchors, 1.0, limits.ANCHOR_PER_STEP, limits.ANCHOR_TOP_K).record(model, untouched=True)
    assert shared.ready
    assert shared._bases.keys() == own._bases.keys()
    for name, u in own._bases.items():  # the same subspaces (eigenvectors up to sign)
        torch.testing.assert_close(shared._bases[name] @ shared._bases[name].T, u @ u.T, atol=1e-4, rtol=0)
    # A record that ran only some of the conversations (the rest restored): the bases need their own pass.
    partial = NullSpace(anchors, 0.9, max_bytes=2**30)
    with partial.gathering(model):
        AnchorTerm(anchors[:3], 1.0, limits.ANCHOR_PER_STEP, limits.ANCHOR_TOP_K).record(model, untouched=True)
    assert not partial.ready
    partial.build(model)
    assert partial.ready


def test_a_bf16_model_projects_in_bf16_close_to_the_exact_projection(tiny_dir, anchors):  # noqa: F811
    # bf16 bases and matmuls (8B on an H200: 0.26 s a step instead of float32's 0.95 s; plain 0.15 s): what is left
    # in the kept directions is bf16 rounding, against a gradient that puts a real share there without the hooks.
    model = tiny(tiny_dir).to(torch.bfloat16)
    space = NullSpace(anchors, 0.9, max_bytes=2**30)
    space.build(model)
    assert {u.dtype for u in space._bases.values()} == {torch.bfloat16}
    ids, labels = torch.tensor([EXAMPLE.input_ids]), torch.tensor([EXAMPLE.labels])

    def kept_shares() -> dict[str, float]:
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        return {n: float((p.grad.float() @ space._bases[n].float()).norm() / p.grad.float().norm())
                for n, p in model.named_parameters() if n in space._bases}

    projected = kept_shares()
    space.detach()
    plain = kept_shares()
    print(f"kept share: projected at most {max(projected.values()):.4f}, plain at least {min(plain.values()):.4f}")
    assert max(projected.values()) < 0.02
    assert all(projected[n] < 0.1 * plain[n] for n in plain)
