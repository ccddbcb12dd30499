"""Runs inside vLLM's own processes, entered only through vLLM's plugin entry points.

- ``worker.py``: the ``vllm.general_plugins`` entry (every vLLM process, the engine worker included): CPU
  inference reads the live weights; ``WeightExportExtension`` (``--worker-extension-cls``) exports them.
- ``endpoint.py``: the ``vllm.endpoint_plugins`` entry (the API server process): the ``/train``,
  ``/train/status`` and ``/checkpoint`` routes.
- ``compat.py``: every private vLLM internal the runtime touches, behind a version check.
"""
