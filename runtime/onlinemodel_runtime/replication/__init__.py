"""Scaling out: the learner publishes weight versions, followers pull them into their live weights.

``snapshot.py``: a version on the learner's disk (the stream format, written once, read by many);
``publisher.py``: the learner's side in vLLM's API server (when to publish, who follows, how far behind);
``routes.py``: the HTTP routes of both roles; ``transport.py``: ``WeightTransport`` and its HTTP
implementation; ``follower.py``: the follower's process, which writes each version into vLLM's weights.
"""
