"""The contracts between onlinemodel's processes: pure pydantic, no torch, no vLLM.

A separate package because both images need it: the runtime image (vLLM + the runtime) and the operator
image (no runtime code, no torch) both install it.

- ``limits.py``: every default and bound of a training setting (CLI flags, ``POST /train``, the CRD).
- ``config.py``: ``RuntimeConfig``, what ``onlinemodel serve`` hands to vLLM's API server and the trainer.
- ``api.py``: the HTTP bodies of ``/train``, ``/train/status`` and ``/checkpoint`` (the runtime builds them,
  the operator reads them).
- ``rpc.py``: inside the pod: vLLM plugin and worker-extension names, and the trainer's ZMQ operations with
  their argument and result models.
"""
