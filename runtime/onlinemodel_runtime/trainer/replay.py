"""A bounded reservoir of examples trained before, a few of which every job trains again.

Teaching facts one request at a time, a model forgets earlier ones as later jobs move the same weights
(bench/continual.py: without replay, 25% of 32 facts survive to the end). Each job therefore also trains
`replay_examples` examples drawn from this reservoir, under the same early-stop rule as its own
(trainer/early_stop.py), so an example still remembered costs one forward and no step.

The reservoir is a uniform sample of every example trained so far (Vitter's algorithm R): each of the
`seen` examples is in it with the same probability `capacity / seen`. It holds at most `capacity` examples
and `max_tokens` tokens in all: an example longer than its share (`max_tokens // capacity`) is never kept.
Its state (examples, count seen, random state) is plain JSON, saved in the checkpoint's trainer state, so a
restart replays what the run before it had seen.
"""

from __future__ import annotations

import random
from typing import Any

from onlinemodel_protocol.rpc import EncodedExample


class ReplayReservoir:
    def __init__(self, capacity: int, max_tokens: int, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an integer >= 0, got {capacity!r}")
        if capacity and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < capacity):
            raise ValueError(f"max_tokens must be an integer >= capacity ({capacity}), got {max_tokens!r}")
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.examples: list[EncodedExample] = []
        self.seen = 0
        self._rng = random.Random(seed)

    @property
    def max_example_tokens(self) -> int:
        return self.max_tokens // self.capacity if self.capacity else 0

    @property
    def tokens(self) -> int:
        return sum(ex.num_tokens for ex in self.examples)

    def add(self, example: EncodedExample) -> None:
        """Offer one trained example (algorithm R); too long ones are not counted as seen."""
        if not self.capacity or example.num_tokens > self.max_example_tokens:
            return
        self.seen += 1
        if len(self.examples) < self.capacity:
            self.examples.append(example)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.examples[slot] = example

    def sample(self, k: int) -> list[EncodedExample]:
        """`k` distinct examples (all of them if fewer are kept), drawn uniformly."""
        return self._rng.sample(self.examples, min(k, len(self.examples)))

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"seen": self.seen, "examples": [ex.model_dump() for ex in self.examples],
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved reservoir; examples beyond this reservoir's bounds are dropped (the bounds may
        have been lowered since it was saved)."""
        examples = [EncodedExample.model_validate(ex) for ex in state["examples"]]
        kept = [ex for ex in examples if ex.num_tokens <= self.max_example_tokens][:self.capacity]
        self.examples = kept
        self.seen = max(int(state["seen"]), len(kept))
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    def summary(self) -> dict[str, int]:
        return {"examples": len(self.examples), "tokens": self.tokens, "seen": self.seen,
                "capacity": self.capacity}
