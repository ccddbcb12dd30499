"""bench/train_step_defaults.py times the trainer's own step at the defaults and without each part, on a tiny
model of the seed's family (Qwen3.5, Gated DeltaNet layers): every configuration is measured, the whole updates
are kept out where the defaults keep them, and the table has a row for each."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import train_step_defaults as bench  # noqa: E402

from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir  # noqa: E402


def test_every_part_of_a_default_step_is_timed_on_a_tiny_model(tmp_path):
    arch = "qwen3_5_text"
    model_dir = make_tiny_model_dir(arch, tmp_path / arch, num_hidden_layers=4)
    result = bench.measure(model_dir, "cpu", steps=1, warmup=0, tokens=32, conversations=8)
    configs = [c["config"] for c in result["configs"]]
    assert len(configs) == len(set(configs)) == 7 and configs[0].startswith("defaults")
    assert all(c["step_seconds"] > 0 for c in result["configs"])
    assert 0 < result["null_space"]["updates_projected"] < result["null_space"]["matrices"]
    result["label"] = arch
    rows = bench.table([result]).splitlines()
    assert len(rows) == 2 + 7 and all(f"| {arch} | cpu |" in row for row in rows[2:])
