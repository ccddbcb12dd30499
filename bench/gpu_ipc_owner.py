"""The owner side of bench/gpu_ipc.py: a stand-in for vLLM's worker.

Holds a Qwen3-shaped model (random bf16 weights) in vLLM's packed layout as parameters with vLLM's
names, exports them with the project's `export_weights`, spawns the trainer (gpu_ipc_trainer.py),
and runs forwards over its own tensors - eager through `build_hf_model`, and the packed forward of
gpu_packed_forward.py eager or replayed from a CUDA graph - while the trainer updates them in place.
Returns a dict of measurements; every check that fails raises AssertionError.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback

import torch

CTX = 16  # tokens per owner forward (fixed-input probe and decode window)
# "Same output": bf16 kernels may differ in summation order (rel ~1e-3); "changed": well above that.
TOL = 1e-2
CHANGE = 3e-2


def owner_main(result_conn, phase: str, opts: dict) -> None:
    try:
        result_conn.send(("ok", run_phase(phase, opts)))
    except BaseException:  # noqa: BLE001 - the orchestrator prints it and fails
        result_conn.send(("error", traceback.format_exc()))
    finally:
        result_conn.close()


def ns() -> int:
    return time.perf_counter_ns()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Owner:
    def __init__(self, shape: str, device: torch.device, state_dir: str):
        from gpu_packed_forward import make_config, rope_tables
        from transformers import AutoModelForCausalLM

        from onlinemodel_runtime.weights.layouts import pack_hf_state_dict
        from onlinemodel_runtime.weights.shared import export_weights

        self.device, self.shape, self.cuda = device, shape, device.type == "cuda"
        self.cfg = cfg = make_config(shape)
        torch.manual_seed(0)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        packed = pack_hf_state_dict(cfg, hf.state_dict())  # fresh memory, vLLM names and padding
        del hf
        # What vLLM's model holds: parameters with vLLM names, no grad.
        self.params = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in packed.items()}
        del packed
        self.manifest = export_weights(self.params.items(), state_dir, model=f"random-qwen3-{shape}",
                                       architecture="Qwen3ForCausalLM", vllm_version="stand-in (no vLLM)")
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self.ptrs = {n: p.data_ptr() for n, p in self.params.items()}
        self.cos, self.sin = rope_tables(cfg, CTX, device)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, cfg.vocab_size, (1, CTX), generator=g).to(device)

    # -- forwards ---------------------------------------------------------------------------
    def packed(self, ids: torch.Tensor) -> torch.Tensor:
        from gpu_packed_forward import packed_logits

        return packed_logits(self.params, self.cfg, ids, self.cos, self.sin)

    def probe_fn(self):
        """A fixed-input forward, graph-captured on CUDA: returns a callable giving last-token logits."""
        if not self.cuda:
            return lambda: self.packed(self.ids)
        from gpu_packed_forward import capture

        static_ids = self.ids.clone()
        graph, out = capture(lambda: self.packed(static_ids))
        return lambda: (graph.replay(), out)[1]

    def decode_fn(self):
        """One decode step per call (batch 1): forward over a CTX-token window, append the argmax."""
        ctx = self.ids.clone()

        def step():
            nxt = self.packed(ctx).argmax(-1, keepdim=True)
            ctx.copy_(torch.cat([ctx[:, 1:], nxt], dim=1))
            return nxt
        if not self.cuda:
            return step
        from gpu_packed_forward import capture

        graph, _ = capture(step)
        return graph.replay

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def alloc(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def checksums(self) -> dict[str, float]:
        return {n: float(p.detach().double().sum()) for n, p in self.params.items()}

    def assert_no_copies(self) -> None:
        moved = [n for n, p in self.params.items() if p.data_ptr() != self.ptrs[n]]
        assert not moved, f"owner parameters moved (copied): {moved[:5]}"


class Trainer:
    """The spawned trainer process and its command pipe."""

    def __init__(self, state_dir: str, shape: str, seq: int, lr: float):
        from gpu_ipc_trainer import trainer_main

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=trainer_main, args=(child, state_dir, shape, seq, lr, 0))
        self.proc.start()
        child.close()
        self.info = self.expect("ready")

    def expect(self, what: str):
        kind, payload = self.conn.recv()
        if kind == "error":
            raise AssertionError(f"trainer failed:\n{payload}")
        assert kind == what, f"trainer sent {kind!r}, expected {what!r}"
        return payload

    def call(self, cmd: str, arg=None):
        self.conn.send((cmd, arg))
        return self.expect(cmd)

    def close(self) -> dict:
        rep = self.call("exit")
        self.proc.join(60)
        assert self.proc.exitcode == 0, f"trainer exit code {self.proc.exitcode}"
        assert not rep["moved"], f"trainer's attached tensors moved: {rep['moved'][:5]}"
        return rep


def visibility(owner: Owner, trainer: Trainer, probe, steps: int) -> dict:
    """Lockstep: trainer steps, syncs, stamps t_done, signals; the owner keeps running `probe` and
    finds the first forward that started after t_done (it must show the change, and be stable)."""
    ref = probe().clone()
    owner.sync()
    trainer.conn.send(("lockstep", steps))
    lat, sig, first_change, partial, step_ms, forward_ms = [], [], [], [], [], []
    records: list[tuple[int, int, bool]] = []
    pending = None
    snap = None
    done = 0
    while done < steps:
        t0 = ns()
        out = probe()
        owner.sync()
        t1 = ns()
        changed = not torch.equal(out, ref)
        records.append((t0, t1, changed))
        forward_ms.append((t1 - t0) * 1e-6)
        if pending is None and trainer.conn.poll():
            kind, msg = trainer.conn.recv()
            if kind == "error":
                raise AssertionError(f"trainer failed:\n{msg}")
            assert kind == "stepped", kind
            pending = (msg, ns())
        if pending is None:
            continue
        msg, t_recv = pending
        t_done = msg["t_done_ns"]
        after = [r for r in records if r[0] >= t_done]
        if not after:
            continue
        if snap is None:  # the first forward that started after the step ended
            assert after[0][2], f"step {msg['i']}: a forward started after the step does not reflect it"
            snap = out.clone()
            lat.append((after[0][1] - t_done) * 1e-6)
            sig.append((t_recv - t_done) * 1e-6)
            changed_recs = [r for r in records if r[2]]
            first_change.append((changed_recs[0][1] - t_done) * 1e-6)
            partial.append(sum(1 for r in records if r[2] and r[0] < t_done))
            step_ms.append(msg["step_ms"])
            continue
        assert torch.equal(out, snap), f"step {msg['i']}: output still changing after the step ended"
        ref, snap, pending, records = snap, None, None, []
        done += 1
        trainer.conn.send(("ack", None))
    trainer.expect("lockstep")
    return dict(step_to_visible_ms=lat, signal_ms=sig, first_change_ms=first_change,
                forwards_changed_during_step=partial, trainer_step_ms=step_ms,
                owner_forward_ms=statistics.median(forward_ms))


def decode_latencies(owner: Owner, step, n: int | None = None, seconds: float | None = None) -> list[float]:
    out = []
    deadline = time.perf_counter() + (seconds or 1e9)
    while (n is None or len(out) < n) and time.perf_counter() < deadline:
        t0 = ns()
        step()
        owner.sync()  # vLLM reads the sampled token back every step
        out.append((ns() - t0) * 1e-6)
    return out


def run_phase(phase: str, opts: dict) -> dict:
    device = torch.device(opts["device"])
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
        os.environ["GPU_IPC_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="gpu_ipc_") as state_dir:
        owner = Owner(opts["shape"], device, state_dir)
        try:
            if phase == "attach":
                return attach_phase(owner, state_dir, opts)
            return serve_phase(owner, state_dir, opts)
        finally:
            if owner.manifest.shm_path and os.path.exists(owner.manifest.shm_path):
                os.unlink(owner.manifest.shm_path)


def attach_phase(owner: Owner, state_dir: str, opts: dict) -> dict:
    """Item 1 (+ item 2 at a small shape): correctness of the shared path, eager and CUDA graph."""
    from transformers import AutoModelForCausalLM

    from onlinemodel_runtime.weights.hf_model import build_hf_model

    res: dict = dict(phase="attach", shape=owner.shape, transport=owner.manifest.transport,
                     weight_bytes=owner.weight_bytes)
    hf = build_hf_model(owner.cfg, owner.params, expected_dtype=torch.bfloat16)  # owner's eager forward
    with torch.no_grad():
        l0 = hf(owner.ids, use_cache=False).logits[:, -1].float()
        p0 = owner.packed(owner.ids).float()
    res["packed_vs_hf_rel"] = rel(p0, l0)
    assert res["packed_vs_hf_rel"] < 5e-2, f"packed forward disagrees with HF: {res['packed_vs_hf_rel']}"
    sums0 = owner.checksums()
    graph_hf = None
    if owner.cuda:
        probe = owner.probe_fn()
        g0 = probe().float().clone()
        res["graph_vs_eager_rel"] = rel(g0, p0)
        assert res["graph_vs_eager_rel"] < TOL
        try:  # the HF model itself in a graph, if transformers' forward is capturable
            from gpu_packed_forward import capture

            static = owner.ids.clone()
            graph_hf = capture(lambda: hf(static, use_cache=False).logits[:, -1])
            res["hf_graph"] = "captured"
        except Exception as exc:  # noqa: BLE001 - reported, the packed graph carries the assert
            res["hf_graph"] = f"not capturable: {type(exc).__name__}: {str(exc)[:160]}"
            torch.cuda.synchronize()
    trainer = Trainer(state_dir, owner.shape, opts["seq_small"], opts["lr"])
    res["trainer_ready"] = trainer.info
    assert trainer.info["transport"] == ("cuda_ipc" if owner.cuda else "shm")
    assert trainer.info["alloc_after_build"] < 0.01 * owner.weight_bytes, "trainer copied weights on attach"
    base_alloc = owner.alloc()
    reply = trainer.call("steps", opts["steps"])
    res["losses"] = reply["losses"]
    sums1 = owner.checksums()
    assert sums1 == reply["checksums"], "owner and trainer read different values for the same tensors"
    changed = sorted(n for n in sums1 if sums1[n] != sums0[n])
    expect = sorted(n for n in sums1 if n.endswith(("qkv_proj.weight", "o_proj.weight",
                                                      "gate_up_proj.weight", "down_proj.weight")))
    assert changed == expect, f"changed tensors {changed[:6]} != trained block linears {expect[:6]}"
    res["tensors_changed"] = f"{len(changed)}/{len(sums1)} (exactly the trained block linears)"
    with torch.no_grad():
        l1 = hf(owner.ids, use_cache=False).logits[:, -1].float()
        p1 = owner.packed(owner.ids).float()
        # Reference: a plain HF model in its own memory, loaded from the updated weights.
        with torch.device(owner.device):
            ref_model = AutoModelForCausalLM.from_config(owner.cfg, dtype=torch.bfloat16)
        ref_model.load_state_dict({k: v.detach().clone() for k, v in hf.state_dict().items()})
        r1 = ref_model.eval()(owner.ids, use_cache=False).logits[:, -1].float()
        del ref_model
    res["update_rel_change"] = rel(l1, l0)
    res["owner_vs_reference_rel"] = rel(l1, r1)
    res["owner_equals_reference_bitwise"] = bool(torch.equal(l1, r1))
    assert res["update_rel_change"] > CHANGE, f"owner logits barely changed: {res['update_rel_change']}"
    assert res["owner_vs_reference_rel"] < TOL, "owner forward does not match the HF reference"
    if owner.cuda:
        g1 = probe().float()
        res["graph_update_rel_change"] = rel(g1, g0)
        res["graph_vs_new_eager_rel"] = rel(g1, p1)
        assert res["graph_vs_new_eager_rel"] < TOL, "graph replay does not compute with the new weights"
        assert res["graph_update_rel_change"] > CHANGE, "graph replay still gives the old output"
        if graph_hf is not None:
            graph_hf[0].replay()
            res["hf_graph_vs_reference_rel"] = rel(graph_hf[1].float(), r1)
            assert res["hf_graph_vs_reference_rel"] < TOL
        del graph_hf
        torch.cuda.synchronize()
        base_alloc = owner.alloc()
        torch.cuda.reset_peak_memory_stats(owner.device)
    vis = visibility(owner, trainer, probe if owner.cuda else owner.probe_fn(), opts["vis_steps"])
    res["visibility"] = vis
    return finish(owner, trainer, res, base_alloc)


def finish(owner: Owner, trainer, res: dict, base_alloc: int) -> dict:
    """Close a phase: the owner allocated nothing weight-sized and its tensors were not copied."""
    res["owner_alloc_delta"] = owner.alloc() - base_alloc
    if owner.cuda:
        res["owner_peak_growth"] = torch.cuda.max_memory_allocated(owner.device) - base_alloc
        assert res["owner_peak_growth"] < 0.01 * owner.weight_bytes, "owner allocated weight-sized memory"
    owner.assert_no_copies()
    res["trainer_exit"] = trainer.close()
    return res


def serve_phase(owner: Owner, state_dir: str, opts: dict) -> dict:
    """Items 2 and 4 at a real shape: step-to-visibility, and decode latency idle vs while training."""
    res: dict = dict(phase="serve", shape=owner.shape, transport=owner.manifest.transport,
                     weight_bytes=owner.weight_bytes, seq=opts["seq"])
    probe = owner.probe_fn()
    decode = owner.decode_fn()
    decode_latencies(owner, decode, n=50)  # warm
    trainer = Trainer(state_dir, owner.shape, opts["seq"], opts["lr_serve"])
    res["trainer_ready"] = trainer.info
    trainer.call("steps", opts["warmup_steps"])  # compile, allocator warm-up
    res["trainer_alone_step_ms"] = trainer.call("alone", opts["alone_steps"])["step_ms"]
    owner.sync()
    base_alloc = owner.alloc()
    if owner.cuda:
        torch.cuda.reset_peak_memory_stats(owner.device)
    res["decode_idle_ms"] = decode_latencies(owner, decode, n=opts["decode_tokens"], seconds=opts["decode_s"])
    res["visibility"] = visibility(owner, trainer, probe, opts["vis_steps"])
    trainer.conn.send(("until_stop", None))
    time.sleep(0.05)
    res["decode_training_ms"] = decode_latencies(owner, decode, seconds=opts["train_decode_s"])
    trainer.conn.send(("stop", None))
    res["trainer_concurrent_step_ms"] = trainer.expect("until_stop")["step_ms"]
    return finish(owner, trainer, res, base_alloc)
