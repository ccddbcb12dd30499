"""The continual-learning benchmark of issue 15: its data, its procedure and its scoring.

Shared by `bench/continual.py` (a real `onlinemodel serve`) and `bench/continual_sweep.py` (the trainer
reproduced in-process), so both measure the same thing. Data, in `bench/data/continual/`:

- `facts.jsonl`: invented facts, one `POST /train` example each (OpenAI chat format: the user's question,
  the assistant's answer sentence), a paraphrased question, and the answer substring that counts as recalled.
- `controls.jsonl`: general questions the untouched SmolLM2-135M-Instruct answers right under greedy
  decoding (checked with `bench/continual_sweep.py --check-data`), with the substring(s) a right answer has.
- `heldout.txt`: ordinary prose written for this benchmark; its loss is the held-out loss.

A reply recalls a fact (keeps a control) when it contains an expected text as whole words, ignoring case.
Results keep every reply, so `metrics` can score a run again after the data's expectations change.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

DATA_DIR = Path(__file__).resolve().parent / "data" / "continual"
# Greedy reply length for every question: the taught answers are 9-17 tokens.
MAX_TOKENS = 32
# Issue 15's acceptance targets (percent).
TARGETS = {"immediate_recall": 95.0, "final_retention": 90.0, "controls_kept": 98.0, "heldout_loss_up": 3.0}


@dataclass(frozen=True)
class Fact:
    id: str
    question: str
    answer: str
    paraphrase: str
    expect: str

    @property
    def example(self) -> dict[str, Any]:
        """The `POST /train` example that teaches it."""
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": self.answer}]}


@dataclass(frozen=True)
class Control:
    question: str
    expect: tuple[str, ...]


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]


def load_facts() -> list[Fact]:
    facts = []
    for row in _jsonl("facts.jsonl"):
        user, assistant = row["messages"]
        facts.append(Fact(row["id"], user["content"], assistant["content"], row["paraphrase"], row["expect"]))
    return facts


def load_controls() -> list[Control]:
    return [Control(row["question"], tuple(row["expect"])) for row in _jsonl("controls.jsonl")]


def load_heldout() -> str:
    return (DATA_DIR / "heldout.txt").read_text()


def hit(reply: str, expect: str | Sequence[str]) -> bool:
    """Whether `reply` contains an expected text as whole words ("24" is not in "240"), ignoring case."""
    options = [expect] if isinstance(expect, str) else expect
    return any(re.search(rf"(?<!\w){re.escape(e)}(?!\w)", reply, re.IGNORECASE) for e in options)


def ordered(facts: list[Fact], seed: int) -> list[Fact]:
    """Seed 0: the file's order; any other seed: a shuffle of it."""
    if seed == 0:
        return list(facts)
    out = list(facts)
    random.Random(seed).shuffle(out)
    return out


class Backend(Protocol):
    """What the procedure needs from a model that learns: a server, or the trainer in-process."""

    def ask(self, questions: list[str]) -> list[str]:
        """Greedy replies (temperature 0, at most MAX_TOKENS tokens), one chat turn per question."""

    def teach(self, example: dict[str, Any]) -> dict[str, Any]:
        """Train on one example as one job; returns at least {"steps": optimizer steps it took}."""

    def heldout_loss(self, text: str) -> float:
        """Mean next-token loss (nats) over the text's tokens, from the weights being served."""


class Paused(Exception):
    """`run` stopped between two facts at its `stop_after`; its progress file holds what was done."""


def run(backend: Backend, facts: list[Fact], controls: list[Control], k: int, *,
        log=print, progress: Path | None = None, stop_after: float | None = None) -> dict[str, Any]:
    """Teach k facts one job each, asking each back right after; then ask everything again.

    Facts the untouched model already answers (question or paraphrase) are skipped, in order, until k
    remain. Controls count only if the untouched model answers them right here too.

    `progress`: a JSON file written after each fact; a run given one that exists carries on from it (the
    same backend, still holding the weights it taught: a server that stayed up). `stop_after`: seconds
    after which no further fact is started (Paused), so that a run can span several bounded sessions.
    """
    heldout = load_heldout()
    t0 = time.perf_counter()
    state = json.loads(progress.read_text()) if progress is not None and progress.exists() else None
    n = len(facts)
    if state is None:
        before = backend.ask([f.question for f in facts] + [f.paraphrase for f in facts]
                             + [c.question for c in controls])
        known = {f.id for i, f in enumerate(facts) if hit(before[i], f.expect) or hit(before[n + i], f.expect)}
        state = {"before": before, "known": sorted(known), "loss_before": backend.heldout_loss(heldout),
                 "per_fact": [], "steps": 0, "teach_seconds": 0.0, "seconds": 0.0}
        right = sum(hit(reply, c.expect) for c, reply in zip(controls, before[2 * n:]))
        log(f"untouched: {len(known)} facts already known (skipped), {right}/{len(controls)} controls right, "
            f"held-out loss {state['loss_before']:.4f} ({time.perf_counter() - t0:.0f}s)")
    else:
        log(f"carrying on from {progress}: {len(state['per_fact'])} facts taught")
    before, known = state["before"], set(state["known"])
    taught = [f for f in facts if f.id not in known][:k]
    if len(taught) < k:
        raise ValueError(f"only {len(taught)} facts are unknown to the model; asked for {k}")

    def save() -> None:
        if progress is not None:
            progress.write_text(json.dumps({**state, "seconds": state["seconds"] + time.perf_counter() - t0}))

    per_fact: list[dict[str, Any]] = state["per_fact"]
    for i, fact in enumerate(taught):
        if i < len(per_fact):
            continue
        if stop_after is not None and time.perf_counter() - t0 > stop_after:
            save()
            raise Paused(f"stopped after {i} of {k} facts")
        t_fact = time.perf_counter()
        job = backend.teach(fact.example)
        state["steps"] += job["steps"]
        reply = backend.ask([fact.question])[0]
        state["teach_seconds"] += time.perf_counter() - t_fact  # the job and the question asked after it
        per_fact.append({"id": fact.id, "expect": fact.expect, "job": job, "immediate_reply": reply})
        save()
        log(f"[{i + 1}/{k}] {fact.id}: {job['steps']} steps, recalled={hit(reply, fact.expect)} {reply[:60]!r}")

    replies = backend.ask([f.question for f in taught] + [f.paraphrase for f in taught]
                          + [c.question for c in controls])
    for i, row in enumerate(per_fact):
        row.update(final_reply=replies[i], paraphrase_reply=replies[k + i])
    loss_after = backend.heldout_loss(heldout)
    return {
        "k": k,
        "skipped_known": sorted(known),
        "facts": per_fact,
        "controls": [{"question": c.question, "before": b, "after": a}
                     for c, b, a in zip(controls, before[2 * n:], replies[2 * k:])],
        "heldout_loss_before": state["loss_before"],
        "heldout_loss_after": loss_after,
        "steps": state["steps"],
        "teach_seconds": round(state["teach_seconds"], 1),
        "seconds": round(state["seconds"] + time.perf_counter() - t0, 1),
    }


def metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the issue asks for, in percent, from a `run` result, scored with the data files' current
    expectations. Controls count when the untouched model answered them right in that run."""
    expect = {f.id: f.expect for f in load_facts()}
    control_expect = {c.question: c.expect for c in load_controls()}
    facts = result["facts"]
    controls = [(c, control_expect[c["question"]]) for c in result["controls"] if c["question"] in control_expect]
    base = [(c, e) for c, e in controls if hit(c["before"], e)]

    def pct(key: str) -> float:
        return round(100.0 * sum(hit(f[key], expect[f["id"]]) for f in facts) / len(facts), 1)

    return {
        "immediate_recall": pct("immediate_reply"),
        "final_retention": pct("final_reply"),
        "paraphrase_recall": pct("paraphrase_reply"),
        "controls_kept": round(100.0 * sum(hit(c["after"], e) for c, e in base) / len(base), 1),
        "heldout_loss_up": round(100.0 * (result["heldout_loss_after"] / result["heldout_loss_before"] - 1), 2),
        "steps": result["steps"],
        "teach_seconds": result["teach_seconds"],
    }


def meets_targets(m: dict[str, Any]) -> bool:
    return (m["immediate_recall"] >= TARGETS["immediate_recall"] and m["final_retention"] >= TARGETS["final_retention"]
            and m["controls_kept"] >= TARGETS["controls_kept"] and m["heldout_loss_up"] <= TARGETS["heldout_loss_up"])


def markdown_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per (label, metrics)."""
    out = ["| run | immediate recall | final retention | paraphrase recall | controls kept | held-out loss "
           "| steps | teach time | targets |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, m in rows:
        out.append(f"| {label} | {m['immediate_recall']}% | {m['final_retention']}% | {m['paraphrase_recall']}% "
                   f"| {m['controls_kept']}% | {m['heldout_loss_up']:+.2f}% | {m['steps']} | {m['teach_seconds']:.0f}s "
                   f"| {'met' if meets_targets(m) else 'missed'} |")
    return "\n".join(out)
