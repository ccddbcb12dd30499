"""The contracts between onlinemodel's processes: pydantic (and httpx for the client), no torch, no vLLM.

A separate package because both images need it: the runtime image (vLLM + the runtime) and the operator
image (no runtime code, no torch) both install it.

- ``limits.py``: every default and bound of a training setting (CLI flags, ``POST /train``, the CRD).
- ``config.py``: ``RuntimeConfig``, what ``onlinemodel serve`` hands to vLLM's API server and the trainer.
- ``api.py``: the HTTP bodies of ``/train``, ``/train/status`` and ``/checkpoint`` (the runtime builds them,
  the operator reads them).
- ``client.py``: the typed HTTP client of the training routes (sync and async, httpx), used by
  ``onlinemodel train``/``checkpoint`` and the operator.
- ``rpc.py``: inside the pod: vLLM plugin and worker-extension names, and the trainer's ZMQ operations with
  their argument and result models.
"""
