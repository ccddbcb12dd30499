import pytest
import torch

from onlinemodel_runtime.optim.rounding import (
    RoundingGenerators,
    apply_update_,
    master_value,
    split_master,
    stochastic_add_,
    stochastic_round_to_bf16,
)


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3.0
    trials = torch.stack([stochastic_round_to_bf16(x, g).float() for _ in range(400)])
    ulp = (x.abs().to(torch.bfloat16).float() * 2.0**-7).clamp_min(1e-30)
    err = (trials.mean(0) - x) / ulp
    # Mean of 400 draws of a value in {lo, hi}: standard error <= 0.5/sqrt(400) = 0.025 ulp.
    assert err.abs().mean() < 0.02
    assert err.abs().max() < 0.15
    # Every draw is one of the two neighbouring bf16 values.
    assert ((trials - x).abs() <= ulp * 1.0001).all()


def test_exact_bf16_values_are_untouched():
    x = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(stochastic_round_to_bf16(x.float()), x)
    w = x.clone()
    apply_update_(w, torch.randn(1000), torch.zeros(()), decay=1.0, ok=torch.tensor(True))
    assert torch.equal(w, x)


def test_small_updates_are_not_lost():
    g = torch.Generator().manual_seed(1)
    n, steps, delta = 2048, 500, 1e-4  # delta is ~1/80 of a bf16 ulp at 1.0
    sr = torch.ones(n, dtype=torch.bfloat16)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    for _ in range(steps):
        stochastic_add_(sr, torch.full((n,), delta), generator=g)
        nearest.add_(delta)
    exact = 1.0 + steps * delta
    assert torch.equal(nearest, torch.ones(n, dtype=torch.bfloat16))  # round-to-nearest loses all
    assert abs(sr.float().mean().item() - exact) < 0.1 * steps * delta


def test_generator_makes_rounding_reproducible():
    x = torch.randn(512)
    a = stochastic_round_to_bf16(x, torch.Generator().manual_seed(5))
    b = stochastic_round_to_bf16(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_apply_update_gate_and_chunks():
    w = torch.randn(64, 33).to(torch.bfloat16)
    before = w.clone()
    grad = torch.randn(64, 33)
    grad[3, 4] = float("nan")
    apply_update_(w, grad, torch.tensor(-0.1), decay=0.9, ok=torch.tensor(False), chunk_elems=100)
    assert torch.equal(w, before)
    grad[3, 4] = 0.0
    coeff = torch.linspace(0.1, 1.0, 64).unsqueeze(1)  # one factor per row, sliced per chunk
    ref = before.float() * 0.9 + coeff * grad
    apply_update_(w, grad, coeff, decay=0.9, ok=torch.tensor(True), chunk_elems=100)
    assert ((w.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()


def test_rounding_generators_round_trip_their_state():
    gens = RoundingGenerators()
    g = gens.get(torch.device("cpu"), seed=3)
    assert gens.get(torch.device("cpu"), seed=99) is g  # seeded once, on first use
    x = torch.randn(256)
    stochastic_round_to_bf16(x, g)
    saved = gens.state_dict()
    a = stochastic_round_to_bf16(x, g)
    fresh = RoundingGenerators()
    fresh.load_state_dict(saved, seed=3)
    assert torch.equal(stochastic_round_to_bf16(x, fresh.get(torch.device("cpu"), 3)), a)
    assert not torch.equal(stochastic_round_to_bf16(x, RoundingGenerators().get(torch.device("cpu"), 3)), a)


def test_compensated_rounding_keeps_small_updates_without_noise():
    n, steps, delta = 2048, 500, 1e-4  # as above: each update ~1/80 of a bf16 ulp at 1.0
    w = torch.ones(n, dtype=torch.bfloat16)
    residual = torch.zeros(n, dtype=torch.int16)
    for _ in range(steps):
        apply_update_(w, torch.full((n,), delta), torch.tensor(1.0), decay=1.0, ok=torch.tensor(True),
                      rounding="compensated", residual=residual)
    master = torch.ones(n)  # what a float32 trainer holds after the same updates
    for _ in range(steps):
        master += delta
    # The float32 master, bit for bit, and served to nearest (no noise: every element alike).
    assert torch.equal(master_value(w, residual), master)
    assert torch.equal(w, master.to(torch.bfloat16))
    assert abs(master[0].item() - (1.0 + steps * delta)) < 1e-5


def test_split_master_rounds_to_nearest_and_keeps_every_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100_000, generator=g) * torch.logspace(-30, 30, 100_000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-42, -1e-42, 3.0, -3.0, 2.0**-7])])
    w, r = split_master(x)
    assert w.dtype == torch.bfloat16 and r.dtype == torch.int16
    assert torch.equal(master_value(w, r), x)
    # As near as torch's round-to-nearest-even; ties go away from zero instead.
    assert torch.equal((w.float() - x).abs(), (x.to(torch.bfloat16).float() - x).abs())


def test_compensated_rounding_chunks_gate_and_arguments():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(64, 33, generator=g).to(torch.bfloat16)
    upd = torch.randn(64, 33, generator=g) * 1e-3
    r0 = torch.randint(-32768, 32768, (64, 33), generator=g, dtype=torch.int16)
    outs = []
    for chunk in (None, 100):
        w, r = w0.clone(), r0.clone()
        apply_update_(w, upd, torch.tensor(0.5), decay=0.99, ok=torch.tensor(True), rounding="compensated",
                      residual=r, chunk_elems=chunk)
        outs.append((w, r))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], w0)
    w, r = w0.clone(), r0.clone()
    apply_update_(w, upd, torch.tensor(0.5), decay=0.99, ok=torch.tensor(False), rounding="compensated", residual=r)
    assert torch.equal(w, w0) and torch.equal(r, r0)  # gated off: the remainder is kept too
    for kwargs in (dict(rounding="compensated"), dict(rounding="nearest", residual=r),
                   dict(rounding="compensated", residual=r.to(torch.bfloat16)), dict(rounding="up")):
        with pytest.raises(ValueError):
            apply_update_(w, upd, torch.tensor(0.5), decay=1.0, ok=torch.tensor(True), **kwargs)
    f = w0.float()  # float32 weights take the update exactly: no remainder
    apply_update_(f, upd, torch.tensor(0.5), decay=1.0, ok=torch.tensor(True), rounding="compensated")
    assert torch.equal(f, w0.float() + upd * 0.5)
