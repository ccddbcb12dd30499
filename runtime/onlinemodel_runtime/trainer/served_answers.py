"""The guard's probes asked of vLLM itself: a loopback chat request to the API server this trainer belongs to.

What a probe checks is what users are served: vLLM's own chat template handling, kernels and greedy
decoding, on the weights being served. Each evaluation sends its probes concurrently (vLLM batches them)
with a ``cache_salt`` of its own, so no prompt is answered from prefix-cache blocks computed with earlier
weights. The key of vLLM's ``/v1`` routes, when one is set, comes from the environment the API server
gave the trainer (``ENV_VLLM_API_KEY``), never from the command line.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from onlinemodel_protocol.config import ENV_VLLM_API_KEY
from onlinemodel_protocol.guard import ChatProbe

TIMEOUT_SECONDS = 300.0


class ServedAnswerError(RuntimeError):
    """vLLM did not answer a probe (the job is then not judged: it fails with this error)."""


class ServedAnswers:
    """`__call__(probes)`: probe name -> vLLM's greedy answer, over `url` (the API server's own address)."""

    def __init__(self, url: str, model: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(ENV_VLLM_API_KEY)
        # Loopback to our own server: its certificate names the public host, not 127.0.0.1.
        self._tls = ssl._create_unverified_context() if url.startswith("https:") else None

    def __call__(self, probes: list[ChatProbe]) -> dict[str, str]:
        salt = f"onlinemodel-guard-{uuid.uuid4().hex}"
        with ThreadPoolExecutor(max_workers=max(1, min(len(probes), 16))) as pool:
            answers = pool.map(lambda probe: self._ask(probe, salt), probes)
            return {probe.name: answer for probe, answer in zip(probes, answers)}

    def _ask(self, probe: ChatProbe, salt: str) -> str:
        body = {"model": self.model, "messages": [m.model_dump() for m in probe.messages], "temperature": 0,
                "max_tokens": probe.max_tokens, "cache_salt": salt}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=self._tls) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as exc:
            raise ServedAnswerError(f"vLLM answered probe {probe.name!r} with {exc.code}: "
                                    f"{exc.read()[:300].decode(errors='replace')}") from None
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ServedAnswerError(f"vLLM did not answer probe {probe.name!r}: {type(exc).__name__}: {exc}") \
                from None
