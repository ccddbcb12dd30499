"""A JSONL file of OpenAI chat fine-tuning examples, checked and split into ``POST /train`` requests.

Each non-blank line is one example, ``{"messages": [...]}``, exactly as OpenAI's fine-tuning API takes it.
Every line is checked with the server's own parser (``server/train_request.py``) against the limits the
server announces (``GET /train/limits``), so a file this module accepts is refused by the server only for
what needs the model's tokenizer (chat template, token count). The requests it builds hold at most
``max_examples`` examples and ``max_body_bytes`` bytes each; each carries an ``Idempotency-Key`` made from the
file's content, the options and its position, so running the same command again replays the same jobs
instead of training twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onlinemodel_protocol.api import TrainLimits
from onlinemodel_runtime.server.train_request import ExampleError, check_length, parse_train_request

SHOWN_ERRORS = 20  # bad lines listed before "... and N more"
_OPTIONS = ("epochs", "learning_rate")


class TrainFileError(ValueError):
    """The file cannot be sent; the message names every bad line (up to SHOWN_ERRORS)."""


class OptionError(ValueError):
    """--epochs or --learning-rate is out of the server's range."""


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as editors count
    example: dict[str, Any]


@dataclass(frozen=True)
class Request:
    """One ``POST /train``: its body, the file lines it holds, and its Idempotency-Key."""

    body: dict[str, Any]
    lines: tuple[int, ...]
    idempotency_key: str

    @property
    def steps(self) -> int:
        return len(self.lines) * self.body["epochs"]


def _encoded_size(body: dict[str, Any]) -> int:
    # json.dumps' defaults (ASCII escapes, spaces) are never shorter than what an HTTP client sends.
    return len(json.dumps(body).encode())


def _check_line(number: int, text: str, options: dict[str, Any], limits: TrainLimits) -> Line:
    try:
        example = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise TrainFileError(f"line {number}: not valid JSON: {exc}") from None
    if not isinstance(example, dict):
        raise TrainFileError(f"line {number}: expected an object {{\"messages\": [...]}}, "
                             f"found {type(example).__name__}")
    try:
        request = parse_train_request({"examples": [example], **options}, limits)
        if limits.max_model_len is not None:
            check_length(request.examples[0].messages, limits.max_model_len, "examples[0]")
    except ExampleError as exc:
        if exc.param in _OPTIONS:
            raise OptionError(f"--{exc.param.replace('_', '-')}: {exc.message}") from None
        field = (exc.param or "").removeprefix("examples[0]").lstrip(".")
        raise TrainFileError(f"line {number}: {field + ': ' if field else ''}{exc.message}") from None
    if _encoded_size({"examples": [example], **options}) > limits.max_body_bytes:
        raise TrainFileError(f"line {number}: the example alone is larger than the server's request limit "
                             f"({limits.max_body_bytes} bytes, --max-body-bytes)")
    return Line(number, example)


def read_examples(path: Path, limits: TrainLimits, *, epochs: int | None = None,
                  learning_rate: float | None = None) -> list[Line]:
    """Every example of the file, checked; raises TrainFileError naming the bad lines (nothing is sent
    then), or OptionError."""
    options = {k: v for k, v in {"epochs": epochs, "learning_rate": learning_rate}.items() if v is not None}
    lines, errors = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
            if text.strip():
                lines.append(_check_line(number, text, options, limits))
        except UnicodeDecodeError as exc:
            errors.append(f"line {number}: not UTF-8 ({exc.reason})")
        except TrainFileError as exc:
            errors.append(str(exc))
    if errors:
        more = f"\n... and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        raise TrainFileError("\n".join(errors[:SHOWN_ERRORS]) + more)
    if not lines:
        raise TrainFileError(f"{path}: no examples (one JSON object with 'messages' per line)")
    return lines


def split_requests(lines: list[Line], limits: TrainLimits, *, epochs: int | None = None,
                   learning_rate: float | None = None) -> list[Request]:
    """Consecutive lines packed into requests of at most max_examples examples and max_body_bytes bytes.
    The server's defaults fill what is not given, so every request names its epochs (progress needs it)."""
    options: dict[str, Any] = {"epochs": epochs or limits.default_epochs}
    if learning_rate is not None:
        options["learning_rate"] = learning_rate
    digest = hashlib.sha256(json.dumps([options, [line.example for line in lines]], sort_keys=True).encode())
    groups: list[list[Line]] = [[]]
    for line in lines:
        group = groups[-1]
        candidate = {"examples": [ln.example for ln in group] + [line.example], **options}
        if group and (len(group) >= limits.max_examples or _encoded_size(candidate) > limits.max_body_bytes):
            groups.append([line])
        else:
            group.append(line)
    return [Request(body={"examples": [ln.example for ln in group], **options},
                    lines=tuple(ln.number for ln in group),
                    idempotency_key=f"onlinemodel-train-{digest.hexdigest()[:40]}-{i + 1}-of-{len(groups)}")
            for i, group in enumerate(groups)]
