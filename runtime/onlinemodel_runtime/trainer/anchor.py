"""Keep what the model says elsewhere: a KL term to the untouched model on general conversations, in every step.

Teaching one fact after another, each step also moves the model's answers to everything else (capitals
answered with an invented city, held-out loss up 5-14% after 32 facts: docs/learning.md). The anchor term
pulls those answers back as they drift: before the first job, the model's next-token distributions along
the replies of a fixed set of general conversations (`anchor_texts.py`) are recorded; every training step
then adds `weight` x KL(recorded || current) on `per_step` of them (in turn) to the example's loss, so one
backward moves the weights towards the example's answer and back towards the recorded behaviour at once.
At the untouched weights the term and its gradient are zero; they grow with the drift.

Memory is bounded: per reply token, the `top_k` most likely token ids and their log-probabilities, and the
log-probability of all the others together (the KL is taken between those k + 1 classes), kept as float32
and int32 on the host: 8 k + 4 bytes a token, 172 KB for the default set (SmolLM2). The record is part of the
trainer's state (a checkpoint's trainer_state.json), so a restarted trainer keeps the original model as
its anchor instead of the trained weights it restarts with.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onlinemodel_protocol.rpc import IGNORE_INDEX, EncodedExample
from onlinemodel_runtime.trainer.anchor_texts import ANCHOR_CONVERSATIONS
from onlinemodel_runtime.trainer.loss import labelled_hidden, loss_chunk_tokens

# Longer than any conversation of anchor_texts.py in any chat template.
_MAX_TOKENS = 1024


def _rest_logp(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability of every token but `ids`, per position: exact (a logsumexp), where
    log(1 - sum(top)) would round to log(0) in float32 when the top tokens hold nearly all of it."""
    return logp.scatter(1, ids, -math.inf).logsumexp(-1)


def _kl_sum(head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
            rest: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(p || q) on k + 1 classes: the recorded top-k tokens and the rest."""
    logq = F.log_softmax(head(hidden).float(), dim=-1)
    logq_top = logq.gather(1, ids)
    logq_rest = _rest_logp(logq, ids)
    top = (logp.exp() * (logp - logq_top)).sum(-1)
    return (top + rest.exp() * (rest - logq_rest)).sum()


def encode_anchors(tokenizer: Any) -> list[EncodedExample]:
    """The anchor conversations in the served model's chat template, labels on the replies."""
    from onlinemodel_runtime.server.train_request import encode_example

    return [encode_example(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                           _MAX_TOKENS) for q, a in ANCHOR_CONVERSATIONS]


class AnchorTerm:
    """The anchor conversations (encoded, labels on the replies) and, once recorded, the model's
    distributions on them."""

    def __init__(self, examples: Sequence[EncodedExample], weight: float, per_step: int, top_k: int) -> None:
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < math.inf):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        for name, value in (("per_step", per_step), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if weight and not examples:
            raise ValueError("an anchor term with a weight needs at least one conversation")
        self.examples = list(examples)
        self.weight = float(weight)
        self.per_step = min(per_step, len(self.examples)) if self.examples else 0
        self.top_k = top_k
        self._record: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._next = 0  # the first conversation of the next step's share

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def recorded(self) -> bool:
        return self._record is not None

    @property
    def record_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for row in self._record or () for t in row)

    @torch.no_grad()
    def record(self, model: torch.nn.Module) -> None:
        """Record the current weights' distributions (the untouched model's: call before any step)."""
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        k = min(self.top_k, head.out_features)
        record = []
        for ex in self.examples:
            hidden, _ = labelled_hidden(model, torch.tensor([ex.input_ids], device=device),
                                        torch.tensor([ex.labels], device=device))
            logp = F.log_softmax(head(hidden).float(), dim=-1)
            top, ids = logp.topk(k, dim=-1)
            rest = _rest_logp(logp, ids)
            record.append((ids.to(torch.int32).cpu(), top.cpu(), rest.cpu()))
        self._record = record

    def loss(self, model: torch.nn.Module, chunk_tokens: int | None = None) -> torch.Tensor:
        """`weight` x the mean per-token KL on this step's share of the conversations (the next `per_step`
        of them, in turn); LM head in chunks, each recomputed in backward, as the example's loss."""
        if self._record is None:
            raise RuntimeError("the anchor term has no record: call record() before the first step")
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        chunk = chunk_tokens or loss_chunk_tokens(head.out_features)
        part = functools.partial(_kl_sum, head)
        total = torch.zeros((), dtype=torch.float32, device=device)
        tokens = 0
        for _ in range(self.per_step):
            i, self._next = self._next, (self._next + 1) % len(self.examples)
            ex = self.examples[i]
            ids, logp, rest = (t.to(device) for t in self._record[i])
            hidden, _ = labelled_hidden(model, torch.tensor([ex.input_ids], device=device),
                                        torch.tensor([ex.labels], device=device))
            for s in range(0, ids.shape[0], chunk):
                total = total + checkpoint(part, hidden[s:s + chunk], ids[s:s + chunk].long(), logp[s:s + chunk],
                                           rest[s:s + chunk], use_reentrant=False)
            tokens += ids.shape[0]
        return total * (self.weight / tokens)

    def summary(self) -> dict[str, Any]:
        return {"weight": self.weight, "conversations": len(self.examples), "recorded": self.recorded,
                "record_bytes": self.record_bytes}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON (trainer_state.json): the record, if any, and whose turn is next."""
        record = None if self._record is None else [
            {"ids": ids.tolist(), "logp": logp.tolist(), "rest": rest.tolist()} for ids, logp, rest in self._record]
        return {"next": self._next, "record": record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved record. One that does not fit these conversations (another anchor set or
        tokenizer, or another top_k) is dropped: the next job records the weights it then finds."""
        self._next = int(state.get("next", 0)) % max(len(self.examples), 1)
        saved = state.get("record")
        self._record = None
        if saved is None or len(saved) != len(self.examples):
            return
        record = []
        for ex, row in zip(self.examples, saved):
            ids = torch.tensor(row["ids"], dtype=torch.int32)
            logp = torch.tensor(row["logp"], dtype=torch.float32)
            rest = torch.tensor(row["rest"], dtype=torch.float32)
            labelled = sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)
            if (ids.dim() != 2 or ids.shape[0] != labelled or not 1 <= ids.shape[1] <= self.top_k
                    or logp.shape != ids.shape or rest.shape != (labelled,)):
                return
            record.append((ids, logp, rest))
        self._record = record
