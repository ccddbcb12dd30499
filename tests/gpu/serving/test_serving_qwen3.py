"""Qwen3 (dense, `Qwen3ForCausalLM`) on the GPU: serving_cases.py's checks at the qwen3-1.7B shape with 4 layers."""

from serving_cases import test_vllm_logits_equal_transformers_on_the_exported_views  # noqa: F401
from serving_cases import test_teach_then_checkpoint_and_restart_on_it  # noqa: F401

SHAPE = "qwen3-1.7B"
