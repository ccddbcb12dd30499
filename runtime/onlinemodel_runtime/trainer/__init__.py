"""The trainer process (``python -m onlinemodel_runtime.trainer``): attaches to vLLM's weights, trains
them in place, checkpoints them.

- ``__main__.py``: start-up: attach the weights, build the model (per-layer recomputation on a GPU), the
  optimizer and the pacer, restore, serve.
- ``server.py``: the ZMQ server answering the API server (operations of ``onlinemodel_protocol.rpc``).
- ``service.py``: ``TrainerService``: jobs (submit, cancel), counters, checkpoints (healthy ones promoted),
  rollbacks (the guard's, and ``POST /rollback``'s from a checkpoint).
- ``guard.py``: the guard's probes and held-out loss, and the rule for a regression; ``served_answers.py``:
  the probes asked of vLLM; ``snapshot.py``: the trained weights and optimizer state of before a job.
- ``job_queue.py``: the FIFO of jobs, a queued one removable; ``loss_health.py``: whether the loss looks healthy.
- ``loop.py``: the training step; ``loss.py``: its loss over the vocabulary in chunks.
- ``pacing.py``: ``Pacer``: serving first, yielding the GPU while requests wait for tokens.
- ``memory.py``: the trainer's memory beyond the weights, and the longest example that fits.
- ``debug.py``: introspection for tests (where parameters live, resident memory).
"""
