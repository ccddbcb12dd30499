"""What the trainer's tests share: a simulated load signal and clock, a tiny Llama, a trainable policy."""

from __future__ import annotations

import torch

from onlinemodel_runtime.optim import TrainPolicy
from onlinemodel_runtime.server.load_signal import LoadSnapshot

# Every parameter trains, so every Linear's output needs a gradient (and gets a backward yield point).
POLICY = TrainPolicy(embeddings="apollo", norms="adamw")


def tiny_llama(layers: int = 3, dtype: torch.dtype = torch.bfloat16, tied: bool = True, vocab: int = 96,
               **overrides):
    """A small random Llama in train mode (SwiGLU MLPs, a tied or untied LM head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied, **overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.train()
    return model


def example(tokens: int = 40, prompt: int = 10, seed: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels): loss on everything after the first `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (tokens,), generator=g).tolist()
    return ids, [-100] * prompt + ids[prompt:]


class FakeSignal:
    """What the trainer reads from the load signal; counts the reads of `in_flight` (one per yield point)
    and calls `on_read` with each."""

    def __init__(self, in_flight: int = 0, duty: float = 1.0, mode: str = "measured", on_read=None,
                 slice_scale: float = 1.0):
        self._in_flight = in_flight
        self.duty = duty
        self.slice_scale = slice_scale
        self.mode = mode
        self.reads = 0
        self.on_read = on_read

    @property
    def in_flight(self) -> int:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self)
        return self._in_flight

    def set_in_flight(self, n: int) -> None:
        self._in_flight = n

    def snapshot(self) -> LoadSnapshot:
        return LoadSnapshot(in_flight=self._in_flight, mode=self.mode, duty=self.duty, max_decode_slowdown=1.25,
                            measured_slowdown=1.1, baseline_itl_seconds=0.005, tail_slowdown=1.2,
                            baseline_tail_seconds=0.0055, recent_tail_seconds=0.0066, slice_scale=self.slice_scale)


class FakeTime:
    """A clock that only moves when someone works (`advance`) or sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.syncs = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sync(self) -> None:
        self.syncs += 1
