"""The long-lived training process: attaches to vLLM's weights, trains them in place, checkpoints them."""
