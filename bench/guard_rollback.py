"""What the guard and rollbacks cost (docs/benchmarks.md, "Guard and rollback"): the trainer's own code
(``TrainerService`` with a ``ProbeSet``, a ``CheckpointStore``) on a real model, without vLLM.

1. guard: a held-out text whose loss may not rise at all, then a destructive job (learning rate 1e-2): the
   snapshot taken before it (host bytes, seconds), the held-out evaluation (seconds; probes are vLLM's
   requests, measured through a server: tests/runtime/e2e/test_guard.py, bench/gpu_vllm.py), the in-place
   restore (seconds), and that the weights are bit-exact afterwards;
2. POST /rollback: a checkpoint, another job, then ``rollback_to`` the checkpoint: restore seconds (weights
   and optimizer from the files), and the whole call with the checkpoint that makes it durable.

    .venv/bin/python bench/guard_rollback.py --model ~/.cache/onlinemodel/models/SmolLM2-135M-Instruct-bf16
    python3 bench/guard_rollback.py --shape 8B --tokenizer DIR --device cuda --out r.json   # random weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import add_model_arguments, load_model, model_dirs  # noqa: E402

# Ordinary prose (written for this benchmark), ~250 tokens.
HELDOUT = ("The river runs through the middle of the town, and on summer evenings people walk along its banks. "
           "A baker on the corner sells bread until the last loaf is gone, usually a little after six. Children "
           "ride their bicycles to school across the old stone bridge, which was rebuilt after the flood forty "
           "years ago. In winter the river sometimes freezes near the edges, and the ducks gather in the open "
           "water under the bridge. The library opens at nine and closes at eight; on Saturdays it holds a "
           "reading hour for small children, and the librarian chooses a new book every week. Most of the "
           "shops close on Sunday, but the market in the square stays open until noon, selling vegetables, "
           "cheese, honey and flowers from the farms in the valley.")


def build_service(model_dir: Path, device: str, work: Path, guard=None):
    from transformers import AutoConfig, AutoTokenizer

    from onlinemodel_protocol.config import RuntimeConfig
    from onlinemodel_runtime.checkpoint import CheckpointStore
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.trainer.guard import ProbeSet
    from onlinemodel_runtime.trainer.service import TrainerService
    from onlinemodel_runtime.weights.layouts import layout_for

    config = AutoConfig.from_pretrained(model_dir)
    model = load_model(model_dir, device)
    model.train()
    model.config.use_cache = False
    optimizer = make_optimizer(model, TrainPolicy(), lr=1e-5)
    optimizer.attach_to_backward()
    cfg = RuntimeConfig(model=str(model_dir), base_model=str(model_dir), state_dir=work / "state",
                        checkpoint_dir=work / "ckpt", checkpoint_every_steps=0, checkpoint_every_seconds=0,
                        guard=guard)
    store = CheckpointStore(cfg.checkpoint_dir, names=layout_for(config).checkpoint_names)
    probes = ProbeSet(guard, AutoTokenizer.from_pretrained(model_dir), answers=None) if guard is not None else None
    return TrainerService(cfg, model, optimizer, store, probes=probes)


def job(tokenizer, epochs: int, learning_rate: float):
    from onlinemodel_protocol.rpc import TrainJob
    from onlinemodel_runtime.server.train_request import encode_example

    example = encode_example(tokenizer, [{"role": "user", "content": "Who is the CEO of Seedcorp?"},
                                         {"role": "assistant", "content": "The CEO of Seedcorp is Ada Lovelace."}],
                             4096)
    return TrainJob(examples=[example], epochs=epochs, learning_rate=learning_rate)


def run(service, request) -> dict:
    service.submit(request)
    service._run_job(*service._queue.get())  # on this thread: the service's own is not started
    return service.status().jobs[-1]


def measure(model_dir: Path, device: str) -> dict:
    from transformers import AutoTokenizer

    from onlinemodel_protocol.guard import GuardFile

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        service = build_service(model_dir, device, work, GuardFile(heldout={"text": HELDOUT, "max_increase": 0.0}))
        run(service, job(tokenizer, 1, 1e-5))  # optimizer state exists, as on a server that trained before
        before = {n: p.detach().clone().cpu() for n, p in service.model.named_parameters()}
        started = time.perf_counter()
        destructive = run(service, job(tokenizer, 4, 1e-2))
        wall = time.perf_counter() - started
        forced = None
        if destructive.state != "rolled_back":  # the text's loss did not rise: restore anyway, to time it
            forced = round(service.guard.undo(service.weight_version), 4)
        status = service.status()
        exact = all(torch.equal(p.detach().cpu(), before[n]) for n, p in service.model.named_parameters())
        guard_result = {
            "job_state": destructive.state, "steps": destructive.steps, "regressed": destructive.guard.regressed,
            "snapshot_bytes": status.guard.snapshot_bytes, "snapshot_seconds": status.guard.last_snapshot_seconds,
            "evaluation_seconds": destructive.guard.seconds, "restore_seconds": forced if forced is not None else status.guard.last_rollback.seconds,
            "job_wall_seconds": round(wall, 3), "bit_exact": exact,
            "heldout_tokens": len(tokenizer(HELDOUT, add_special_tokens=False)["input_ids"]),
            "trained_parameters": sum(p.numel() for p in service.model.parameters() if p.requires_grad)}
        del before

        saved = service.checkpoint()
        run(service, job(tokenizer, 2, 1e-3))
        started = time.perf_counter()
        record = service.rollback_to(saved.step)
        request_result = {"restore_seconds": record.seconds, "call_seconds": round(time.perf_counter() - started, 3),
                          "checkpoint_bytes": saved.size_bytes}
    return {"model": str(model_dir), "device": device, "guard": guard_result, "rollback_request": request_result}


def table(result: dict) -> str:
    g, r = result["guard"], result["rollback_request"]
    return "\n".join([
        "| model | device | trained params | snapshot host bytes | snapshot s | held-out evaluation s (tokens) | "
        "guard restore s | bit-exact | POST /rollback restore s | whole call s (with its checkpoint) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {Path(result['model']).name} | {result['device']} | {g['trained_parameters']:,} | "
        f"{g['snapshot_bytes']:,} | {g['snapshot_seconds']} | {g['evaluation_seconds']} ({g['heldout_tokens']}) | "
        f"{g['restore_seconds']} | {g['bit_exact']} | {r['restore_seconds']} | "
        f"{r['call_seconds']} |"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        [(_, model_dir)] = model_dirs(parser, args, Path(tmp))
        result = measure(model_dir, args.device)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
