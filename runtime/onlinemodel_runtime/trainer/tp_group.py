"""The trainer's tensor-parallel group: one process per vLLM rank, each training that rank's shard.

Rank 0 is the trainer the API server talks to (ZMQ, ``TrainerService``); ranks > 0 have no socket and run
`follow`: they execute, in the same order, every operation rank 0 runs through this group (a training step,
an early-stop check, a checkpoint's gather, loading the optimizer state), whose arguments rank 0 broadcasts
first. The ranks' collectives (tp_model.py's hooks,
the vocab-parallel loss, the optimizer's) therefore always meet. The group is a torch.distributed group of
the trainer processes alone (NCCL on GPU, gloo on CPU), never vLLM's. docs/tensor-parallel.md.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from onlinemodel_protocol.rpc import WorkerShard
from onlinemodel_runtime.checkpoint import CheckpointStore
from onlinemodel_runtime.checkpoint.tp_gather import optimizer_state_for_rank, save_tp_checkpoint
from onlinemodel_runtime.optim.hyperparams import load_keeping_rounding
from onlinemodel_runtime.trainer.early_stop import answer_predicted
from onlinemodel_runtime.trainer.loop import StepResult, step_chunk_tokens, train_step
from onlinemodel_runtime.weights.tp_model import vocab_parallel_cross_entropy, vocab_parallel_top2

log = logging.getLogger(__name__)

# Ranks > 0 wait for rank 0's next operation with this timeout; an idle rank 0 sends a no-op more often, so
# only a rank 0 that is gone (or hung) ends the wait.
CONTROL_TIMEOUT = datetime.timedelta(minutes=10)
HEARTBEAT_SECONDS = 60.0

_STEP, _LEARNED, _CHECKPOINT, _LOAD_OPTIMIZER = "step", "learned", "checkpoint", "load_optimizer"
_HEARTBEAT, _STOP = "heartbeat", "stop"


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, vocab_rows, group) -> torch.Tensor:
    return vocab_parallel_cross_entropy(logits, targets, vocab_rows, group).sum()


class TensorParallelGroup:
    """This process's place in the trainer's group; `bind` gives it the rank's model and optimizer."""

    def __init__(self, shard: WorkerShard, init_method: str, device: torch.device):
        if shard.tp_size < 2:
            raise ValueError(f"a tensor-parallel group has at least 2 ranks, not {shard.tp_size}")
        self.shard = shard
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=shard.tp_rank, world_size=shard.tp_size,
                                timeout=CONTROL_TIMEOUT)
        # The default group, named by None rather than held: torch.distributed's own reference stays the only
        # one, so `_leave` frees its communicators and joins their threads then, not during the
        # interpreter's teardown (the likely cause of a rank aborting after the stop: exit -6).
        self.group = None
        # The operations' arguments are Python objects: broadcast over gloo, also beside NCCL.
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if backend == "nccl" else None
        self._lock = threading.Lock()  # rank 0: one operation at a time, in one order for every rank
        self._last_op = time.monotonic()
        self._stopped = False
        self.model = self.optimizer = None
        log.info("tensor-parallel rank %d of %d joined (%s)", shard.tp_rank, shard.tp_size, backend)

    def bind(self, model: torch.nn.Module, optimizer: Any, layout: Any, tensors: Mapping[str, torch.Tensor]) -> None:
        """The model (tp_model.build_tp_rank_model's on `tensors`, this rank's vLLM tensors) and optimizer this
        rank trains; `layout`: the model's `tp_shards.TensorParallelLayout`."""
        self.model, self.optimizer, self.layout, self.tensors = model, optimizer, layout, tensors
        vocab_rows = layout.vocab_rows(self.shard.tp_rank)
        self.cross_entropy = functools.partial(_summed_cross_entropy, vocab_rows=vocab_rows, group=self.group)
        self.top2 = functools.partial(vocab_parallel_top2, vocab_rows=vocab_rows, group=self.group)

    # -- rank 0 ------------------------------------------------------------------------------------
    def train_step(self, input_ids: list[int], labels: list[int], *, learning_rate: float | None,
                   pacer: Any = None, memory: Any = None) -> StepResult:
        """`loop.train_step` on every rank; rank 0's pacer sets the loss's chunk for all of them."""
        chunk = step_chunk_tokens(self.model, pacer)
        return self._run(_STEP, dict(input_ids=input_ids, labels=labels, learning_rate=learning_rate,
                                     chunk_tokens=chunk), pacer=pacer, memory=memory)

    def answer_predicted(self, input_ids: list[int], labels: list[int], margin: float = 0.0) -> bool:
        """`early_stop.answer_predicted` with the two largest logits over every rank's vocabulary columns."""
        return self._run(_LEARNED, dict(input_ids=input_ids, labels=labels, margin=margin))

    def save_checkpoint(self, store: Any, **save_kwargs: Any) -> Any:
        """`checkpoint.tp_gather.save_tp_checkpoint` on every rank: rank 0 writes `store`'s one HF directory (and
        the optimizer state in TP=1 form) with `save_kwargs`, and returns its CheckpointInfo."""
        return self._run(_CHECKPOINT, {}, store=store, **save_kwargs)

    def load_optimizer_state(self, checkpoint: Path) -> None:
        """Every rank loads its part of the checkpoint's optimizer state (saved in TP=1 form, at any TP)."""
        self._run(_LOAD_OPTIMIZER, {"checkpoint": str(checkpoint)})

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._heartbeat, name="onlinemodel-tp-heartbeat", daemon=True).start()

    def stop(self) -> None:
        """Release the other ranks (they exit), then leave the group."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._broadcast(_STOP, {})
                self._leave()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS / 4)
            with self._lock:
                if self._stopped:
                    return
                if time.monotonic() - self._last_op >= HEARTBEAT_SECONDS:
                    self._broadcast(_HEARTBEAT, {})

    def _run(self, op: str, args: dict[str, Any], **local: Any) -> Any:
        if self.shard.tp_rank != 0:
            raise RuntimeError("only rank 0 starts the group's operations")
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"the tensor-parallel group has stopped: cannot run {op!r}")
            self._broadcast(op, args)
            return self._execute(op, args, **local)

    def _broadcast(self, op: str, args: dict[str, Any]) -> None:
        dist.broadcast_object_list([op, args], src=0, group=self.control)
        self._last_op = time.monotonic()

    # -- every rank --------------------------------------------------------------------------------
    def _execute(self, op: str, args: dict[str, Any], **local: Any) -> Any:
        if op == _STEP:
            return train_step(self.model, self.optimizer, cross_entropy=self.cross_entropy, **args, **local)
        if op == _LEARNED:
            return answer_predicted(self.model, top2=self.top2, **args)
        if op == _CHECKPOINT:
            return save_tp_checkpoint(local.pop("store", None), self.layout, self.tensors, self.optimizer,
                                      group=self.group, **local)
        if op == _LOAD_OPTIMIZER:
            state, _ = CheckpointStore.load_training_state(Path(args["checkpoint"]),
                                                           map_location=next(self.model.parameters()).device)
            return load_keeping_rounding(self.optimizer, optimizer_state_for_rank(state, self.optimizer))
        if op in (_HEARTBEAT, _STOP):
            return None
        raise ValueError(f"unknown tensor-parallel operation {op!r}")

    # -- ranks > 0 ---------------------------------------------------------------------------------
    def follow(self, parent_pid: int) -> int:
        """Run rank 0's operations until it says stop (exit status 0) or is gone (an exception: the
        supervisor restarts the whole group)."""
        _exit_with_parent(parent_pid)
        while True:
            message: list[Any] = [None, None]
            dist.broadcast_object_list(message, src=0, group=self.control)
            op, args = message
            self._execute(op, args)
            if op == _STOP:
                self._leave()
                return 0

    def _leave(self) -> None:
        """Every rank, after the stop: once all are past their last collective (none closes a connection
        another still reads), destroy the groups, which frees their communicators now (see __init__)."""
        dist.barrier(group=self.control)
        self.control = None
        dist.destroy_process_group()


def _exit_with_parent(parent_pid: int) -> None:
    """A rank > 0 waits inside a collective: a thread ends the process when vLLM's API server is gone."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        log.warning("parent process %d exited; tensor-parallel rank stopping", parent_pid)
        os._exit(0)

    threading.Thread(target=watch, name="onlinemodel-parent-watch", daemon=True).start()
