"""BackwardHooks, hook mode's gradient collection, on its own: a recording `flush` stands in for
the optimizer; the gradients are real autograd ones."""

import pytest
import torch

from onlinemodel_runtime.optim.hooks import BackwardHooks


def _chain():
    """y = x @ a1 @ a2 @ b: backward produces b's gradient first, then a2's, then a1's."""
    torch.manual_seed(0)
    ps = {n: torch.nn.Parameter(torch.randn(4, 4)) for n in ("a1", "a2", "b")}
    x = torch.randn(2, 4)

    def loss():
        return (x @ ps["a1"] @ ps["a2"] @ ps["b"]).pow(2).sum()

    expected = torch.autograd.grad(loss(), list(ps.values()))
    return ps, loss, dict(zip(ps, expected))


def _recorder():
    calls = []

    def flush(key, pairs):
        calls.append((key, [p for p, _ in pairs], [g for _, g in pairs]))
    return calls, flush


def test_complete_buckets_are_flushed_with_their_gradients_and_dropped():
    ps, loss, expected = _chain()
    calls, flush = _recorder()
    hooks = BackwardHooks(flush)
    hooks.attach([(ps["a1"], "A"), (ps["a2"], "A"), (ps["b"], "B")])
    hooks.attach([(ps["a1"], "A")])  # idempotent: no second hook, no larger bucket
    assert hooks.bucket_sizes == {"A": 2, "B": 1}
    hooks.arm()
    loss().backward()
    hooks.disarm(flush_held=True)
    assert [(k, len(p)) for k, p, _ in calls] == [("B", 1), ("A", 2)]
    for _, params, grads in calls:
        for p, g in zip(params, grads):
            assert torch.equal(g, expected[next(n for n, q in ps.items() if q is p)])
    assert all(p.grad is None for p in ps.values())
    assert hooks.flush_ns > 0


def test_a_bucket_interrupted_by_another_is_flushed_first_and_at_most_one_is_held():
    ps, loss, _ = _chain()
    calls, flush = _recorder()
    hooks = BackwardHooks(flush)
    # Bucket A = {b, a1} gets b's gradient, then a2's (bucket B) arrives: A is flushed incomplete.
    hooks.attach([(ps["b"], "A"), (ps["a1"], "A"), (ps["a2"], "B")])
    held = []
    for p in ps.values():  # runs after the optimizer's hook
        p.register_post_accumulate_grad_hook(lambda q: held.append(hooks.held()))
    hooks.arm()
    loss().backward()
    assert [(k, len(p)) for k, p, _ in calls] == [("A", 1), ("B", 1)]
    assert held == [{"A"}, set(), {"A"}]  # a1's gradient waits for the rest of its bucket
    hooks.disarm(flush_held=True)  # finish_step: a bucket missing a gradient is flushed now
    assert [(k, len(p)) for k, p, _ in calls][-1] == ("A", 1) and not hooks.held()


def test_a_failed_backward_drops_the_held_bucket():
    ps, loss, _ = _chain()
    calls, flush = _recorder()
    hooks = BackwardHooks(flush)
    hooks.attach([(ps["b"], "A"), (ps["a1"], "A"), (ps["a2"], "B")])
    hooks.arm()
    loss().backward()
    hooks.disarm(flush_held=False)
    assert len(calls) == 2 and not hooks.held() and not hooks.armed


def test_disarmed_or_detached_hooks_leave_gradients_alone():
    ps, loss, expected = _chain()
    calls, flush = _recorder()
    hooks = BackwardHooks(flush)
    frozen = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    hooks.attach([(p, "A") for p in ps.values()] + [(frozen, "A")])
    assert hooks.bucket_sizes == {"A": 3}  # a parameter without gradient is not waited for
    loss().backward()  # not armed: .grad accumulates as usual
    assert not calls and all(torch.equal(ps[n].grad, expected[n]) for n in ps)
    hooks.arm()
    with pytest.raises(RuntimeError):
        hooks.detach()
    hooks.disarm(flush_held=True)
    hooks.detach()
    assert not hooks.attached and hooks.bucket_sizes == {}
    for p in ps.values():
        p.grad = None
    hooks.arm()  # armed but detached: no hooks run
    loss().backward()
    assert not calls and all(p.grad is not None for p in ps.values())
