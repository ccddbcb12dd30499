"""The `served` fixture: the architecture a test_serving_*.py module names (its SHAPE) started once for
the module on random weights of a useful scale, its checkpoints deleted afterwards."""

from __future__ import annotations

import shutil

import pytest

from onlinemodel_runtime.devtools import served_checks as sc
from serving_models import ARCHITECTURES, LAYERS, Served, tokenizer_dir, write_random_model_dir


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    shape = request.module.SHAPE
    root = tmp_path_factory.mktemp(shape.replace(".", ""))
    model_dir = write_random_model_dir(root / "model", shape, tokenizer_dir(), layers=LAYERS)
    s = Served(shape, root, model_dir, ARCHITECTURES[shape])
    s.start(dummy=True)
    # vLLM's dummy weights (+-1e-3) give near-uniform logits and barely train: transformers' own
    # initialization instead, written into vLLM's memory through the exported views.
    sc.randomize_served(s.state_dir, model_dir)
    yield s
    s.server.stop()
    shutil.rmtree(s.checkpoint_dir, ignore_errors=True)  # GBs each; the disk is shared with the benchmark
