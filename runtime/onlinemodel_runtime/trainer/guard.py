"""The guard: probes evaluated on the live weights before and after every job; a job that makes one
regress is undone (docs/guard.md).

Probes are answered by vLLM itself, greedily, on the weights it serves (``served_answers.py``): what users
get, not an approximation of it. The held-out text's loss is ``loss.causal_lm_loss``, the training loss,
computed by the trainer on the same memory. Both run under the weights lock, between two steps. The
result before a job is the result after the previous one while the weights have not changed since, so a
job usually costs one evaluation.

``Guard`` owns its state (the last evaluation, rollback counters) and its snapshot (``snapshot.py``);
``regressions`` is the rule, a pure function: a probe regressed if it passed before and fails now (a
probe that failed before the job never counts against it), the held-out loss if it rose by more than its
allowed fraction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from onlinemodel_protocol.api import GuardStatus, GuardVerdict, ProbeResult, RollbackRecord, utc_timestamp
from onlinemodel_protocol.guard import ChatProbe, GuardFile
from onlinemodel_protocol.limits import GUARD_HELDOUT_MAX_TOKENS
from onlinemodel_runtime.trainer.loss import causal_lm_loss
from onlinemodel_runtime.trainer.snapshot import WeightSnapshot

HELDOUT = "heldout"  # the held-out text's name in a verdict's `regressed`


@dataclass(frozen=True)
class Evaluation:
    weight_version: int
    answers: dict[str, str]  # probe name -> greedy answer
    passed: dict[str, bool]
    heldout_loss: float | None
    seconds: float


def regressions(before: Evaluation, after: Evaluation, max_increase: float | None) -> list[str]:
    """What got worse from `before` to `after` (probe names, then HELDOUT)."""
    out = [name for name, ok in after.passed.items() if before.passed.get(name) and not ok]
    if max_increase is not None and before.heldout_loss is not None and after.heldout_loss is not None \
            and after.heldout_loss > before.heldout_loss * (1 + max_increase):
        out.append(HELDOUT)
    return out


# Probe name -> greedy answer of the served model, for a list of probes (``served_answers.ServedAnswers``).
Answers = Callable[[list[ChatProbe]], dict[str, str]]


class ProbeSet:
    """The guard file's probes and held-out text (tokenized once); `evaluate` runs them against the weights."""

    def __init__(self, guard: GuardFile, tokenizer: Any, answers: Answers | None) -> None:
        if guard.probes and answers is None:
            raise ValueError("the guard has probes but nothing to answer them")
        self.guard = guard
        self._answers = answers
        self._heldout_ids = None
        if guard.heldout is not None:
            ids = tokenizer(guard.heldout.text, add_special_tokens=False)["input_ids"][:GUARD_HELDOUT_MAX_TOKENS]
            if len(ids) < 2:
                raise ValueError("the guard's heldout text is shorter than two tokens")
            self._heldout_ids = ids

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, weight_version: int) -> Evaluation:
        started = time.perf_counter()
        answers = self._answers(self.guard.probes) if self.guard.probes else {}
        loss = None
        if self._heldout_ids is not None:
            ids = torch.tensor([self._heldout_ids], dtype=torch.long, device=next(model.parameters()).device)
            was_training = model.training
            model.eval()  # no dropout, and transformers' activation recomputation only runs in training
            try:
                loss = float(causal_lm_loss(model, ids, ids))
            finally:
                model.train(was_training)
        passed = {p.name: p.passes(answers[p.name]) for p in self.guard.probes}
        return Evaluation(weight_version, answers, passed, loss, time.perf_counter() - started)


class Guard:
    """Checks jobs against a `ProbeSet` (None: no guard file) and keeps the rollback history.

    The service calls, under its weights lock: `before_job` (baseline and snapshot), `check` (after the
    job, or every `every_steps`), `undo` (restore the snapshot) and `record` for every rollback.
    """

    def __init__(self, probes: ProbeSet | None, model: torch.nn.Module, optimizer: Any) -> None:
        self.probes = probes
        self._snapshot = WeightSnapshot(model, optimizer) if probes is not None else None
        self._model = model
        self._baseline: Evaluation | None = None
        self._last: Evaluation | None = None
        self.last_verdict: GuardVerdict | None = None
        self.rollbacks = 0
        self.last_rollback: RollbackRecord | None = None

    @property
    def enabled(self) -> bool:
        return self.probes is not None

    @property
    def every_steps(self) -> int:
        return self.probes.guard.every_steps if self.probes is not None else 0

    def _evaluate(self, weight_version: int) -> Evaluation:
        if self._last is None or self._last.weight_version != weight_version:
            self._last = self.probes.evaluate(self._model, weight_version)
        return self._last

    def before_job(self, weight_version: int) -> None:
        """Evaluate the weights the job starts from (unless already done for them), then snapshot them."""
        self._baseline = self._evaluate(weight_version)
        self._snapshot.take()

    def check(self, weight_version: int) -> GuardVerdict:
        """Evaluate the weights now against those of before the job."""
        after = self._evaluate(weight_version)
        heldout = self.probes.guard.heldout
        regressed = regressions(self._baseline, after, heldout.max_increase if heldout else None)
        self.last_verdict = GuardVerdict(
            time=utc_timestamp(), weight_version=weight_version, passed=not regressed, regressed=regressed,
            failing=[name for name, ok in after.passed.items() if not ok],
            heldout_loss_before=self._baseline.heldout_loss, heldout_loss=after.heldout_loss,
            seconds=round(after.seconds, 3))
        return self.last_verdict

    def undo(self, weight_version: int) -> float:
        """Restore the snapshot; the restored weights are `weight_version` and evaluated as the baseline was."""
        seconds = self._snapshot.restore()
        self._last = Evaluation(weight_version, self._baseline.answers, self._baseline.passed,
                                self._baseline.heldout_loss, 0.0)
        return seconds

    def record(self, rollback: RollbackRecord) -> None:
        self.rollbacks += 1
        self.last_rollback = rollback
        if rollback.source == "request":
            self._last = None  # weights from a checkpoint: evaluated afresh before the next job

    def status(self) -> GuardStatus:
        last = self._last
        return GuardStatus(
            enabled=self.enabled,
            probes=[ProbeResult(name=n, passed=last.passed[n], answer=last.answers[n]) for n in last.answers]
            if last else [],
            heldout_loss=last.heldout_loss if last else None,
            every_steps=self.every_steps,
            last_evaluation=self.last_verdict,
            rollbacks=self.rollbacks,
            last_rollback=self.last_rollback,
            snapshot_bytes=self._snapshot.nbytes if self._snapshot is not None else 0,
            last_snapshot_seconds=round(self._snapshot.last_seconds, 4)
            if self._snapshot is not None and self._snapshot.last_seconds is not None else None)

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks,
                "last_rollback": self.last_rollback.model_dump() if self.last_rollback else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        last = state.get("last_rollback")
        self.last_rollback = RollbackRecord.model_validate(last) if last else None
