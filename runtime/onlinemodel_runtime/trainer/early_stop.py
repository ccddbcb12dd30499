"""Stop training an example once it is learned, instead of always running the request's epochs.

A fixed number of epochs undertrains some facts and overtrains others (bench/continual.py: at 5 epochs,
19 of 32 invented facts come back right after their job, and the steps spent on the others past the
point where they were learned push the rest of the model around for nothing). An example counts as
learned when greedy decoding gives its answer back verbatim: at every labelled position the model's most
likely next token, given the example's own tokens before it, is the label. A learned example gets no
step; the job ends once a pass finds them all learned, the request's `epochs` stay the bound on the passes.

The check is a forward pass without gradients before each step of the example (LM head in chunks of the
loss's size, only at labelled positions): a learned example costs that forward and no step. With a
`margin`, an answer token counts only once its logit leads the runner-up's by that much, so an answer
just barely learned is trained a step or two further and survives the drift of later jobs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from onlinemodel_protocol.rpc import EncodedExample
from onlinemodel_runtime.trainer.loss import labelled_hidden, loss_chunk_tokens


def _top2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's two largest logits (float32, largest first) and their token ids."""
    top = logits.float().topk(2, dim=-1)
    return top.values, top.indices


@torch.no_grad()
def answer_predicted(model: torch.nn.Module, input_ids: Sequence[int], labels: Sequence[int],
                     margin: float = 0.0, top2: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _top2
                     ) -> bool:
    """Whether every labelled token is the model's argmax prediction (teacher-forced greedy decoding), and
    its logit is ahead of the runner-up's by at least `margin` (nats of log-probability) everywhere.
    `top2`: each row's two largest logits and their token ids (a tensor-parallel rank holds some columns)."""
    device = next(model.parameters()).device
    hidden, targets = labelled_hidden(model, torch.tensor([list(input_ids)], device=device),
                                      torch.tensor([list(labels)], device=device))
    head = model.get_output_embeddings()
    chunk = loss_chunk_tokens(head.out_features)
    for start in range(0, targets.numel(), chunk):
        values, ids = top2(head(hidden[start:start + chunk]))
        if not torch.equal(ids[:, 0], targets[start:start + chunk]):
            return False
        if margin > 0 and bool((values[:, 0] - values[:, 1] < margin).any()):
            return False
    return True


def job_schedule(examples: Sequence[EncodedExample], replayed: Sequence[EncodedExample], epochs: int,
                 learned: Callable[[EncodedExample], bool] | None) -> Iterator[tuple[EncodedExample, bool]]:
    """(example, is_replay) in the order a job trains them: each pass goes over the job's examples, then
    the replayed ones; with `learned`, each is checked right before its step (after the steps before it)
    and skipped while learned. The job ends after a pass that found every example learned (so a step that
    undid an example checked earlier in its pass is caught by the next), or after `epochs` passes."""
    active = [(ex, False) for ex in examples] + [(ex, True) for ex in replayed]
    for _ in range(epochs):
        stepped = False
        for ex, is_replay in active:
            if learned is not None and learned(ex):
                continue
            stepped = True
            yield ex, is_replay
        if not stepped:
            return
