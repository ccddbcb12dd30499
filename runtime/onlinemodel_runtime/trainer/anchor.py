"""Keep what the model says elsewhere: a KL term to the untouched model on general conversations, in every step.

Teaching one fact after another, each step also moves the model's answers to everything else (capitals
answered with an invented city, held-out loss up 5-14% after 32 facts: docs/learning.md). The anchor term
pulls those answers back as they drift: before the first job, the model's next-token distributions along
the replies of a fixed set of conversations (the built-in ones of `anchor_texts.py` and/or the deployment's
own, `--anchor-file`) are recorded; every training step then adds `weight` x KL(recorded || current) on
`per_step` of them (in turn) to the example's loss, so one backward moves the weights towards the example's
answer and back towards the recorded behaviour at once. At the untouched weights the term and its gradient
are zero; they grow with the drift.

Memory is bounded: per reply token, the `top_k` most likely token ids and their log-probabilities, and the
log-probability of all the others together (the KL is taken between those k + 1 classes), kept as float32
and int32 on the host: 8 k + 4 bytes a token, 418 KB for the built-in set (SmolLM2), at most 17 MB with an
anchor file at its bounds (limits.ANCHOR_FILE_MAX_CONVERSATIONS). The record is part of the trainer's state
(a checkpoint's trainer_state.json), kept per conversation under a hash of its tokens: a restarted trainer
keeps the original model as the anchor of every conversation it has a record of, instead of the trained
weights it restarts with; only conversations new to it (an edited anchor file) are recorded from those.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onlinemodel_protocol.anchors import AnchorFile
from onlinemodel_protocol.limits import ANCHOR_CONVERSATION_MAX_TOKENS
from onlinemodel_protocol.rpc import IGNORE_INDEX, EncodedExample
from onlinemodel_runtime.trainer.anchor_texts import ANCHOR_CONVERSATIONS
from onlinemodel_runtime.trainer.loss import labelled_hidden, loss_chunk_tokens

log = logging.getLogger(__name__)


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


def encode_anchors(tokenizer: Any, anchor_file: AnchorFile | None = None) -> list[EncodedExample]:
    """The anchor conversations in the served model's chat template, labels on the (last) replies: the
    built-in ones unless `anchor_file` says `builtin: false`, then the file's. ValueError naming the file's
    conversation that does not fit."""
    from onlinemodel_runtime.server.train_request import ExampleError, encode_example

    builtin = anchor_file is None or anchor_file.builtin
    encoded = [encode_example(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                              ANCHOR_CONVERSATION_MAX_TOKENS) for q, a in (ANCHOR_CONVERSATIONS if builtin else ())]
    for i, conversation in enumerate(anchor_file.conversations if anchor_file is not None else ()):
        try:
            encoded.append(encode_example(tokenizer, conversation.chat(), ANCHOR_CONVERSATION_MAX_TOKENS))
        except ExampleError as exc:
            raise ValueError(f"--anchor-file conversations.{i}: {exc.message}") from None
    return encoded


def conversation_key(ex: EncodedExample) -> str:
    """The key of a conversation's record: a hash of its tokens and labels, which the record is valid for."""
    return hashlib.sha256(json.dumps([ex.input_ids, ex.labels]).encode()).hexdigest()[:32]


def _padded_batches(examples: Sequence[EncodedExample], max_tokens: int) -> list[slice]:
    """Consecutive runs of `examples` to run as one right-padded batch each: a run grows while its padded size
    (count x longest) stays within `max_tokens`, so padding never costs more than one conversation of the
    longest allowed size; a conversation longer than that runs alone."""
    runs, start, longest = [], 0, 0
    for i, ex in enumerate(examples):
        longest_with = max(longest, len(ex.input_ids))
        if i > start and (i - start + 1) * longest_with > max_tokens:
            runs.append(slice(start, i))
            start, longest_with = i, len(ex.input_ids)
        longest = longest_with
    if examples:
        runs.append(slice(start, len(examples)))
    return runs


class _Record(NamedTuple):
    ids: torch.Tensor  # int32 [labelled tokens, k]: the top-k token ids
    logp: torch.Tensor  # float32 [labelled tokens, k]: their log-probabilities
    rest: torch.Tensor  # float32 [labelled tokens]: the log-probability of all the others
    untouched: bool  # recorded from the untouched model (else from trained weights)


class AnchorTerm:
    """The anchor conversations (encoded, labels on the replies; the last `from_file` of them from the anchor
    file) and, once recorded, the model's distributions on them, per conversation."""

    def __init__(self, examples: Sequence[EncodedExample], weight: float, per_step: int, top_k: int,
                 from_file: int = 0) -> None:
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < math.inf):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        for name, value in (("per_step", per_step), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if weight and not examples:
            raise ValueError("an anchor term with a weight needs at least one conversation")
        if isinstance(from_file, bool) or not isinstance(from_file, int) or not 0 <= from_file <= len(examples):
            raise ValueError(f"from_file must be an integer in [0, {len(examples)}], got {from_file!r}")
        self.examples = list(examples)
        self.keys = [conversation_key(ex) for ex in self.examples]
        self.weight = float(weight)
        self.per_step = min(per_step, len(self.examples)) if self.examples else 0
        self.top_k = top_k
        self.from_file = from_file
        self._records: dict[str, _Record] = {}  # by conversation_key; only the conversations of `examples`
        self._next = 0  # the first conversation of the next step's share

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def recorded(self) -> bool:
        return all(key in self._records for key in self.keys)

    @property
    def record_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for r in self._records.values() for t in (r.ids, r.logp, r.rest))

    @torch.no_grad()
    def record(self, model: torch.nn.Module, untouched: bool) -> None:
        """Record the current weights' distributions on the conversations that have no record yet;
        `untouched`: these weights are the untouched model's (no step taken since it was loaded)."""
        missing = [(key, ex) for key, ex in zip(self.keys, self.examples) if key not in self._records]
        if missing and not untouched:
            log.warning("%d of %d anchor conversations have no record (new in the anchor file, or the trainer state "
                        "is older): recorded now, they anchor the model to its trained weights, not to the "
                        "untouched model", len(missing), len(self.examples))
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        k = min(self.top_k, head.out_features)
        for key, ex in missing:
            hidden, _ = labelled_hidden(model, torch.tensor([ex.input_ids], device=device),
                                        torch.tensor([ex.labels], device=device))
            logp = F.log_softmax(head(hidden).float(), dim=-1)
            top, ids = logp.topk(k, dim=-1)
            rest = _rest_logp(logp, ids)
            self._records[key] = _Record(ids.to(torch.int32).cpu(), top.cpu(), rest.cpu(), untouched)

    def loss(self, model: torch.nn.Module, chunk_tokens: int | None = None) -> torch.Tensor:
        """`weight` x the mean per-token KL on this step's share of the conversations (the next `per_step`
        of them, in turn); LM head in chunks, each recomputed in backward, as the example's loss."""
        if not self.recorded:
            raise RuntimeError("the anchor term has no record of every conversation: call record() before the "
                               "first step")
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        chunk = chunk_tokens or loss_chunk_tokens(head.out_features)
        part = functools.partial(_kl_sum, head)
        total = torch.zeros((), dtype=torch.float32, device=device)
        tokens = 0
        n = len(self.examples)
        picks = [(self._next + j) % n for j in range(self.per_step)]  # the next per_step, in turn
        self._next = (self._next + self.per_step) % n
        for group in _padded_batches([self.examples[i] for i in picks], ANCHOR_CONVERSATION_MAX_TOKENS):
            exs = [self.examples[i] for i in picks[group]]
            records = [self._records[self.keys[i]] for i in picks[group]]
            ids, logp, rest = (torch.cat([getattr(r, f) for r in records]).to(device) for f in ("ids", "logp", "rest"))
            # One forward for the group, right-padded: a causal decoder's hidden state at a position depends only
            # on the tokens before it, so each conversation's labelled states are those of its own forward, and
            # the weights are read once for all of them (a large model's short forwards are bound by that read).
            width = max(len(ex.input_ids) for ex in exs)
            input_ids = torch.tensor([ex.input_ids + [0] * (width - len(ex.input_ids)) for ex in exs], device=device)
            labels = torch.tensor([ex.labels + [IGNORE_INDEX] * (width - len(ex.labels)) for ex in exs], device=device)
            hidden, _ = labelled_hidden(model, input_ids, labels)
            for s in range(0, ids.shape[0], chunk):
                total = total + checkpoint(part, hidden[s:s + chunk], ids[s:s + chunk].long(), logp[s:s + chunk],
                                           rest[s:s + chunk], use_reentrant=False)
            tokens += ids.shape[0]
        return total * (self.weight / tokens)

    def summary(self) -> dict[str, Any]:
        recorded = [self._records[key].untouched for key in self.keys if key in self._records]
        return {"weight": self.weight, "conversations": len(self.examples), "from_file": self.from_file,
                "recorded": self.recorded, "recorded_untouched": sum(recorded),
                "recorded_trained": len(recorded) - sum(recorded), "record_bytes": self.record_bytes}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON (trainer_state.json): the records by conversation key, and whose turn is next."""
        return {"next": self._next, "records": {
            key: {"ids": r.ids.tolist(), "logp": r.logp.tolist(), "rest": r.rest.tolist(), "untouched": r.untouched}
            for key, r in self._records.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the saved records of these conversations; those of conversations no longer anchored are
        dropped, and one that does not fit (another top_k) too: the next job records the weights it then
        finds. A state from before records had keys (`record`: a list in the built-in set's order) restores
        the built-in conversations'."""
        self._next = int(state.get("next", 0)) % max(len(self.examples), 1)
        self._records = {}
        saved = state.get("records") or {}
        legacy = state.get("record")
        builtin = len(self.examples) - self.from_file
        if not saved and legacy is not None and len(legacy) == builtin:
            saved = {key: {**row, "untouched": True} for key, row in zip(self.keys[:builtin], legacy)}
        for key, ex in zip(self.keys, self.examples):
            if key in saved and (record := self._fitting(saved[key], ex)) is not None:
                self._records[key] = record
        if self._records or saved:
            log.info("anchor term: restored the records of %d of %d conversations", len(self._records),
                     len(self.examples))

    def _fitting(self, row: dict[str, Any], ex: EncodedExample) -> _Record | None:
        """The saved `row` as a record of `ex`, or None if its shapes do not fit it (another top_k)."""
        ids = torch.tensor(row["ids"], dtype=torch.int32)
        logp = torch.tensor(row["logp"], dtype=torch.float32)
        rest = torch.tensor(row["rest"], dtype=torch.float32)
        labelled = sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)
        if (ids.dim() != 2 or ids.shape[0] != labelled or not 1 <= ids.shape[1] <= self.top_k
                or logp.shape != ids.shape or rest.shape != (labelled,)):
            return None
        return _Record(ids, logp, rest, bool(row.get("untouched", False)))
