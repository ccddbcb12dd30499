"""The pacer with a simulated load signal: idle is free, load is paced to the duty cycle, the yield points
fire in forward and backward (hook-mode updates, recomputation), and long MLPs split exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from onlinemodel_runtime.optim import make_optimizer
from onlinemodel_runtime.trainer.loop import train_step
from onlinemodel_runtime.trainer.pacing import MAX_PAUSE_SECONDS, POLL_SECONDS, Pacer

from trainer_fixtures import POLICY, FakeSignal, FakeTime, example, tiny_llama


def pacer_on(signal: FakeSignal, t: FakeTime, **kw) -> Pacer:
    return Pacer(signal, sync=t.sync, clock=t.clock, sleep=t.sleep, **kw)


def trained(model, pacer: Pacer | None, steps: int = 2):
    opt = make_optimizer(model, POLICY, lr=1e-2)
    opt.attach_to_backward()
    ids, labels = example()
    return [train_step(model, opt, ids, labels, pacer=pacer) for _ in range(steps)]


def test_no_load_means_no_sync_and_no_sleep():
    signal, t = FakeSignal(in_flight=0, duty=0.1), FakeTime()
    pacer = pacer_on(signal, t, slice_seconds=0.0)
    model = tiny_llama()
    pacer.install(model)
    trained(model, pacer)
    assert signal.reads > 0, "no yield point ran"
    assert (t.syncs, t.slept, pacer.paced_seconds) == (0, [], 0.0)


@pytest.mark.parametrize("duty", [0.2, 0.5, 0.9])
def test_load_is_paced_to_the_duty_cycle(duty):
    signal, t = FakeSignal(in_flight=3, duty=duty), FakeTime()
    pacer = pacer_on(signal, t, slice_seconds=1e-3)
    busy = 0.0
    for i in range(2000):
        op = (0.2 + 0.6 * (i % 5) / 4) * 1e-3  # ops of 0.2 to 0.8 ms
        t.advance(op)
        busy += op
        pacer.yield_point()
    assert t.syncs == 2000  # every yield point under load drains the queue
    measured = busy / (busy + pacer.paced_seconds)
    assert measured == pytest.approx(duty, rel=0.03)
    assert max(t.slept) <= POLL_SECONDS  # rests re-read the signal often


def test_slow_ops_still_get_their_duty_cycle():
    signal, t = FakeSignal(in_flight=1, duty=0.1), FakeTime()
    pacer = pacer_on(signal, t)
    pacer.yield_point()
    for _ in range(100):
        t.advance(0.03)  # 30 ms ops (a CPU's) earn 270 ms rests
        pacer.yield_point()
    assert 3.0 / (3.0 + pacer.paced_seconds) == pytest.approx(0.1, rel=0.01)


def test_a_rest_ends_as_soon_as_nobody_waits():
    t = FakeTime()

    def requests_end(sig: FakeSignal) -> None:
        if t.now >= 0.02:
            sig.set_in_flight(0)

    signal = FakeSignal(in_flight=1, duty=0.1, on_read=requests_end)
    pacer = pacer_on(signal, t)
    pacer.yield_point()
    t.advance(0.01)  # earns a 90 ms rest
    pacer.yield_point()
    assert 0.02 <= t.now <= 0.02 + POLL_SECONDS
    t.advance(0.01)
    pacer.yield_point()  # nobody waits: no sync, no rest
    assert t.syncs == 2 and t.now == pytest.approx(0.03, abs=POLL_SECONDS)


def test_short_ops_are_gathered_into_slices_before_a_sleep():
    signal, t = FakeSignal(in_flight=1, duty=0.5), FakeTime()
    pacer = pacer_on(signal, t, slice_seconds=1e-3)
    for _ in range(40):
        t.advance(0.1e-3)
        pacer.yield_point()
    # The first yield starts the clock; then a sleep once a slice of at least 1 ms has been computed
    # (10 or 11 ops of 0.1 ms, as the sums round), as long as the slice at duty 0.5.
    assert len(t.slept) == 3 and all(1e-3 - 1e-12 <= s <= 1.1e-3 + 1e-12 for s in t.slept)


def test_the_controllers_slice_scale_shortens_slices_and_token_chunks():
    signal, t = FakeSignal(in_flight=1, duty=0.5, slice_scale=0.25), FakeTime()
    pacer = pacer_on(signal, t, slice_seconds=1e-3, slice_flops=1e6)
    for _ in range(40):
        t.advance(0.1e-3)
        pacer.yield_point()
    # Slices of 0.25 ms (3 ops of 0.1 ms, as the sums round) at duty 0.5, each followed by as long a rest:
    # 13 after the first yield, which only starts the clock.
    assert len(t.slept) == 13 and all(0.25e-3 <= s <= 0.3e-3 + 1e-12 for s in t.slept)
    assert pacer.tokens_per_slice(1e3) == 250  # 1e6 x 0.25 FLOPs per slice
    signal.slice_scale = 1.0
    assert pacer.tokens_per_slice(1e3) == 1000


def test_full_duty_never_sleeps_and_load_arriving_starts_a_fresh_slice():
    signal, t = FakeSignal(in_flight=0, duty=1.0), FakeTime()
    pacer = pacer_on(signal, t)
    t.advance(5.0)  # a long idle stretch must not count as busy time once requests arrive
    signal.set_in_flight(1)
    signal.duty = 0.5
    pacer.yield_point()
    assert t.slept == []
    t.advance(1e-3)
    pacer.yield_point()
    assert t.slept == [pytest.approx(1e-3)]
    signal.duty = 1.0
    for _ in range(10):
        t.advance(1e-3)
        pacer.yield_point()
    assert len(t.slept) == 1


def test_zero_duty_holds_until_the_probe_ends_or_nobody_waits():
    t = FakeTime()

    def probe_ends_after_a_while(sig: FakeSignal) -> None:
        if t.now >= 0.3:
            sig.duty = 0.5

    signal = FakeSignal(in_flight=1, duty=0.0, on_read=probe_ends_after_a_while)
    pacer = pacer_on(signal, t, slice_seconds=0.0)
    pacer.yield_point()
    t.advance(1e-3)
    pacer.yield_point()
    assert 0.3 <= t.now < 0.3 + 2 * POLL_SECONDS
    assert pacer.paced_seconds == pytest.approx(t.now - 1e-3)
    # A signal stuck at 0 (its writer gone) holds the trainer at most MAX_PAUSE_SECONDS per yield point.
    stuck, t2 = FakeSignal(in_flight=1, duty=0.0), FakeTime()
    pacer = pacer_on(stuck, t2, slice_seconds=0.0)
    pacer.yield_point()
    t2.advance(1e-3)
    pacer.yield_point()
    assert MAX_PAUSE_SECONDS <= t2.now <= MAX_PAUSE_SECONDS + 2 * POLL_SECONDS


def _linear_calls(model, ids) -> int:
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return len(calls)


@pytest.mark.parametrize("recompute", [False, True])
def test_yield_points_fire_in_forward_and_backward(recompute):
    model = tiny_llama(layers=3)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pacer = Pacer(FakeSignal(in_flight=0))
    by_phase: dict[str, int] = {}
    real_yield = pacer.yield_point

    def counting_yield() -> None:
        by_phase[pacer.phase] = by_phase.get(pacer.phase, 0) + 1
        real_yield()

    pacer.yield_point = counting_yield  # the hooks call it through the instance
    pacer.install(model)
    ids, _ = example()
    linears = _linear_calls(model, ids)  # 7 per layer + the LM head (one loss chunk)
    assert linears == 3 * 7 + 1
    (result,) = trained(model, pacer, steps=1)
    assert result.applied and result.params_updated > 0  # hook mode: layers were updated during backward
    # Forward: one yield per Linear call. Backward: one before each Linear's backward, one per recomputed
    # Linear (the loss chunk always; every decoder layer's seven with recomputation).
    assert by_phase["forward"] == linears
    assert by_phase["backward"] == linears + 1 + (3 * 7 if recompute else 0)


@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_token_chunks_are_exact_and_replayed_by_recomputation(recompute):
    reference = tiny_llama(dtype=torch.float32)
    chunked = copy.deepcopy(reference)
    if recompute:
        chunked.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = FakeTime()
    signal = FakeSignal(in_flight=2, duty=1.0)
    mlp = chunked.model.layers[0].mlp
    flops = 4 * mlp.gate_proj.in_features * mlp.gate_proj.out_features
    pacer = pacer_on(signal, t, slice_flops=flops * 16)  # 16 tokens per slice: 40 tokens -> 3 chunks
    pacer.install(chunked)
    seen = []
    inner = mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-2]))
    ref_loss = trained(reference, None, steps=1)[0].loss

    def drop_load_in_backward(_sig):
        if pacer.phase == "backward":
            signal.set_in_flight(0)  # recomputation must replay the forward's chunks even so

    signal.on_read = drop_load_in_backward
    loss = trained(chunked, pacer, steps=1)[0].loss
    inner.remove()
    assert seen == [14, 13, 13] * (2 if recompute else 1)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for (name, p), q in zip(reference.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_disabled_pacer_installs_nothing_and_reports_off():
    model = tiny_llama()
    pacer = Pacer(FakeSignal(in_flight=4, duty=0.3), enabled=False)
    pacer.install(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert pacer.tokens_per_slice(1e6) is None
    status = pacer.status()
    assert (status.mode, status.max_decode_slowdown, status.duty_cycle, status.in_flight_requests) == ("off", None, 1.0, 4)


def test_status_and_removal():
    model = tiny_llama()
    original = type(model.model.layers[0].mlp).forward
    t = FakeTime()
    pacer = pacer_on(FakeSignal(in_flight=1, duty=0.25), t)
    pacer.install(model)
    assert model.model.layers[0].mlp.forward.func == pacer._chunked
    pacer.yield_point()
    t.advance(0.1)
    pacer.yield_point()  # rests 0.3 s
    status = pacer.status()
    assert (status.mode, status.duty_cycle, status.in_flight_requests, status.paced_seconds,
            status.baseline_itl_ms, status.measured_slowdown) == ("measured", 0.25, 1, 0.3, 5.0, 1.1)
    assert (status.measured_p99_slowdown, status.baseline_p99_itl_ms, status.p99_itl_ms, status.slice_ms) == (
        1.2, 5.5, 6.6, pacer.slice_seconds * 1e3)
    assert Pacer(FakeSignal(mode="fixed")).status().note.startswith("onlinemodel's stat-logger plugin")
    pacer.remove()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert model.model.layers[0].mlp.forward.__func__ is original
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tiny_llama().named_parameters()]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="slice_flops"):
        Pacer(FakeSignal(), slice_flops=0)
