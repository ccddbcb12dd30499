"""Qwen3 shapes for the GPU benchmarks and a forward pass that reads vLLM's packed tensors directly.

`packed_logits` stands in for vLLM's model runner: it computes a Qwen3 forward from the merged
`qkv_proj` / `gate_up_proj` tensors (vLLM names, padded vocabulary) with plain torch ops, so it can
be captured in a CUDA graph the way vLLM captures its decode step. No KV cache: every call runs the
whole (short) context, which is enough to see which weights a forward read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from qwen3_shapes import QWEN3_SHAPES

SHAPES = {  # "tiny" / "small" are for the CPU smoke test and the asserts
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=1000, tie_word_embeddings=True),
    "small": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    **QWEN3_SHAPES,
}


def make_config(shape: str):
    from transformers import Qwen3Config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, architectures=["Qwen3ForCausalLM"])
    cfg.dtype = torch.bfloat16
    cfg._attn_implementation = "sdpa"
    return cfg


def rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


def rope_tables(cfg, length: int, device, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions 0..length-1, computed like transformers' default rotary embedding."""
    d = cfg.head_dim
    inv_freq = 1.0 / (rope_theta(cfg) ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def packed_logits(P: dict[str, torch.Tensor], cfg, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  *, last_only: bool = True) -> torch.Tensor:
    """Logits of a Qwen3 forward over `ids` [B, T] reading vLLM-layout tensors `P` (no copies)."""
    B, T = ids.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    embed = P["model.embed_tokens.weight"]
    x = F.embedding(ids, embed)
    c, s = cos[:T], sin[:T]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        h = _rms(x, P[pre + "input_layernorm.weight"], eps)
        qkv = F.linear(h, P[pre + "self_attn.qkv_proj.weight"])
        q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
        q = _rms(q.view(B, T, H, D), P[pre + "self_attn.q_norm.weight"], eps).transpose(1, 2)
        k = _rms(k.view(B, T, KV, D), P[pre + "self_attn.k_norm.weight"], eps).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, H * D), P[pre + "self_attn.o_proj.weight"])
        h = _rms(x, P[pre + "post_attention_layernorm.weight"], eps)
        gate, up = F.linear(h, P[pre + "mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, P[pre + "mlp.down_proj.weight"])
    x = _rms(x, P["model.norm.weight"], eps)
    if last_only:
        x = x[:, -1]
    head = P["model.embed_tokens.weight"] if cfg.tie_word_embeddings else P["lm_head.weight"]
    return F.linear(x, head)[..., : cfg.vocab_size]


def capture(fn, warmup: int = 3):
    """Capture `fn()` in a CUDA graph (after warm-up on a side stream); returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out
