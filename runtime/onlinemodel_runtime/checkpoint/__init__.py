"""Checkpoints: Hugging Face model directories written atomically, one tensor at a time.

Usable without vLLM: torch, the standard library and onlinemodel_protocol (for the API's timestamps)
are all it needs (transformers only to load what was written). Used by the trainer process and by
``onlinemodel serve`` (which serves the latest checkpoint).
"""

from .errors import CheckpointBusy, CheckpointError, CheckpointNotFound, CheckpointUnusable
from .format import CheckpointInfo, validate_checkpoint
from .base_weights import BaseWeights
from .model_tensors import CheckpointNames, hf_weight_tensors
from .resume import ModelChanged, resume_point
from .safetensors_stream import (SafetensorsStreamWriter, TensorSpec, WeightFiles, read_header, specs_of,
                                 write_safetensors)
from .store import CheckpointStore
from .restore import LATEST, find_checkpoint, load_weights_into

__all__ = [
    "LATEST", "BaseWeights", "CheckpointBusy", "CheckpointError", "CheckpointInfo", "CheckpointNames",
    "CheckpointNotFound", "CheckpointStore", "CheckpointUnusable", "ModelChanged", "find_checkpoint",
    "load_weights_into", "SafetensorsStreamWriter", "TensorSpec", "WeightFiles", "hf_weight_tensors", "read_header",
    "resume_point", "specs_of", "validate_checkpoint",
    "write_safetensors",
]
