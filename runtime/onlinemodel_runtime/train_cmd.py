"""``onlinemodel train FILE.jsonl``: check a file of chat examples, send it, follow the jobs to their end.

Nothing is sent unless every line passes the server's own checks (``train_file.py``). The requests go out
in order, each with its Idempotency-Key; a full queue (429) holds the rest back while the sent jobs run,
and a trainer that is still starting (503) is waited for, as its ``Retry-After`` says. Progress is the
steps of all the file's jobs, the last loss and the time left: one redrawn line on a terminal, a plain
line per change otherwise. Exit status: 0 when every job succeeded, 1 when one failed, was cancelled or
was lost, or the server refused; 2 for a bad file or option (nothing sent).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from onlinemodel_protocol.api import FINISHED_JOB_STATES, Job, TrainStatus
from onlinemodel_protocol.client import ApiError, Client, ClientError
from onlinemodel_protocol.config import ENV_API_TOKEN, ENV_VLLM_API_KEY
from onlinemodel_runtime.server import auth
from onlinemodel_runtime.train_file import OptionError, Request, TrainFileError, read_examples, split_requests

POLL_SECONDS = 1.0
STARTING_WAIT_SECONDS = 900.0  # how long a trainer that answers 503 (starting) is waited for
EXIT_FAILED, EXIT_USAGE = 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the served model on a JSONL file of chat examples and follow it",
                       description="Each line: {\"messages\": [...]} (OpenAI's chat fine-tuning format).")
    p.add_argument("file", type=Path, help="JSONL file, one example per line")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${ENV_API_TOKEN}, else ${ENV_VLLM_API_KEY})")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over each request's examples (default: the server's --default-epochs)")
    p.add_argument("--learning-rate", type=float, default=None, help="default: the server's --learning-rate")
    p.add_argument("--no-wait", action="store_true", help="exit once every request is queued")


@dataclass
class _Run:
    """The file's jobs as last seen: what the progress line and the exit status are computed from."""

    requests: list[Request]
    jobs: dict[str, Job] = field(default_factory=dict)  # job id -> latest view
    order: list[str] = field(default_factory=list)  # job ids in the order of `requests`
    first_step_at: float | None = None
    steps_at_first: int = 0

    @property
    def steps_total(self) -> int:
        return sum(r.steps for r in self.requests)

    @property
    def steps_done(self) -> int:
        return sum(job.steps for job in self.jobs.values())

    def eta_seconds(self, now: float) -> float | None:
        done = self.steps_done
        if self.first_step_at is None or done <= self.steps_at_first or now <= self.first_step_at:
            return None
        rate = (done - self.steps_at_first) / (now - self.first_step_at)
        return (self.steps_total - done) / rate

    def loss(self) -> float | None:
        losses = [self.jobs[j].last_loss for j in self.order if self.jobs[j].last_loss is not None]
        return losses[-1] if losses else None

    def finished(self) -> bool:
        return len(self.order) == len(self.requests) and all(
            self.jobs[j].state in FINISHED_JOB_STATES for j in self.order)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class _Display:
    """A redrawn bar on a terminal; on anything else a plain line whenever the progress changes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = ""

    def progress(self, run: _Run, now: float) -> None:
        done, total, loss = run.steps_done, run.steps_total, run.loss()
        facts = f"{done}/{total} steps  loss {'-' if loss is None else f'{loss:.4f}'}  " \
                f"ETA {_duration(run.eta_seconds(now))}"
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {facts}\033[K")
            self.out.flush()
        elif facts.split("  ETA")[0] != self._last.split("  ETA")[0]:
            self.say(f"progress: {facts}")
        self._last = facts

    def say(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(line + "\n")
        self.out.flush()


def _token(args: argparse.Namespace) -> str | None:
    tokens = auth.resolve_tokens({ENV_API_TOKEN: args.token} if args.token is not None else os.environ)
    return tokens[0] if tokens else None


def _follow(client: Client, run: _Run, display: _Display, status: TrainStatus) -> None:
    """Update `run` from `status` (and GET /train/jobs/{id} for a job it no longer lists)."""
    listed = {job.id: job for job in status.jobs}
    for job_id in run.order:
        before = run.jobs[job_id]
        if before.state in FINISHED_JOB_STATES:
            continue
        job = listed.get(job_id)
        if job is None:
            try:
                job = client.job(job_id)
            except ApiError as exc:
                if exc.status_code != 404:
                    raise
                job = before.model_copy(update={"state": "failed", "error": "the server no longer lists this job"})
        run.jobs[job_id] = job
        if job.state in FINISHED_JOB_STATES:
            line = f"job {job.id} {job.state}: {job.steps} steps, loss {job.last_loss}"
            display.say(line + (f", error: {job.error}" if job.error else ""))
    if run.first_step_at is None and run.steps_done:  # the rate is measured from the first step seen on
        run.first_step_at, run.steps_at_first = time.monotonic(), run.steps_done


def _submit(client: Client, run: _Run, display: _Display) -> bool:
    """Send the next request; False when the queue is full (429: try again after the next poll)."""
    request = run.requests[len(run.order)]
    try:
        accepted = client.train(request.body["examples"], epochs=request.body["epochs"],
                                learning_rate=request.body.get("learning_rate"),
                                idempotency_key=request.idempotency_key)
    except ApiError as exc:
        if exc.status_code == 429:
            return False
        if exc.param and exc.param.startswith("examples["):  # only the server can tokenize: name the line
            index, field = exc.param[len("examples["):].split("]", 1)
            message = exc.message.removeprefix(f"{exc.param}: ")
            field = field.lstrip(".")
            raise ClientError(f"line {request.lines[int(index)]}: {field + ': ' if field else ''}{message}") from exc
        raise
    run.order.append(accepted.job_id)
    # What the answer tells of the job, until the next poll brings the trainer's view of it.
    run.jobs[accepted.job_id] = Job(id=accepted.job_id, state=accepted.state, examples=accepted.examples,
                                    epochs=request.body["epochs"], learning_rate=0.0, steps_total=request.steps,
                                    created_at="")
    lines = f"lines {request.lines[0]}-{request.lines[-1]}" if len(request.lines) > 1 else f"line {request.lines[0]}"
    display.say(f"job {accepted.job_id} {accepted.state}: {lines}, {accepted.examples} examples, "
                f"{accepted.tokens} tokens, {request.steps} steps")
    return True


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    try:
        token = _token(args)
    except auth.TokenError as exc:
        print(f"onlinemodel train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    display = _Display(out or sys.stdout)
    with Client(args.url, token, retry_seconds=STARTING_WAIT_SECONDS) as client:
        try:
            limits = client.limits()
            lines = read_examples(args.file, limits, epochs=args.epochs, learning_rate=args.learning_rate)
        except (TrainFileError, OptionError, OSError) as exc:
            print(f"onlinemodel train: {args.file}: refused, nothing was sent:\n{exc}", file=sys.stderr)
            return EXIT_USAGE
        except ClientError as exc:
            print(f"onlinemodel train: cannot read the server's limits: {exc}", file=sys.stderr)
            return EXIT_FAILED
        requests = split_requests(lines, limits, epochs=args.epochs, learning_rate=args.learning_rate)
        display.say(f"{args.file}: {len(lines)} examples in {len(requests)} request(s), "
                    f"at most {sum(r.steps for r in requests)} steps")  # early stop ends examples once learned
        state = _Run(requests)
        try:
            while True:
                while len(state.order) < len(requests) and _submit(client, state, display):
                    pass
                if args.no_wait and len(state.order) == len(requests):
                    return 0
                _follow(client, state, display, client.status())
                display.progress(state, time.monotonic())
                if state.finished():
                    break
                time.sleep(POLL_SECONDS)
        except ClientError as exc:
            display.say(f"onlinemodel train: {exc}")
            return EXIT_FAILED
    failed = [state.jobs[j] for j in state.order if state.jobs[j].state != "succeeded"]
    display.say(f"done: {len(state.order) - len(failed)} of {len(state.order)} jobs succeeded, "
                f"{state.steps_done} steps, last loss {state.loss()}")
    return EXIT_FAILED if failed else 0
