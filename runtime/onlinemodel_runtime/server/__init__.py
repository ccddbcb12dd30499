"""The API server's side of training: runs in vLLM's API server process, called by the endpoint plugin.

- ``train_request.py``: parses and validates ``POST /train`` bodies, resolves their defaults, tokenizes them.
- ``supervisor.py``: starts the trainer process, restarts it if it dies, forwards requests to it, and
  drops vLLM's prefix cache when the weights change.
- ``trainer_client.py``: the async ZMQ client the supervisor talks to the trainer with.
- Serving first (docs/serving-first.md): ``inflight.py`` counts the generation requests in flight,
  ``pacing_control.py`` turns vLLM's measured decode latency into the trainer's duty cycle, and
  ``load_signal.py`` is the shared-memory file both are published in for the trainer.
"""
