"""The guard and rollbacks on a tiny real model (no vLLM): probes before and after a job, the rollback of
a job that regressed, job opt-out, and POST /rollback's restore of a checkpoint's weights and optimizer.

vLLM answers the probes in production (``served_answers.py``, covered by tests/runtime/e2e/test_guard.py);
here the tiny model's own greedy decode stands in for it, on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.guard import GuardFile
from onlinemodel_protocol.rpc import EncodedExample, TrainJob
from onlinemodel_runtime.checkpoint import CheckpointStore
from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir
from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
from onlinemodel_runtime.trainer.guard import HELDOUT, Evaluation, ProbeSet, regressions
from onlinemodel_runtime.trainer.service import TrainerError, TrainerService

EXAMPLE = EncodedExample(input_ids=[1, 5, 9, 13, 17, 21, 2], labels=[-100, -100, -100, 13, 17, 21, 2])
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def destructive(guard: bool = True) -> TrainJob:
    return TrainJob(examples=[EXAMPLE], epochs=8, learning_rate=0.5, guard=guard)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny") / "llama", num_hidden_layers=2,
                               dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def greedy_answers(model, tokenizer, fail: list | None = None):
    """Stand-in for vLLM: the model's greedy answer to each probe (raises while `fail` holds an error)."""
    def answers(probes):
        if fail:
            raise fail[0]
        out = {}
        for probe in probes:
            ids = tokenizer.apply_chat_template([m.model_dump() for m in probe.messages], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            generated = model.generate(ids, max_new_tokens=probe.max_tokens, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id)
            out[probe.name] = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        return out
    return answers


def build(tiny_dir, tmp_path, guard: GuardFile | None = None, tokenizer=None, fail: list | None = None,
          **cfg) -> TrainerService:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.train()
    optimizer = make_optimizer(model, TrainPolicy(), lr=1e-3)
    optimizer.attach_to_backward()
    # No anchor term: these tests are about the guard (test_trainer_service_continual.py covers it).
    config = RuntimeConfig(model=str(tiny_dir), base_model=str(tiny_dir), state_dir=tmp_path / "state", guard=guard,
                           **{"anchor_weight": 0, "null_space_energy": 0, **cfg})
    store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
    probes = ProbeSet(guard, tokenizer, greedy_answers(model, tokenizer, fail)) if guard is not None else None
    return TrainerService(config, model, optimizer, store, probes=probes)


def run_all(service: TrainerService) -> None:
    while not service._queue.empty():
        service._run_job(*service._queue.get())


def weights(service: TrainerService) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in service.model.named_parameters()}


def guard_on_own_answer(tiny_dir, tmp_path, tokenizer, **extra) -> GuardFile:
    """A guard whose probe expects what the untouched tiny model answers (a random model's words)."""
    service = build(tiny_dir, tmp_path, GuardFile(probes=[{"messages": QUESTION, "expect": "x", "max_tokens": 8}]), tokenizer)
    answer = service.guard.probes.evaluate(service.model, 0).answers["probe-0"]
    assert answer.strip()
    return GuardFile(probes=[{"name": "own", "messages": QUESTION, "expect": answer.strip(), "max_tokens": 8}],
                     **extra)


def evaluation(passed: dict[str, bool], loss: float | None = None) -> Evaluation:
    return Evaluation(0, {n: "" for n in passed}, passed, loss, 0.0)


@pytest.mark.parametrize("before, after, max_increase, expected", [
    ({"a": True, "b": True}, {"a": True, "b": True}, None, []),
    ({"a": True, "b": True}, {"a": False, "b": True}, None, ["a"]),
    ({"a": False}, {"a": False}, None, []),  # failed before the job: never counted against it
    ({"a": False}, {"a": True}, None, []),
    ({}, {}, 0.05, []),
])
def test_regressions_table(before, after, max_increase, expected):
    assert regressions(evaluation(before, 2.0), evaluation(after, 2.0), max_increase) == expected


@pytest.mark.parametrize("before, after, max_increase, regressed", [
    (2.0, 2.09, 0.05, False), (2.0, 2.11, 0.05, True), (2.0, 1.0, 0.0, False), (None, 3.0, 0.05, False),
    (2.0, 9.0, None, False),
])
def test_heldout_regression(before, after, max_increase, regressed):
    assert (regressions(evaluation({}, before), evaluation({}, after), max_increase) == [HELDOUT]) is regressed


def test_a_regressing_job_is_rolled_back_in_place(tiny_dir, tmp_path, tokenizer):
    guard = guard_on_own_answer(tiny_dir, tmp_path, tokenizer)
    service = build(tiny_dir, tmp_path, guard, tokenizer)
    before, optimizer_before = weights(service), service.optimizer.state_dict()
    accepted = service.submit(destructive())
    run_all(service)
    status = service.status()
    (job,) = status.jobs
    assert job.id == accepted.job_id and job.guarded and job.state == "rolled_back"
    assert job.guard.regressed == ["own"] and not job.guard.passed and "own" in job.error
    assert status.weight_version == job.steps + 1  # every step, and the restore: only forward
    assert status.job_counts.rolled_back == 1
    for name, value in weights(service).items():
        assert torch.equal(value, before[name]), name
    assert service.optimizer.state_dict()["state"] == optimizer_before["state"] == {}
    assert status.guard.rollbacks == 1 and status.guard.last_rollback.job_id == job.id
    assert status.guard.last_rollback.source == "guard" and status.guard.last_rollback.weight_version == 9
    assert [p.passed for p in status.guard.probes] == [True]
    assert status.guard.snapshot_bytes == sum(p.numel() * 4 for p in service.model.parameters() if p.requires_grad)


def test_a_job_that_keeps_the_probes_succeeds(tiny_dir, tmp_path, tokenizer):
    guard = guard_on_own_answer(tiny_dir, tmp_path, tokenizer)
    service = build(tiny_dir, tmp_path, guard, tokenizer)
    service.submit(TrainJob(examples=[EXAMPLE], epochs=1, learning_rate=1e-6))
    run_all(service)
    (job,) = service.status().jobs
    assert job.state == "succeeded" and job.guard.passed and job.guard.regressed == []
    assert service.status().guard.rollbacks == 0


def test_weights_the_guard_cannot_judge_are_not_kept(tiny_dir, tmp_path, tokenizer):
    from onlinemodel_runtime.trainer.served_answers import ServedAnswerError

    guard = guard_on_own_answer(tiny_dir, tmp_path, tokenizer)
    fail: list = []
    service = build(tiny_dir, tmp_path, guard, tokenizer, fail=fail)
    service.guard.before_job(0)  # the baseline is known; then vLLM stops answering
    before = weights(service)
    fail.append(ServedAnswerError("vLLM did not answer probe 'own'"))
    service.submit(TrainJob(examples=[EXAMPLE], epochs=1, learning_rate=1e-3))
    run_all(service)
    (job,) = service.status().jobs
    assert job.state == "rolled_back" and "could not evaluate" in job.error and "did not answer" in job.error
    assert all(torch.equal(v, before[n]) for n, v in weights(service).items())


def test_held_out_loss_guard(tiny_dir, tmp_path, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    guard = GuardFile(heldout={"text": text, "max_increase": 0.0}, allow_job_opt_out=True)
    service = build(tiny_dir, tmp_path, guard, tokenizer)
    # The random model's loss on any text is near log(vocab), and a destructive job moved it by 0.3%, up on one
    # CPU and down on another: the model first learns the text (unguarded), so that the job has something to undo.
    ids = tokenizer(text, add_special_tokens=False).input_ids
    service.submit(TrainJob(examples=[EncodedExample(input_ids=ids, labels=ids)], epochs=20, learning_rate=1e-2,
                            guard=False))
    service.submit(destructive())
    run_all(service)
    learned, job = service.status().jobs
    assert learned.state == "succeeded" and job.state == "rolled_back" and job.guard.regressed == [HELDOUT]
    assert job.guard.heldout_loss > job.guard.heldout_loss_before > 0


def test_every_steps_stops_a_job_early(tiny_dir, tmp_path, tokenizer):
    guard = guard_on_own_answer(tiny_dir, tmp_path, tokenizer, every_steps=2)
    service = build(tiny_dir, tmp_path, guard, tokenizer)
    service.submit(destructive())
    run_all(service)
    (job,) = service.status().jobs
    assert job.state == "rolled_back" and job.steps == 2


def test_job_opt_out_needs_the_guard_files_permission(tiny_dir, tmp_path, tokenizer):
    guard = guard_on_own_answer(tiny_dir, tmp_path, tokenizer)
    strict = build(tiny_dir, tmp_path, guard, tokenizer)
    with pytest.raises(TrainerError) as refused:
        strict.submit(destructive(guard=False))
    assert refused.value.code == 403
    lenient = build(tiny_dir, tmp_path, guard.model_copy(update={"allow_job_opt_out": True}), tokenizer)
    before = weights(lenient)
    lenient.submit(destructive(guard=False))
    run_all(lenient)
    (job,) = lenient.status().jobs
    assert job.state == "succeeded" and not job.guarded and job.guard is None
    assert any(not torch.equal(v, before[n]) for n, v in weights(lenient).items())


def test_rollback_to_a_checkpoint_restores_weights_and_optimizer(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, checkpoint_dir=tmp_path / "ckpt")
    service.submit(TrainJob(examples=[EXAMPLE], epochs=2, learning_rate=1e-3))
    run_all(service)
    saved = service.checkpoint()
    at_checkpoint, optimizer_at_checkpoint = weights(service), copy.deepcopy(service.optimizer.state_dict())
    service.submit(destructive())
    run_all(service)
    version = service.weight_version
    assert any(not torch.equal(v, at_checkpoint[n]) for n, v in weights(service).items())

    record = service.rollback_to(saved.step)
    assert (record.source, record.checkpoint, record.step) == ("request", f"step-{saved.step:08d}", saved.step)
    assert record.weight_version == version + 1 == service.weight_version
    for name, value in weights(service).items():
        assert torch.equal(value, at_checkpoint[name]), name
    restored = service.optimizer.state_dict()
    assert restored["counters"] == optimizer_at_checkpoint["counters"]
    for key, state in optimizer_at_checkpoint["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][key][field]), torch.as_tensor(value)), field
    # The rollback is checkpointed at once: a restart resumes from the restored weights.
    assert service.store.latest().weight_version == service.weight_version
    assert service.status().guard.rollbacks == 1 and not service.status().guard.enabled
    assert service.rollback_to("latest").weight_version == service.weight_version


def test_rollback_refusals(tiny_dir, tmp_path):
    nothing = build(tiny_dir, tmp_path)
    with pytest.raises(TrainerError) as no_dir:
        nothing.rollback_to("latest")
    assert no_dir.value.code == 409
    service = build(tiny_dir, tmp_path, checkpoint_dir=tmp_path / "ckpt")
    for to in ("latest", 7, "step-00000007", "../elsewhere", str(tmp_path / "step-00000001")):
        with pytest.raises(TrainerError) as missing:
            service.rollback_to(to)
        assert missing.value.code == 404, to
    service.submit(TrainJob(examples=[EXAMPLE], epochs=1, learning_rate=1e-3))
    run_all(service)
    saved = service.checkpoint()
    (service.store.root / f"unhealthy-step-{9:08d}").mkdir()
    with pytest.raises(TrainerError) as unhealthy:
        service.rollback_to(9)
    assert unhealthy.value.code == 422 and "unhealthy" in str(unhealthy.value)
    service._job_lock.acquire()  # a job is running
    try:
        with pytest.raises(TrainerError) as busy:
            service.rollback_to(saved.step)
        assert busy.value.code == 409
    finally:
        service._job_lock.release()
