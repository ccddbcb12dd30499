"""Tiny models shared by the optimizer tests (imported by path-relative name)."""

from __future__ import annotations

import torch


class TinyNet(torch.nn.Module):
    """Two same-shaped matrices (seeds must differ), a wide and a tall one, a norm and a bias."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 20, bias=True, dtype=dtype)
        self.a = torch.nn.Linear(20, 20, bias=False, dtype=dtype)
        self.b = torch.nn.Linear(20, 20, bias=False, dtype=dtype)
        self.norm = torch.nn.LayerNorm(20, dtype=dtype)
        self.down = torch.nn.Linear(20, 6, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(x))
        h = h + torch.tanh(self.a(h)) + torch.tanh(self.b(h))
        return self.down(self.norm(h))


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(3, 12, generator=g).to(dtype)
    y = torch.randn(3, 6, generator=g).to(dtype)
    return x, y


def loss_fn(net: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step, next(net.parameters()).dtype)
    return (net(x).float() - y.float()).pow(2).mean()


def tiny_llama(layers: int = 3):
    """A 3-layer Llama with a tied embedding: decoder-layer buckets, a final-norm and an embedding bucket."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def token_ids(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
