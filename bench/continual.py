"""Continual-learning benchmark (issue 15) against a real `onlinemodel serve`.

Teaches K invented facts one `POST /train` request each (the way a user sends them), asks each back right
after (chat completion, temperature 0), and at the end asks every fact again, each with a paraphrased
question, and a control set of general questions the untouched model answers right; the held-out loss is
what the served weights give (vLLM's prompt logprobs on /v1/completions). Data and scoring:
`bench/continual_set.py`.

    # starts `onlinemodel serve` on CPU with SmolLM2-135M-Instruct (bundled), its default settings:
    .venv/bin/python bench/continual.py --facts 32 --json /tmp/continual.json
    # a running server (a GPU's; its token in ONLINEMODEL_API_TOKEN):
    python3 bench/continual.py --url http://127.0.0.1:8000 --facts 32
    # the same in bounded sessions (a device call's 10 minutes): each stops starting facts after 400 s and
    # exits 3; the next, against the same server, carries on from the progress file
    python3 bench/continual.py --url http://127.0.0.1:8000 --progress /tmp/p.json --stop-after 400
    # serve flags pass through, e.g. the defaults before docs/learning.md:
    .venv/bin/python bench/continual.py --label "fixed 5 epochs" --serve-arg=--default-epochs=5 \
        --serve-arg=--no-early-stop --serve-arg=--replay-examples=0

Prints a markdown table row (docs/benchmarks.md) and writes everything measured to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual_set as cs  # noqa: E402
# Every use of the runtime's modules is here (they move in the runtime regrouping).
from onlinemodel_protocol.config import ENV_API_TOKEN  # noqa: E402
from onlinemodel_runtime.devtools.launcher import ServerProcess  # noqa: E402
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2  # noqa: E402

FINISHED = ("succeeded", "failed", "cancelled", "rolled_back")
# Questions asked at once: vLLM batches them (the replies are greedy either way).
CONCURRENT_QUESTIONS = 8
# Job status polls: each is answered by the trainer process, so polling fast slows the job on a busy CPU.
POLL_SECONDS = 1.0


class Served:
    """`continual_set.Backend` over a server's HTTP API."""

    def __init__(self, url: str, token: str | None, train_fields: dict[str, Any], job_timeout: float):
        self.http = httpx.Client(base_url=url, timeout=600.0,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
        self.model = self._get("/v1/models")["data"][0]["id"]
        self.train_fields = train_fields
        self.job_timeout = job_timeout

    def _post(self, path: str, body: dict[str, Any], wait_unavailable: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait_unavailable
        resp = self.http.post(path, json=body)
        # 503 while the trainer starts (it loads after vLLM serves): asked again after its Retry-After.
        while resp.status_code == 503 and time.monotonic() < deadline:
            time.sleep(float(resp.headers.get("Retry-After", POLL_SECONDS)))
            resp = self.http.post(path, json=body)
        if resp.status_code >= 300:
            raise RuntimeError(f"POST {path} answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def _get(self, path: str) -> dict[str, Any]:
        resp = self.http.get(path)
        resp.raise_for_status()
        return resp.json()

    def ask(self, questions: list[str]) -> list[str]:
        def one(question: str) -> str:
            return self._post("/v1/chat/completions", {
                "model": self.model, "temperature": 0, "max_tokens": cs.MAX_TOKENS,
                "messages": [{"role": "user", "content": question}]})["choices"][0]["message"]["content"].strip()

        with ThreadPoolExecutor(CONCURRENT_QUESTIONS) as pool:
            return list(pool.map(one, questions))

    def teach(self, example: dict[str, Any]) -> dict[str, Any]:
        job_id = self._post("/train", {"examples": [example], **self.train_fields},
                            wait_unavailable=self.job_timeout)["job_id"]
        deadline = time.monotonic() + self.job_timeout
        while time.monotonic() < deadline:
            job = next((j for j in self._get("/train/status")["jobs"] if j["id"] == job_id), None)
            if job is not None and job["state"] in FINISHED:
                if job["state"] in ("failed", "cancelled"):
                    raise RuntimeError(f"job {job_id} {job['state']}: {job['error']}")
                return job
            time.sleep(POLL_SECONDS)
        raise TimeoutError(f"job {job_id} not finished after {self.job_timeout:.0f}s")

    def heldout_loss(self, text: str) -> float:
        tokens = self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]
        choice = self._post("/v1/completions", {"model": self.model, "prompt": tokens, "max_tokens": 1,
                                                 "temperature": 0, "prompt_logprobs": 0})["choices"][0]
        # Entry i holds the logprob of token i given tokens[:i] (the first has none).
        logprobs = [entry[str(tok)]["logprob"] for tok, entry in zip(tokens[1:], choice["prompt_logprobs"][1:])]
        return -sum(logprobs) / len(logprobs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server; default: start `onlinemodel serve` on CPU")
    ap.add_argument("--model", default=None, help="model to serve (default: SmolLM2-135M-Instruct, bundled)")
    ap.add_argument("--facts", type=int, default=32, help="K: facts taught, one request each")
    ap.add_argument("--seed", type=int, default=0, help="0: the data file's fact order; others shuffle it")
    ap.add_argument("--epochs", type=int, default=None, help="the requests' `epochs` (default: the server's)")
    ap.add_argument("--learning-rate", type=float, default=None, help="the requests' `learning_rate`")
    ap.add_argument("--serve-arg", action="append", default=[], help="flag for `onlinemodel serve` (repeatable)")
    ap.add_argument("--label", default="defaults", help="the run's name in the table")
    ap.add_argument("--job-timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--progress", type=Path, default=None,
                    help="state after each fact; a run given an existing one carries on from it (with --url: the "
                         "same server, still up)")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="seconds after which no further fact is started; exits 3, to be carried on with --progress")
    args = ap.parse_args()
    fields = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.learning_rate)) if v is not None}

    server = None
    model = args.model
    work = Path(tempfile.mkdtemp(prefix="continual-"))
    # A SIGTERM ends the run through `finally`, which stops the server it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    try:
        if args.url is None:
            model = model or str(ensure_smollm2())
            server = ServerProcess(model, log_path=work / "server.log",
                                   extra_args=["--max-model-len", "1024", *args.serve_arg])
            print(f"starting onlinemodel serve ({model}); log {server.log_path}", flush=True)
            server.wait_ready()
        token = server.token if server is not None else os.environ.get(ENV_API_TOKEN)
        backend = Served(args.url or server.url, token, fields, args.job_timeout)
        status = backend._get("/train/status")
        settings = {"train_fields": fields, "serve_args": args.serve_arg, "model": model or backend.model,
                    "optimizer": status.get("optimizer"), "replay": status.get("replay")}
        print(f"settings: {settings}", flush=True)
        try:
            result = cs.run(backend, cs.ordered(cs.load_facts(), args.seed), cs.load_controls(), args.facts,
                            log=lambda s: print(s, flush=True), progress=args.progress, stop_after=args.stop_after)
        except cs.Paused as paused:
            print(f"paused: {paused}; carry on with the same --progress {args.progress}", flush=True)
            return 3
    finally:
        if server is not None:
            server.stop()
    m = cs.metrics(result)
    result.update(settings=settings, metrics=m, seed=args.seed, date=time.strftime("%Y-%m-%d"),
                  machine={"cpus": os.cpu_count(), "processor": platform.processor(),
                           "load_before": load_before, "load_after": os.getloadavg()})
    print(cs.markdown_table([(args.label, m)]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
