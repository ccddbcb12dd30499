"""The loss half of a checkpoint's health: non-finite losses, divergence, and what is not divergence."""

from __future__ import annotations

import math

import pytest

from onlinemodel_runtime.trainer.loss_health import LossHealth

VOCAB = 49152  # ln: 10.8


def fed(losses, window=4) -> LossHealth:
    health = LossHealth(VOCAB, window=window)
    for loss in losses:
        health.observe(loss)
    return health


def test_a_learning_model_is_healthy():
    assert fed([1.4, 0.9, 0.5, 0.2, 0.05, 0.02, 0.01, 0.005]).verdict() is None


def test_a_non_finite_loss_in_the_window_is_unhealthy_until_it_leaves():
    health = fed([0.5, 0.4, float("nan"), 0.4])
    assert "1 of the last 4" in health.verdict() and "non-finite" in health.verdict()
    for _ in range(2):
        health.observe(0.4)
        assert health.verdict() is not None
    health.observe(0.4)  # the NaN step leaves the window
    assert health.verdict() is None


def test_an_exploding_loss_is_diverging():
    health = fed([0.5] * 4 + [30.0] * 4)
    assert "diverging" in health.verdict() and "uniform guess (10.8)" in health.verdict()


@pytest.mark.parametrize("losses", [
    [0.005] * 4 + [2.5] * 4,  # new data the model has not learned yet: far above the best, far below ln(V)
    [11.2, 11.0, 10.9, 11.1] * 3,  # random weights start at the uniform guess
    [0.5] * 4 + [30.0],  # one bad step: the window's mean stays below the bound
])
def test_what_is_not_divergence(losses):
    assert fed(losses).verdict() is None


def test_state_round_trips_through_json():
    import json

    health = fed([0.5, float("nan"), 0.3, 0.2, 0.1, 0.1, 0.1, 0.1])
    again = LossHealth(VOCAB, window=4)
    again.load_state_dict(json.loads(json.dumps(health.state_dict())))
    assert again.state_dict() == health.state_dict() and again.verdict() == health.verdict()
    assert math.isclose(again.best_mean, 0.1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LossHealth(VOCAB, window=0)
    with pytest.raises(ValueError):
        LossHealth(VOCAB, factor=1.0)
