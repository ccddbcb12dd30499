"""Lets vLLM import its Qwen3-VL/Qwen3.5 modules in the CPU test environment, which has no torchvision.

vLLM's `models/qwen3_vl.py` (imported by `qwen3_5.py`) imports transformers' torchvision-backed Qwen2-VL
image processor at module level only to use its `smart_resize`. PyPI's torchvision wheels are CUDA builds
that fail to import beside the CPU torch (see the Makefile), so the vLLM loader tests put this directory on
PYTHONPATH: where torchvision is missing, that module name resolves to transformers' own PIL implementation
of the same processor. Only image preprocessing is affected, never a weight.
"""

import importlib
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is None:
    sys.modules["transformers.models.qwen2_vl.image_processing_qwen2_vl"] = importlib.import_module(
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
