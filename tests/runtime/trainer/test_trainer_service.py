"""The trainer's state machine on a tiny real model (no vLLM): jobs, cancel, counters, NaN safety,
checkpoints and their health."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import torch

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.rpc import Counters, EncodedExample, TrainJob
from onlinemodel_runtime.checkpoint import CheckpointStore
from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir
from onlinemodel_runtime.optim import TrainPolicy, make_optimizer
from onlinemodel_runtime.trainer.service import TrainerError, TrainerService

EXAMPLE = EncodedExample(input_ids=[1, 5, 9, 13, 17, 21, 2], labels=[-100, -100, -100, 13, 17, 21, 2])


def job(*examples: EncodedExample, epochs: int = 1) -> TrainJob:
    return TrainJob(examples=list(examples or [EXAMPLE]), epochs=epochs, learning_rate=1e-3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny") / "llama", num_hidden_layers=2,
                               dtype="float32")


def build(tiny_dir, tmp_path, anchors=None, **cfg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.train()
    # Fixed epochs, no replay and no anchor term unless a test asks: these tests count steps
    # (test_trainer_service_continual.py covers early stop, replay and the anchor term).
    cfg = {"early_stop": False, "replay_examples": 0, "anchor_weight": 0, "null_space_energy": 0, **cfg}
    config = RuntimeConfig(model=str(tiny_dir), base_model=str(tiny_dir), state_dir=tmp_path / "state", **cfg)
    # As the trainer builds it (trainer/__main__.py): with the configured way of writing bf16 weights.
    optimizer = make_optimizer(model, TrainPolicy(), lr=1e-3, rounding=config.weight_rounding)
    optimizer.attach_to_backward()
    store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
    return TrainerService(config, model, optimizer, store, anchors=anchors)


def run_all(service: TrainerService) -> None:
    # Run queued jobs on this thread (the service's own thread is not started in these tests).
    while not service._queue.empty():
        service._run_job(*service._queue.get())


def test_job_updates_counters_and_weight_version(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    before = {n: p.detach().clone() for n, p in service.model.named_parameters()}
    accepted = service.submit(job(epochs=3))
    assert (accepted.state, accepted.examples, accepted.tokens) == ("queued", 1, EXAMPLE.num_tokens)
    run_all(service)
    status = service.status()
    assert status.steps == 3 and status.weight_version == 3
    assert status.tokens_trained == 3 * EXAMPLE.num_tokens
    (done,) = status.jobs
    assert (done.id, done.state, done.steps, done.epochs, done.learning_rate) == (
        accepted.job_id, "succeeded", 3, 3, 1e-3)
    assert done.created_at.endswith("Z") and done.finished_at.endswith("Z") and done.started_at.endswith("Z")
    assert (done.steps_done, done.steps_total, done.eta_seconds) == (3, 3, None)
    assert status.state == "idle" and status.optimizer["steps_applied"] == 3
    changed = [n for n, p in service.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "training changed no weight"


def test_non_finite_step_is_skipped_and_weights_untouched(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    norm = service.model.model.norm.weight  # frozen by the default policy: poisons the loss only
    with torch.no_grad():
        norm[0] = float("nan")
    before = {n: p.detach().clone() for n, p in service.model.named_parameters()}
    service.submit(job(epochs=2))
    run_all(service)
    status = service.status()
    assert status.skipped_steps == 2 and status.steps == 0 and status.weight_version == 0
    for n, p in service.model.named_parameters():
        assert torch.equal(p, before[n]) or (torch.isnan(p).any() and n == "model.norm.weight"), n
    assert status.last_loss is None and status.jobs[0].last_loss is None  # JSON has no NaN
    assert '"last_loss":null' in status.model_dump_json()  # what the API answers


def test_failed_job_is_reported_and_trainer_goes_on(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    service.submit(job(EncodedExample(input_ids=[10**9], labels=[1])))  # id out of vocab
    service.submit(job())
    run_all(service)
    jobs = service.status().jobs
    assert jobs[0].state == "failed" and "Error" in jobs[0].error
    assert jobs[1].state == "succeeded"
    assert service.status().last_error == jobs[0].error


def two_steps_checkpointed(tiny_dir, ckpt):
    """A service that trained 2 steps and checkpointed them under `ckpt`, and that checkpoint."""
    service = build(tiny_dir, ckpt.parent, checkpoint_dir=ckpt)
    service.submit(job(epochs=2))
    run_all(service)
    return service, service.checkpoint()


def test_checkpoint_then_resume_restores_counters_and_optimizer(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    service, info = two_steps_checkpointed(tiny_dir, ckpt)
    assert info.step == 2 and info.weight_version == 2
    assert service.status().checkpoint.last == info

    fresh = build(info.path, tmp_path, checkpoint_dir=ckpt)
    fresh.restore()
    assert fresh.steps == 2 and fresh.weight_version == 2 and fresh.optimizer.steps_applied == 2
    # Read back from disk, `seconds` is the time until the metadata was written (see CheckpointInfo).
    assert fresh.status().checkpoint.last.model_dump(exclude={"seconds"}) == info.model_dump(exclude={"seconds"})
    fresh.submit(job())
    run_all(fresh)
    assert fresh.status().steps == 3 and fresh.optimizer.steps_applied == 3


def test_resume_keeps_the_configured_weight_rounding(tiny_dir, tmp_path):
    """The optimizer state restores the hyperparameters saved with it; the way of writing bf16 weights is the
    deployment's (--weight-rounding) and may change across a restart."""
    ckpt = tmp_path / "ckpt"
    _, info = two_steps_checkpointed(tiny_dir, ckpt)  # saved with "stochastic", the default
    fresh = build(info.path, tmp_path, checkpoint_dir=ckpt, weight_rounding="compensated")
    fresh.restore()
    assert fresh.optimizer.steps_applied == 2  # the state was restored ...
    assert {g["rounding"] for g in fresh.optimizer.param_groups} == {"compensated"}  # ... and the setting kept


def test_restore_keeps_the_larger_counters_of_a_restart(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    _, info = two_steps_checkpointed(tiny_dir, ckpt)
    # Counters behind the checkpoint's change nothing.
    behind = build(info.path, tmp_path, checkpoint_dir=ckpt)
    behind.restore(Counters(steps=1, weight_version=1))
    assert behind.status().weight_version == 2
    # A restarted trainer whose live weights saw 3 more steps than the checkpoint.
    ahead = build(info.path, tmp_path, checkpoint_dir=ckpt)
    ahead.restore(Counters(steps=5, tokens_trained=35, weight_version=5))
    status = ahead.status()
    assert (status.steps, status.tokens_trained, status.weight_version) == (5, 35, 5)
    assert ahead.checkpoint().step == 5  # those steps are in no checkpoint yet: a new one is written


def test_restore_reports_an_unwritable_checkpoint_directory(tiny_dir, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    service = build(tiny_dir, tmp_path, checkpoint_dir=blocker / "ckpt")
    service.restore()
    checkpoint = service.status().checkpoint
    assert checkpoint.state == "failed" and "not writable" in checkpoint.last_error


def test_checkpoint_errors_are_clear(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    with pytest.raises(TrainerError, match="no checkpoint directory") as exc:
        service.checkpoint()
    assert exc.value.code == 409
    busy = build(tiny_dir, tmp_path, checkpoint_dir=tmp_path / "ckpt")
    busy._checkpoint_lock.acquire()
    with pytest.raises(TrainerError, match="already") as exc:
        busy.checkpoint()
    assert exc.value.code == 409


def test_a_full_queue_is_a_429(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, max_queued_jobs=2)
    service.submit(job())
    service.submit(job())
    with pytest.raises(TrainerError, match="2 jobs are already queued") as exc:
        service.submit(job())
    assert exc.value.code == 429


def test_periodic_checkpoint_every_n_steps(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, checkpoint_dir=tmp_path / "ckpt", checkpoint_every_steps=2)
    service.submit(job(epochs=5))
    run_all(service)
    steps = sorted(info.step for info in service.store.checkpoints())
    assert steps == [2, 4]
    assert service.status().checkpoint.last.step == 4


def test_failed_checkpoint_is_reported_and_training_goes_on(tiny_dir, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    service = build(tiny_dir, tmp_path, checkpoint_dir=blocker / "ckpt")
    service.submit(job())
    run_all(service)
    with pytest.raises(TrainerError, match="checkpoint failed") as exc:
        service.checkpoint()
    assert exc.value.code == 500
    status = service.status()
    assert status.checkpoint.state == "failed" and status.checkpoint.last_error
    service.submit(job())
    run_all(service)
    assert service.status().steps == 2


def test_cancel_a_queued_job(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    first, second = service.submit(job()), service.submit(job())
    cancelled = service.cancel(second.job_id)
    assert cancelled.state == "cancelled" and cancelled.finished_at
    assert service.status().queued_jobs == 1
    run_all(service)
    status = service.status()
    assert [(j.id, j.state, j.steps) for j in status.jobs] == [(first.job_id, "succeeded", 1),
                                                              (second.job_id, "cancelled", 0)]
    assert status.steps == 1
    assert status.job_counts.model_dump() == {"submitted": 2, "succeeded": 1, "failed": 0, "cancelled": 1,
                                               "rolled_back": 0}
    with pytest.raises(TrainerError, match="already cancelled") as exc:
        service.cancel(second.job_id)
    assert exc.value.code == 409
    with pytest.raises(TrainerError, match="already succeeded") as exc:
        service.cancel(first.job_id)
    assert exc.value.code == 409
    with pytest.raises(TrainerError, match="no job") as exc:
        service.cancel("job-unknown")
    assert exc.value.code == 404


def test_cancel_a_running_job_stops_it_after_the_current_step(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    service.start()
    try:
        accepted = service.submit(job(epochs=20))
        deadline = time.monotonic() + 60
        while service.jobs[accepted.job_id].steps < 2:
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.01)
        running = next(j for j in service.status().jobs if j.id == accepted.job_id)
        # Progress while it runs: steps of examples x epochs, when it started, how long the rest takes.
        assert (running.steps_total, running.started_at is not None) == (20, True)
        assert running.steps_done == running.steps >= 2 and running.eta_seconds > 0
        answer = service.cancel(accepted.job_id)
        assert answer.state == "running"
        while service.jobs[accepted.job_id].state == "running":
            assert time.monotonic() < deadline, "the job was not stopped"
            time.sleep(0.01)
    finally:
        service.stop()
    done = service.status().jobs[0]
    assert done.state == "cancelled" and 2 <= done.steps < 20 and done.error is None
    assert service.status().steps == done.steps  # the steps it took stay (no rollback)
    assert service.status().job_counts.cancelled == 1


def test_job_counts_continue_and_lost_jobs_count_as_failed(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path)
    service.submit(job())
    service.submit(job())
    run_all(service)
    service.submit(job())  # queued when the trainer "dies"
    restarted = build(tiny_dir, tmp_path)
    restarted.restore(Counters.model_validate(service.status().model_dump()))
    assert restarted.status().job_counts.model_dump() == {"submitted": 3, "succeeded": 2, "failed": 1,
                                                          "cancelled": 0, "rolled_back": 0}


def test_unhealthy_weights_never_become_latest(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    service, healthy = two_steps_checkpointed(tiny_dir, ckpt)
    service.debug_scale("model.norm.weight", float("inf"))  # poisons the weights and every later loss
    service.submit(job())
    run_all(service)
    with pytest.raises(TrainerError, match="unhealthy") as exc:
        service.checkpoint()
    assert exc.value.code == 422 and "latest is still" in str(exc.value)
    status = service.status().checkpoint
    assert status.last == healthy and status.state == "idle"
    bad = status.last_unhealthy
    assert not bad.healthy and "non-finite" in bad.unhealthy_reason and "NaN or infinity" in bad.unhealthy_reason
    assert bad.path.endswith("unhealthy-step-00000002") and bad.weight_version == 3  # +1: the poison
    assert service.store.latest().path == Path(healthy.path)
    # Asked again with the same weights: the same refusal, nothing written; periodic ones skip it.
    with pytest.raises(TrainerError, match="unhealthy"):
        service.checkpoint()
    service.periodic_checkpoint()
    assert service.status().checkpoint.last_unhealthy == bad


def test_a_diverging_loss_keeps_the_checkpoint_aside(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, checkpoint_dir=tmp_path / "ckpt")
    service.submit(job())
    run_all(service)
    window = service.loss_health._losses.maxlen
    for loss in [0.5] * window + [50.0] * window:  # as if the last steps had exploded
        service.loss_health.observe(loss)
    with pytest.raises(TrainerError, match="diverging") as exc:
        service.checkpoint()
    assert exc.value.code == 422
    assert service.store.latest() is None and service.status().checkpoint.last is None


@contextlib.contextmanager
def training_back_to_back(service: TrainerService):
    """The service's own thread running a long job, two steps in; cancelled and stopped afterwards."""
    service.start()
    try:
        service.submit(job(epochs=20))
        deadline = time.monotonic() + 60
        while service.steps < 2:
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.01)
        yield
        assert service.jobs[next(iter(service.jobs))].state == "running"
    finally:
        for job_id in list(service.jobs):
            service._cancel_requested.add(job_id)
        service.stop()


def test_a_checkpoint_is_not_starved_by_back_to_back_steps(tiny_dir, tmp_path):
    service = build(tiny_dir, tmp_path, checkpoint_dir=tmp_path / "ckpt")
    with training_back_to_back(service):
        before = service.steps
        info = service.checkpoint()
        # The step running when it was asked finishes (and at most one that had already started to
        # take the lock); then the snapshot goes first.
        assert info.step - before <= 2, (before, info.step)
