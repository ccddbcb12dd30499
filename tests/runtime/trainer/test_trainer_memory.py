"""Sizing: the step-peak line from measurements, and the longest example beside vLLM."""

from __future__ import annotations

import pytest

from onlinemodel_runtime.trainer.memory import fit_peak_line, largest_example_tokens

GiB = 2**30


def test_line_through_measured_peaks():
    fixed, per_token = fit_peak_line([(512, 2 * GiB + 512 * 1000), (2048, 2 * GiB + 2048 * 1000)])
    assert (fixed, per_token) == pytest.approx((2 * GiB, 1000))
    with pytest.raises(ValueError, match="two or more"):
        fit_peak_line([(2048, GiB), (2048, 2 * GiB)])


@pytest.mark.parametrize("utilization,tokens", [
    # 141 GiB card; the trainer keeps 1 GiB outside torch's allocator, 4 GiB fixed, 0.5 MiB per token.
    (0.85, int((0.15 * 141 * GiB - 5 * GiB) // (GiB / 2048))),
    (0.75, int((0.25 * 141 * GiB - 5 * GiB) // (GiB / 2048))),
    (0.99, 0),  # not even an empty step fits
])
def test_largest_example_beside_vllm(utilization, tokens):
    assert largest_example_tokens(device_total_bytes=141 * GiB, gpu_memory_utilization=utilization,
                                  fixed_bytes=4 * GiB, bytes_per_token=GiB / 2048,
                                  trainer_overhead_bytes=GiB) == tokens


@pytest.mark.parametrize("kw,message", [(dict(gpu_memory_utilization=1.0), "not in"),
                                        (dict(bytes_per_token=0), "positive")])
def test_bad_sizing_inputs(kw, message):
    args = dict(device_total_bytes=141 * GiB, gpu_memory_utilization=0.8, fixed_bytes=GiB, bytes_per_token=1e6,
                trainer_overhead_bytes=GiB)
    with pytest.raises(ValueError, match=message):
        largest_example_tokens(**{**args, **kw})
