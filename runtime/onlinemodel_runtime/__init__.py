"""The onlinemodel runtime: vLLM serves a model while a trainer process updates its weights in place.

Folders by the process they run in:

- ``cli.py``: ``onlinemodel serve`` (the container's entry point, parent of vLLM), ``checkpoint``,
  ``prepare-model``.
- ``vllm_plugins/``: inside vLLM (engine worker and API server), entered through vLLM's plugin entry points.
- ``server/``: vLLM's API server process, the training side: request parsing, trainer supervision, the
  trainer's client.
- ``weights/``: the weights shared between vLLM's worker and the trainer (export, attach, layouts, HF model).
- ``trainer/``: the trainer process (``python -m onlinemodel_runtime.trainer``): job queue, training steps,
  checkpoints.
- ``optim/``: the optimizer the trainer steps (APOLLO with stochastic rounding into bf16).
- ``checkpoint/``: Hugging Face checkpoint directories written atomically (used by the trainer and ``serve``).
- ``devtools/``: development tools outside the runtime's import graph (demo, launcher, model preparation).

The contracts between these processes (config, HTTP bodies, RPC names, every default and bound) live in
the separate ``onlinemodel_protocol`` package, which the operator imports too.
"""
