"""A bounded load test on loopback against real vLLM on CPU (the session's server): for a fixed time,
concurrent chat completions, /train submits (valid and invalid, with Idempotency-Key retries, sequential
and concurrent, and a key reused with another body), /train/status polls, a cancel and a checkpoint.
No 5xx; no job lost or doubled; every 202'd job accounted for in the status. Prints its numbers
(docs/benchmarks.md records them)."""

from __future__ import annotations

import collections
import json
import statistics
import threading
import time

import pytest

from .test_serving_while_training import ECHO_EXAMPLE

pytestmark = pytest.mark.e2e

DURATION = 60.0
JOB = {"examples": [ECHO_EXAMPLE], "epochs": 1, "learning_rate": 1e-9}  # moves no answer
INVALID = [
    {"examples": []},
    {"examples": [{"messages": [{"role": "wizard", "content": "x"}]}]},
    {"examples": [ECHO_EXAMPLE], "epochs": 0},
    {"examples": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "w " * 3000}]}]},
]


class Recorder:
    def __init__(self, server):
        self.server = server
        self.calls: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def __call__(self, kind: str, method: str, path: str, body=None, **kwargs):
        started = time.perf_counter()
        code, answer = self.server.request(method, path, body, **kwargs)
        with self.lock:
            self.calls[kind].append((code, time.perf_counter() - started))
        return code, answer


def test_mixed_load_loses_and_doubles_no_job(server):
    call = Recorder(server)
    before = server.status()
    deadline = time.monotonic() + DURATION
    accepted: dict[str, str] = {}  # job id -> how it was submitted
    by_key: dict[str, str] = {}
    seen: dict[str, str] = {}  # job id -> last state a poll saw
    problems: list[str] = []
    completion_tokens = []

    def completions(worker: int):
        i = 0
        while time.monotonic() < deadline:
            i += 1
            code, answer = call("completion", "POST", "/v1/chat/completions", {
                "model": server.served_model_name, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count to five. ({worker}-{i})"}]})
            if code == 200:
                completion_tokens.append(answer["usage"]["completion_tokens"])

    def keep(job_id: str, how: str):
        with call.lock:
            if job_id in accepted:
                problems.append(f"{job_id} answered twice as a new job ({how}, {accepted[job_id]})")
            accepted[job_id] = how

    def submit_with_key(key: str):
        code, answer = call("train+key", "POST", "/train", JOB, headers={"Idempotency-Key": key})
        if code == 202:
            with call.lock:
                first = by_key.setdefault(key, answer["job_id"])
            if first != answer["job_id"]:
                problems.append(f"key {key}: {answer['job_id']} after {first}")
        return code, answer

    def submitter():
        i = 0
        while time.monotonic() < deadline:
            i += 1
            key = f"load-{i}"
            code, answer = submit_with_key(key)
            if code == 202:
                keep(answer["job_id"], key)
                submit_with_key(key)  # a client retry: the same job, never a second one
            if i % 3 == 0:  # two retries racing each other
                racers = [threading.Thread(target=submit_with_key, args=(f"race-{i}",)) for _ in range(2)]
                for t in racers:
                    t.start()
                for t in racers:
                    t.join()
                if f"race-{i}" in by_key:
                    keep(by_key[f"race-{i}"], f"race-{i}")
            if i % 2 == 0:
                code, answer = call("train", "POST", "/train", JOB)
                if code == 202:
                    keep(answer["job_id"], "no key")
            code, _ = call("train-invalid", "POST", "/train", INVALID[i % len(INVALID)])
            if not 400 <= code < 500:
                problems.append(f"invalid body answered {code}")
            if i % 5 == 0 and key in by_key:
                code, _ = call("train-key-reused", "POST", "/train", dict(JOB, epochs=2),
                               headers={"Idempotency-Key": key})
                if code != 422:
                    problems.append(f"key reused with another body answered {code}")
            if i == 8:  # cancel whatever is queued last
                queued = [j["id"] for j in server.status()["jobs"] if j["state"] == "queued"]
                if queued:
                    call("cancel", "DELETE", f"/train/jobs/{queued[-1]}")
            time.sleep(0.3)

    def poller():
        while time.monotonic() < deadline:
            code, status = call("status", "GET", "/train/status")
            if code == 200:
                with call.lock:
                    seen.update({j["id"]: j["state"] for j in status["jobs"]})
            time.sleep(0.25)

    def checkpointer():
        time.sleep(DURATION / 2)
        code, answer = call("checkpoint", "POST", "/checkpoint", timeout=300)
        if code != 200:
            problems.append(f"checkpoint answered {code}: {answer}")

    workers = [threading.Thread(target=completions, args=(w,)) for w in range(2)]
    workers += [threading.Thread(target=f) for f in (submitter, poller, checkpointer)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - (deadline - DURATION)

    drain_deadline = time.monotonic() + 300
    while True:
        status = server.status()
        seen.update({j["id"]: j["state"] for j in status["jobs"]})
        if status["state"] == "idle" and status["queued_jobs"] == 0:
            break
        assert time.monotonic() < drain_deadline, f"jobs never drained: {status}"
        time.sleep(0.5)

    summary = {"seconds": round(wall, 1), "jobs_accepted": len(accepted),
               "steps": status["steps"] - before["steps"],
               "completion_tokens_per_s": round(sum(completion_tokens) / DURATION, 1)}
    for kind, results in sorted(call.calls.items()):
        latencies = sorted(s for _, s in results)
        summary[kind] = {"n": len(results), "codes": dict(collections.Counter(c for c, _ in results)),
                         "p50_ms": round(1000 * statistics.median(latencies)),
                         "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])}
    print("LOAD", json.dumps(summary))

    assert not problems, problems
    fives = {k: [c for c, _ in r if c >= 500] for k, r in call.calls.items()}
    assert not any(fives.values()), fives
    assert len(call.calls["completion"]) >= 4 and len(accepted) >= 10, summary
    # Every accepted job is a distinct job the trainer counted, and each ended exactly once.
    counts = {k: status["job_counts"][k] - before["job_counts"][k] for k in status["job_counts"]}
    assert counts["submitted"] == len(accepted), (counts, len(accepted))
    assert counts["succeeded"] + counts["cancelled"] == len(accepted) and counts["failed"] == 0, counts
    assert set(accepted) <= set(seen), set(accepted) - set(seen)  # each was in the trainer's job list
    assert status["checkpoint"]["last"] is not None
