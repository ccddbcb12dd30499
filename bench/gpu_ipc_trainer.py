"""The trainer side of bench/gpu_ipc.py: attach to the owner's exported weights and train on them.

Runs in its own process (multiprocessing 'spawn'). Everything goes through the project's code:
`attach_weights` -> `build_hf_model` -> `make_optimizer` + `train_step`. Driven by commands from the
owner over a pipe, so the owner decides when the trainer is idle, stepping, or stepping in lockstep.
"""

from __future__ import annotations

import os
import time
import traceback

import torch


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor float64 sum: equal in both processes iff they read the same values."""
    return {n: float(t.double().sum()) for n, t in tensors.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_main(conn, state_dir: str, shape: str, seq: int, lr: float, seed: int) -> None:
    try:
        _run(conn, state_dir, shape, seq, lr, seed)
    except BaseException:  # noqa: BLE001 - report anything to the owner, which fails loudly
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run(conn, state_dir: str, shape: str, seq: int, lr: float, seed: int) -> None:
    from gpu_packed_forward import make_config
    from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
    from onlinemodel_runtime.trainer.loop import train_step
    from onlinemodel_runtime.weights.hf_model import assert_views_of, build_hf_model
    from onlinemodel_runtime.weights.shared import attach_weights

    if os.environ.get("GPU_IPC_THREADS"):
        torch.set_num_threads(int(os.environ["GPU_IPC_THREADS"]))
    t0 = time.perf_counter()
    manifest, tensors = attach_weights(state_dir)
    device = next(iter(tensors.values())).device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    alloc_after_attach = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ptrs = {n: t.data_ptr() for n, t in tensors.items()}
    cfg = make_config(shape)
    model = build_hf_model(cfg, tensors, expected_dtype=torch.bfloat16, requires_grad=True, train=True)
    opt = make_optimizer(model, TrainPolicy(), lr=lr, rank=1)
    opt.attach_to_backward()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=g).tolist()
    alloc_after_build = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    conn.send(("ready", dict(transport=manifest.transport, attach_s=time.perf_counter() - t0,
                             alloc_after_attach=alloc_after_attach, alloc_after_build=alloc_after_build)))

    def step():
        r = train_step(model, opt, ids, ids)
        if not r.applied:
            raise RuntimeError(f"optimizer step not applied: {r.skipped_reason}")
        return r

    while True:
        cmd, arg = conn.recv()
        if cmd == "steps":  # n plain steps; reply with losses and checksums of the weights
            losses = [step().loss for _ in range(arg)]
            _sync(device)
            conn.send(("steps", dict(losses=losses, checksums=checksums(tensors))))
        elif cmd == "alone":  # n timed steps, owner idle
            times = []
            for _ in range(arg):
                _sync(device)
                t = time.perf_counter()
                step()
                _sync(device)
                times.append((time.perf_counter() - t) * 1e3)
            conn.send(("alone", dict(step_ms=times)))
        elif cmd == "lockstep":  # step, sync, signal with the time, wait for the owner's ack
            for i in range(arg):
                _sync(device)
                t = time.perf_counter()
                step()
                _sync(device)  # every weight write has landed in device memory
                done = time.perf_counter_ns()
                conn.send(("stepped", dict(i=i, t_done_ns=done, step_ms=(done * 1e-9 - t) * 1e3)))
                ack, _ = conn.recv()
                if ack != "ack":
                    raise RuntimeError(f"expected ack, got {ack!r}")
            conn.send(("lockstep", None))
        elif cmd == "until_stop":  # train continuously until the owner says stop
            times = []
            while not conn.poll():
                t = time.perf_counter()
                step()
                _sync(device)
                times.append((time.perf_counter() - t) * 1e3)
            stop, _ = conn.recv()
            if stop != "stop":
                raise RuntimeError(f"expected stop, got {stop!r}")
            conn.send(("until_stop", dict(step_ms=times)))
        elif cmd == "exit":
            moved = [n for n, t in tensors.items() if t.data_ptr() != ptrs[n]]
            assert_views_of(model, tensors)  # raises if a parameter left the shared memory
            rep = dict(moved=moved, state_bytes=opt.state_bytes(), steps_applied=opt.steps_applied,
                       trained_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
            if device.type == "cuda":
                rep["peak_allocated"] = torch.cuda.max_memory_allocated(device)
                rep["alloc_end"] = torch.cuda.memory_allocated(device)
            conn.send(("exit", rep))
            opt.detach_from_backward()
            del opt, model, tensors
            return
        else:
            raise RuntimeError(f"unknown command {cmd!r}")

