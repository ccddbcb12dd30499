"""The served weights, shared without a copy between vLLM's engine worker and the trainer process.

- ``shared.py``: export (in the worker: CUDA IPC handles, or one ``/dev/shm`` file on CPU) and attach (in
  the trainer), with the ``weights.json`` manifest between them.
- ``layouts.py``: per-architecture tables from vLLM's packed tensors (``qkv_proj``, ``gate_up_proj``) to
  Hugging Face names, as views.
- ``hf_model.py``: a transformers model whose parameters are those views (the trainer trains it).
"""
