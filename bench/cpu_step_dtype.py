"""One training step of SmolLM2-135M-Instruct on this CPU, in bf16 and in float32: why the CPU tests and
`make demo` serve float32 (devtools/launcher.CPU_FLOAT32_ARGS).

    .venv/bin/python bench/cpu_step_dtype.py [--tokens 300] [--threads 2] [--repeat 3]

Prints the CPU's torch capability and, per dtype, the median seconds of a forward alone and of a forward plus
backward (the LM loss over every token; the embedding frozen, as the trainer keeps it). On CPUs without bf16
instructions (AVX2 only) torch's bf16 matmuls fall to slow kernels, most of all in backward.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from onlinemodel_runtime.devtools.model_prep import ensure_smollm2


def seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_smollm2()
    ids = torch.randint(0, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, {args.tokens} tokens")
    print("| dtype | forward (s) | forward + backward (s) |")
    print("|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.get_input_embeddings().weight.requires_grad_(False)

        def forward() -> None:
            with torch.no_grad():
                model(ids)

        def step() -> None:
            model(ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        print(f"| {str(dtype).removeprefix('torch.')} | {seconds(forward, args.repeat):.2f} | "
              f"{seconds(step, args.repeat):.2f} |", flush=True)


if __name__ == "__main__":
    main()
