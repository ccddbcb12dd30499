"""The trainer process (``python -m onlinemodel_runtime.trainer``): attaches to vLLM's weights, trains
them in place, checkpoints them.

- ``__main__.py``: start-up: attach the weights, build the model and optimizer, restore, serve.
- ``server.py``: the ZMQ server answering the API server (operations of ``onlinemodel_protocol.rpc``).
- ``service.py``: ``TrainerService``: the job queue, the training step, counters, checkpoints.
- ``debug.py``: introspection for tests (where parameters live, resident memory).
"""
