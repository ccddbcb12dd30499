"""The optimizer on MoE experts: memory and time per step, and which router policy teaches best.

`--part state`: a random Qwen3 MoE (bf16 weights; default a small shape for CPU, e.g. `--hidden 2048
--inter 768 --experts 128 --top-k 8` is Qwen3-30B-A3B's on a GPU). Optimizer state bytes per expert
parameter and the optimizer's time for the expert tensors alone (gradients given, `step()` mode, median of
--steps): our per-expert APOLLO-Mini, our dense AdamW on the experts (float32 moments, stochastic rounding),
torch.optim.AdamW (foreach on CPU, fused on CUDA; state in the weights' bf16). Then a whole training step
(forward, backward with the hook-mode updates) with the trainer's default policy vs torch AdamW over the
same parameters.

`--part router`: a random Qwen3 MoE with the SmolLM2 tokenizer taught one chat example (the trainer's
encoding, hook mode, lr --lr) with the router frozen / APOLLO / AdamW: optimizer steps until greedy decoding
returns the sentence verbatim, and how far the next-token distributions of unrelated prompts moved
(mean KL from before to after, nats).

    PYTHONPATH=runtime:protocol .venv/bin/python bench/moe_optim.py --part state --json /tmp/moe_state.json
    PYTHONPATH=runtime:protocol .venv/bin/python bench/moe_optim.py --part router --json /tmp/moe_router.json
    PYTHONPATH=runtime:protocol python3 bench/moe_optim.py --part state --device cuda --hidden 2048 --inter 768 \
        --experts 128 --top-k 8 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch

CONTROLS = ["What is the capital of Germany?", "Write a haiku about rain.", "How do bees make honey?"]


def moe_model(hidden: int, inter: int, experts: int, top_k: int, layers: int, vocab: int, seed: int,
              device: str = "cpu"):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * inter, moe_intermediate_size=inter,
                         num_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=1, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it runs: a 30B-A3B shape's experts are 2.4B per 4 layers
        return Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expert_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    from onlinemodel_runtime.optim.policy import classify

    classes = classify(model)
    return [(n, p) for n, p in model.named_parameters() if classes[n] == "experts"]


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def time_expert_steps(model, make_opt, steps: int) -> dict:
    """Median optimizer step over the experts, their gradients fixed (one backward's)."""
    params = expert_params(model)
    for _, p in model.named_parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {p: p.grad.clone() for _, p in params}
    opt = make_opt(params)
    times = []
    for _ in range(steps):
        for _, p in params:
            p.grad = grads[p].clone()
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    n = sum(p.numel() for _, p in params)
    idle = sum(int(g.flatten(1).norm(dim=1).eq(0).sum()) for g in grads.values()) // 2
    return {"expert_params": n, "state_bytes": state_bytes(opt), "bytes_per_param": state_bytes(opt) / n,
            "step_ms_median": 1e3 * statistics.median(times[1:]), "experts_without_tokens": idle}


def part_state(args) -> dict:
    from onlinemodel_runtime.optim import Apollo, TrainPolicy, make_optimizer

    shape = dict(hidden=args.hidden, inter=args.inter, experts=args.experts, top_k=args.top_k, layers=args.layers,
                 vocab=4096, seed=0, device=args.device)
    cuda = args.device.startswith("cuda")
    torch_kind = {"fused": True} if cuda else {"foreach": True}
    variants = {
        "apollo_mini_per_expert": lambda ps: Apollo(ps, lr=1e-4),
        "ours_dense_adamw": lambda ps: Apollo(ps, lr=1e-4, algorithm="adamw"),
        "torch_adamw": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-4, **torch_kind),
    }
    out: dict = {"shape": shape, "experts": {}, "train_step": {}}
    for name, make in variants.items():
        out["experts"][name] = time_expert_steps(moe_model(**shape), make, args.steps)
        print(name, out["experts"][name], flush=True)
    # Whole step: forward + backward (+ hook-mode updates for ours) + step, default policy's parameters.
    for name in ("ours_default_policy", "torch_adamw_same_params"):
        gc.collect()
        model = moe_model(**shape)
        ours = make_optimizer(model, TrainPolicy(), lr=1e-4)
        if name == "ours_default_policy":
            ours.attach_to_backward()
            step = lambda loss: ours.backward_step(loss)  # noqa: E731
        else:
            trained = [p for g in ours.param_groups for p in g["params"]]
            ref = torch.optim.AdamW(trained, lr=1e-4, **torch_kind)

            def step(loss, ref=ref):
                loss.backward()
                ref.step()
                ref.zero_grad(set_to_none=True)
        times = []
        for t in range(args.steps):
            ids = torch.randint(0, 4096, (1, 256), generator=torch.Generator().manual_seed(t)).to(args.device)
            sync(torch.device(args.device))
            t0 = time.perf_counter()
            step(model(input_ids=ids, labels=ids).loss)
            sync(torch.device(args.device))
            times.append(time.perf_counter() - t0)
        out["train_step"][name] = {"ms_median": 1e3 * statistics.median(times[1:])}
        print(name, out["train_step"][name], flush=True)
    return out


def part_router(args) -> dict:
    from transformers import AutoTokenizer

    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
    from onlinemodel_runtime.devtools.served_checks import QUESTION, SENTENCE
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.server.train_request import encode_example

    tok = AutoTokenizer.from_pretrained(ensure_smollm2())
    example = encode_example(tok, [{"role": "user", "content": QUESTION},
                                   {"role": "assistant", "content": SENTENCE}], 1024)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    controls = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"] for q in CONTROLS]
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([example.labels])
    results = []
    for seed in range(args.seeds):
        for router in ("frozen", "apollo", "adamw"):
            model = moe_model(args.hidden, args.inter, args.experts, args.top_k, args.layers, len(tok), seed)
            model.generation_config.pad_token_id = tok.eos_token_id
            with torch.no_grad():
                before = [torch.log_softmax(model(c).logits[0, -1].float(), -1) for c in controls]
            opt = make_optimizer(model, TrainPolicy(router=router), lr=args.lr)
            opt.attach_to_backward()
            learned, loss = None, None
            for step in range(1, args.max_steps + 1):
                loss = model(input_ids=ids, labels=labels).loss
                opt.backward_step(loss)
                if step % args.check_every == 0:
                    # Stops at the end-of-turn token the example taught (the tokenizer's eos).
                    out = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id)
                    text = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
                    if text == SENTENCE:
                        learned = step
                        break
            with torch.no_grad():
                after = [torch.log_softmax(model(c).logits[0, -1].float(), -1) for c in controls]
            kl = statistics.fmean(float((b.exp() * (b - a)).sum()) for b, a in zip(before, after))
            results.append({"seed": seed, "router": router, "steps_to_verbatim": learned, "loss": float(loss.detach()),
                            "control_kl": kl,
                            "state_bytes": opt.state_bytes()})
            print(results[-1], flush=True)
    return {"lr": args.lr, "max_steps": args.max_steps, "runs": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("state", "router"), required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--check-every", type=int, default=1, help="router part: steps between greedy checks")
    ap.add_argument("--device", default="cpu")
    # One thread by default: on the shared 2-core machine, OpenMP threads waiting for each other under
    # a load average of 15-20 made every small op ~100x slower (measured), which no optimizer decides.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = part_state(args) if args.part == "state" else part_router(args)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    result.update(machine=card or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  threads=args.threads, load_average=os.getloadavg(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
