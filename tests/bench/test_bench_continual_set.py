"""bench/continual_set.run carries a run over from one bounded session to the next (a GPU device call allows 10
minutes; the served run takes about 13): a run stopped between facts, or cut in a fact, goes on from its
progress file without asking the untouched model again or teaching a fact twice. A stand-in backend that
learns a fact when taught it: the procedure is what is tested here, the benchmark's numbers are measured in
bench/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import continual_set as cs  # noqa: E402


class Learner:
    """Knows the controls' answers; answers a fact once taught it. `fail_at`: the teach call that raises."""

    def __init__(self, fail_at: int | None = None):
        self.taught: dict[str, str] = {}
        self.asked = 0
        self.teach_calls = 0
        self.fail_at = fail_at
        self.answers = {c.question: c.expect[0] for c in cs.load_controls()}

    def ask(self, questions):
        self.asked += len(questions)
        return [self.taught.get(q) or self.answers.get(q, "I do not know.") for q in questions]

    def teach(self, example):
        self.teach_calls += 1
        if self.fail_at is not None and self.teach_calls == self.fail_at:
            raise TimeoutError("the session ended in this job")
        user, assistant = example["messages"]
        self.taught[user["content"]] = assistant["content"]
        return {"steps": 3}

    def heldout_loss(self, text):
        return 2.0


def test_a_run_stopped_between_facts_carries_on_from_its_progress(tmp_path):
    facts, controls, progress = cs.load_facts(), cs.load_controls(), tmp_path / "p.json"
    backend = Learner()
    with pytest.raises(cs.Paused):
        cs.run(backend, facts, controls, 4, log=lambda s: None, progress=progress, stop_after=0.0)
    asked_untouched = backend.asked
    assert asked_untouched == 2 * len(facts) + len(controls) and backend.teach_calls == 0

    result = cs.run(backend, facts, controls, 4, log=lambda s: None, progress=progress)
    assert backend.teach_calls == 4 and backend.asked == asked_untouched + 4 + 2 * 4 + len(controls)
    m = cs.metrics(result)
    assert (m["immediate_recall"], m["final_retention"], m["controls_kept"], m["steps"]) == (100.0, 100.0, 100.0, 12)


def test_a_run_cut_in_a_fact_teaches_only_that_fact_and_the_rest_again(tmp_path):
    facts, controls, progress = cs.load_facts(), cs.load_controls(), tmp_path / "p.json"
    backend = Learner(fail_at=3)
    with pytest.raises(TimeoutError):
        cs.run(backend, facts, controls, 4, log=lambda s: None, progress=progress)
    backend.fail_at = None
    result = cs.run(backend, facts, controls, 4, log=lambda s: None, progress=progress)
    assert backend.teach_calls == 3 + 2  # facts 1-2 done before the cut; 3 and 4 after
    assert [f["id"] for f in result["facts"]] == [f.id for f in facts[:4]]
    assert result["steps"] == 12
