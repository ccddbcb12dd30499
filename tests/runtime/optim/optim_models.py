"""Tiny models and checks shared by the optimizer tests, CPU (here) and GPU (tests/gpu/optim),
imported by path-relative name."""

from __future__ import annotations

import copy

import torch

from onlinemodel_runtime.optim import TrainPolicy, make_optimizer

# Every parameter trains: decoder-layer buckets (APOLLO + AdamW norms), the final norm, the embedding.
POLICY = TrainPolicy(embeddings="apollo", norms="adamw")


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


class TinyExperts(torch.nn.Module):
    """Fused experts as transformers 5 keeps them: (E, 2I, H) and (E, H, I); the class name ends
    with "Experts", as the policy expects."""

    def __init__(self, experts: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden, dtype=dtype) * 0.3)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inter, dtype=dtype) * 0.3)

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_up_proj[expert] @ x.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        return (self.down_proj[expert] @ (torch.tanh(gate) * up).unsqueeze(-1)).squeeze(-1)


class TinyRouter(torch.nn.Module):
    def __init__(self, experts: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden, dtype=dtype) * 0.3)


class TinyMoE(torch.nn.Module):
    """A dense layer, then top-1 routing over 4 fused experts (wide gate_up (4, 12, 16): projected
    on the left; tall down (4, 16, 6): on the right) scaled by
    the router's probability. Inputs route to experts 0-2 only, so expert 3 never gets a token
    (a zero gradient every step), as in real MoE layers with short examples."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 16, bias=False, dtype=dtype)
        self.gate = TinyRouter(4, 16, dtype)
        self.experts = TinyExperts(4, 16, 6, dtype)
        self.norm = torch.nn.LayerNorm(16, dtype=dtype)
        self.down = torch.nn.Linear(16, 6, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(x))
        probs = torch.softmax(h @ self.gate.weight.t(), dim=-1)
        expert = probs[:, :3].argmax(dim=-1)
        h = h + self.experts(h, expert) * probs.gather(1, expert[:, None])
        return self.down(self.norm(h))


def make_moe(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyMoE:
    torch.manual_seed(seed)
    return TinyMoE(dtype)


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(rows, 12, generator=g).to(dtype)
    y = torch.randn(rows, 6, generator=g).to(dtype)
    return x, y


def orthonormal_basis(n: int, k: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """(n, k) orthonormal columns, seeded: a basis for Apollo.keep_out."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, device=device))[0]


def loss_fn(net: torch.nn.Module, step: int, rows: int = 3) -> torch.Tensor:
    x, y = batch(step, next(net.parameters()).dtype, rows)
    return (net(x).float() - y.float()).pow(2).mean()


def tiny_llama(layers: int = 3):
    """A 3-layer Llama with a tied embedding: decoder-layer buckets, a final-norm and an embedding bucket."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_qwen3_moe(layers: int = 2):
    """A 2-layer Qwen3 MoE (transformers' fused experts): decoder-layer buckets holding 3-D experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    # The per-expert loop: torch's grouped matmul kernels are for bf16; these tests run float32 too.
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg)


def token_ids(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))


def assert_nan_blocks_layer_and_later_ones(device: torch.device, **options) -> None:
    """Hook mode, a NaN in a gradient in the middle of decoder layer 1: that whole layer and every
    bucket updated after it keep their weights and step counters, the buckets flushed before it
    are updated, and the next steps apply again. On CUDA the NaN step comes after the graphs are
    captured (step 2) and replayed (step 3)."""
    model = tiny_llama().to(device)
    opt = make_optimizer(model, POLICY, lr=1e-3, **options)
    opt.attach_to_backward()
    for t in range(3):
        ids = token_ids(t).to(device)
        assert opt.backward_step(model(ids, labels=ids).loss).applied
    before = copy.deepcopy(model.state_dict())
    steps = {n: opt.state[p]["step"] for n, p in model.named_parameters()}
    # q_proj's gradient is among the last of layer 1 to arrive: down_proj's came before it.
    h = model.model.layers[1].self_attn.q_proj.weight.register_hook(lambda g: g * float("nan"))
    report = opt.backward_step(model(ids, labels=ids).loss)
    h.remove()
    assert report.skipped and report.partial and 0 < report.params_updated < report.params_total
    after = model.state_dict()
    for name in before:
        if name.startswith(("model.layers.1.", "model.layers.0.", "model.embed_tokens", "lm_head")):
            assert torch.equal(after[name], before[name]), name  # this layer and all later buckets
        elif name.startswith(("model.layers.2.", "model.norm")):
            assert not torch.equal(after[name], before[name]), name  # flushed before the NaN
    for n, p in model.named_parameters():
        if n.startswith(("model.layers.1.", "model.layers.0.")):
            assert opt.state[p]["step"] == steps[n], n
    assert all_finite(model.parameters())
    for t in range(4, 6):  # the gate is reset: training goes on, every bucket applied
        ids = token_ids(t).to(device)
        assert opt.backward_step(model(ids, labels=ids).loss).applied


def all_finite(tensors) -> bool:
    """True if there is at least one tensor and every element of every one is finite (no NaN, no
    infinity; an empty list or an empty tensor is not evidence of anything)."""
    tensors = list(tensors)
    return bool(tensors) and all(t.numel() > 0 and bool(torch.isfinite(t).all()) for t in tensors)
