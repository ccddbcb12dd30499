"""bench/null_space_build.py measures the trainer's own NullSpace: on a tiny model of the seed's family (Qwen3.5,
with its Gated DeltaNet layers), under a bound that forces several passes, every trained matrix read in the
forward gets a basis and the table names the passes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import null_space_build as bench  # noqa: E402

from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir  # noqa: E402


def test_a_tiny_model_is_gathered_in_several_passes(tmp_path):
    arch = "qwen3_5_text"
    model_dir = make_tiny_model_dir(arch, tmp_path / arch, num_hidden_layers=4)
    whole = bench.measure(model_dir, "cpu", 0.9, max_bytes=2**30, step=False, conversations=8)
    assert whole["passes"] == 1 and whole["skipped"] == 0 and whole["conversations"] == 8
    assert whole["matrices"] == whole["trained_matrices"] > 0 and whole["directions"] > 0
    bound = whole["all_moments_bytes"] // 3
    several = bench.measure(model_dir, "cpu", 0.9, max_bytes=bound, step=True, conversations=8)
    assert several["passes"] >= 3 and several["matrices"] + several["skipped"] == several["trained_matrices"]
    assert several["step_seconds_projected"] > 0 and several["step_seconds_plain"] > 0
    several["label"] = arch
    assert f"| {arch} | cpu | {several['trained_matrices']} |" in bench.table([several])
