"""`onlinemodel serve` before it starts vLLM: the vLLM command, the plugin allow-list, the API token, the
private state directory, resuming from a checkpoint and refusing another model's checkpoints."""

from __future__ import annotations

import http.server
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from onlinemodel_protocol.api import CheckpointRecord
from onlinemodel_protocol.config import ENV_API_TOKEN, ENV_CONFIG, ENV_VLLM_API_KEY, RuntimeConfig
from onlinemodel_protocol.limits import MAX_DECODE_SLOWDOWN_DEFAULT
from onlinemodel_protocol.rpc import (ENDPOINT_PLUGIN, EXIT_MODEL_CHANGED, EXIT_USAGE, GENERAL_PLUGIN, STAT_LOGGER_PLUGIN,
                                      WORKER_EXTENSION_CLS)
from onlinemodel_runtime import cli
from onlinemodel_runtime.checkpoint import CheckpointStore
from onlinemodel_runtime.server import state_dir as state_dir_module


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    for name in (ENV_API_TOKEN, ENV_VLLM_API_KEY):
        monkeypatch.delenv(name, raising=False)


def parse(argv):
    parser = cli.argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._serve_parser(sub)
    return parser.parse_known_args(argv)


def prepare(argv, tmp_path, monkeypatch=None, token="secret"):
    if token is not None and monkeypatch is not None:
        monkeypatch.setenv(ENV_API_TOKEN, token)
    args, extra = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path / "state"), *argv])
    return cli.prepare(args, extra)


def test_vllm_command_has_plugins_extension_and_passthrough(tmp_path):
    args, unknown = parse(["serve", "--model", "/m", "--port", "9000", "--max-model-len", "1024",
                           "--enforce-eager", "--state-dir", str(tmp_path)])
    cfg = cli.build_config(args, tmp_path)
    cmd = cli.vllm_command(cfg, args, unknown)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--worker-extension-cls") + 1] == WORKER_EXTENSION_CLS
    assert cmd[cmd.index("--served-model-name") + 1] == "/m"
    assert "--enforce-eager" in cmd and cmd[cmd.index("--max-model-len") + 1] == "1024"
    env = cli.vllm_env(cfg)
    assert set(env["VLLM_PLUGINS"].split(",")) >= {GENERAL_PLUGIN, ENDPOINT_PLUGIN, STAT_LOGGER_PLUGIN}
    assert RuntimeConfig.model_validate_json(env[ENV_CONFIG]) == cfg


def test_existing_plugins_stay_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    args, _ = parse(["serve", "--model", "/m"])
    assert cli.vllm_env(cli.build_config(args, tmp_path))["VLLM_PLUGINS"].split(",")[0] == "other"


@pytest.mark.parametrize("flag,value", [("--learning-rate", "-1"), ("--learning-rate", "1.5"),
                                        ("--optimizer-rank", "0"), ("--max-examples", "0"),
                                        ("--max-body-bytes", "10"), ("--checkpoint-every-steps", "-1"),
                                        ("--max-decode-slowdown", "1000")])
def test_bad_settings_are_refused(tmp_path, monkeypatch, flag, value):
    with pytest.raises(cli.Refused, match=flag) as refused:
        prepare([flag, value], tmp_path, monkeypatch)
    assert refused.value.code == EXIT_USAGE


def test_config_round_trips_through_json(tmp_path):
    cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path)
    assert RuntimeConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg


# --- the API token ------------------------------------------------------------------------------

def test_serve_without_a_token_refuses_to_start(tmp_path, capsys):
    code = cli.main(["serve", "--model", "/m", "--state-dir", str(tmp_path / "state")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "need an API token" in err and ENV_API_TOKEN in err and "--insecure-open-training" in err
    assert not (tmp_path / "state").exists()  # refused before anything was created


@pytest.mark.parametrize("value", ["", "  ", "\n"])
def test_an_empty_token_is_an_error_not_auth_off(tmp_path, monkeypatch, value):
    with pytest.raises(cli.Refused, match="set but empty") as refused:
        prepare([], tmp_path, monkeypatch, token=value)
    assert refused.value.code == EXIT_USAGE
    monkeypatch.delenv(ENV_API_TOKEN)
    monkeypatch.setenv(ENV_VLLM_API_KEY, value)
    with pytest.raises(cli.Refused, match=f"{ENV_VLLM_API_KEY} is set but empty"):
        prepare([], tmp_path, monkeypatch, token=None)


def test_a_token_from_a_file_loses_its_newline(tmp_path, monkeypatch):
    cfg, _, tokens = prepare([], tmp_path, monkeypatch, token="s3cret\n")
    assert tokens == ("s3cret",)
    assert cli.vllm_env(cfg)[ENV_API_TOKEN] == "s3cret"  # what the plugin in vLLM's process reads


def test_vllm_api_key_alone_protects_training(tmp_path, monkeypatch):
    cfg, extra, tokens = prepare(["--api-key", " k1\n", "k2", "--enforce-eager"], tmp_path, token=None)
    assert tokens == ("k1", "k2") and cfg.open_training is False
    assert extra == ["--api-key", "k1", "k2", "--enforce-eager"]  # vLLM compares the same, stripped keys
    _, extra, tokens = prepare(["--api-key=k3\n"], tmp_path, token=None)
    assert tokens == ("k3",) and extra == ["--api-key=k3"]
    monkeypatch.setenv(ENV_VLLM_API_KEY, "k4\n")
    cfg, _, tokens = prepare([], tmp_path, token=None)
    assert tokens == ("k4",) and cli.vllm_env(cfg)[ENV_VLLM_API_KEY] == "k4"
    # Our own token wins when both are set: it guards /train, vLLM's key /v1.
    monkeypatch.setenv(ENV_API_TOKEN, "ours")
    assert prepare(["--api-key", "theirs"], tmp_path, token=None)[2] == ("ours",)


def test_serve_only_needs_no_token_and_open_training_is_a_loud_decision(tmp_path, caplog):
    cfg, _, tokens = prepare(["--no-training"], tmp_path, token=None)
    assert tokens == () and not cfg.training_enabled
    with caplog.at_level(logging.WARNING, logger="onlinemodel"):
        cfg, _, tokens = prepare(["--insecure-open-training"], tmp_path, token=None)
    assert tokens == () and cfg.open_training
    assert "NO token" in caplog.text


class _CheckpointHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_POST(self):
        self.seen.append(self.headers.get("Authorization"))
        body = CheckpointRecord(path="/c/step-00000001", step=1).model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_checkpoint_commands_send_the_stripped_token(tmp_path, monkeypatch, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _CheckpointHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        monkeypatch.setenv(ENV_API_TOKEN, "tok\n")
        assert cli.main(["checkpoint", "--url", url]) == 0
        monkeypatch.delenv(ENV_API_TOKEN)
        monkeypatch.setenv(ENV_VLLM_API_KEY, " key ")
        assert cli.main(["checkpoint", "--url", url]) == 0
        cfg = RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path, checkpoint_dir=tmp_path / "c")
        cli.final_checkpoint(cfg, server.server_port, ("final",))
    finally:
        server.shutdown()
    assert _CheckpointHandler.seen == ["Bearer tok", "Bearer key", "Bearer final"]


@pytest.mark.parametrize("value,budget", [(None, MAX_DECODE_SLOWDOWN_DEFAULT), ("1.5", 1.5), ("off", 0.0),
                                          ("OFF", 0.0), ("0", 0.0)])
def test_max_decode_slowdown(tmp_path, value, budget):
    flag = ["--max-decode-slowdown", value] if value is not None else []
    args, _ = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path), *flag])
    assert cli.build_config(args, tmp_path).max_decode_slowdown == budget


def test_max_decode_slowdown_refuses_nonsense(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "/m", "--max-decode-slowdown", "fast"])
    assert "neither a number nor 'off'" in capsys.readouterr().err
    with pytest.raises(cli.Refused, match="max_decode_slowdown 0.5 is below 1") as refused:
        prepare(["--max-decode-slowdown", "0.5"], tmp_path, monkeypatch)
    assert refused.value.code == EXIT_USAGE


@pytest.mark.parametrize("flag,value", [([], None), (["--activation-recompute"], True),
                                        (["--no-activation-recompute"], False)])
def test_activation_recompute_flag(tmp_path, flag, value):
    args, _ = parse(["serve", "--model", "/m", "--state-dir", str(tmp_path), *flag])
    assert cli.build_config(args, tmp_path).activation_recompute is value


def test_checkpoint_command_reports_unreachable_server(capsys):
    assert cli.main(["checkpoint", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "checkpoint failed" in capsys.readouterr().err


# --- the state directory ------------------------------------------------------------------------

def test_default_state_dir_is_a_fresh_private_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_API_TOKEN, "t")
    args, extra = parse(["serve", "--model", "/m"])
    cfg, _, _ = cli.prepare(args, extra)
    try:
        info = os.lstat(cfg.state_dir)
        assert info.st_mode & 0o777 == 0o700 and info.st_uid == os.geteuid()
        assert cfg.state_dir.name.startswith("onlinemodel-")
    finally:
        cfg.state_dir.rmdir()


def test_explicit_state_dir_is_created_private(tmp_path, monkeypatch):
    cfg, _, _ = prepare([], tmp_path, monkeypatch)
    assert cfg.state_dir == tmp_path / "state" and os.lstat(cfg.state_dir).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("problem", ["group-readable", "world-writable", "foreign-owned", "symlink", "file"])
def test_a_state_dir_others_can_reach_is_refused(tmp_path, monkeypatch, problem):
    target = tmp_path / "state"
    if problem == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "real")
    elif problem == "file":
        target.write_text("")
    else:
        target.mkdir(mode=0o700)
        os.chmod(target, {"group-readable": 0o750, "world-writable": 0o777}.get(problem, 0o700))
    if problem == "foreign-owned":  # as if another user had created it first
        uid = os.geteuid()
        monkeypatch.setattr(state_dir_module.os, "geteuid", lambda: uid + 1)
    with pytest.raises(cli.Refused, match="state directory") as refused:
        prepare([], tmp_path, monkeypatch)
    assert refused.value.code == EXIT_USAGE


# --- checkpoints: resume, model change ----------------------------------------------------------

def _checkpoint(root: Path, base_dir: Path, base_model: str, step: int = 5):
    return CheckpointStore(root).save([("model.norm.weight", torch.ones(4))], base_model_dir=base_dir,
                                      base_model=base_model, trainer_state={"step": step})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from onlinemodel_runtime.devtools.model_prep import make_tiny_model_dir

    return make_tiny_model_dir("qwen3", tmp_path_factory.mktemp("base") / "base", num_hidden_layers=1)


def test_serves_the_latest_checkpoint_when_there_is_one(tmp_path, monkeypatch, base_dir):
    info = _checkpoint(tmp_path / "ckpt", base_dir, str(base_dir))
    args, extra = parse(["serve", "--model", str(base_dir), "--checkpoint-dir", str(tmp_path / "ckpt"),
                         "--state-dir", str(tmp_path / "s")])
    monkeypatch.setenv(ENV_API_TOKEN, "t")
    cfg, _, _ = cli.prepare(args, extra)
    assert cfg.model == str(info.path) and cfg.base_model == str(base_dir)
    cmd = cli.vllm_command(cfg, args, [])
    assert cmd[cmd.index("--served-model-name") + 1] == str(base_dir)


def test_a_changed_model_is_refused_with_its_own_exit_code(tmp_path, monkeypatch, capsys, base_dir):
    _checkpoint(tmp_path / "ckpt", base_dir, "Qwen/Qwen3-0.6B")
    monkeypatch.setenv(ENV_API_TOKEN, "t")
    monkeypatch.setattr(cli, "make_state_dir", lambda: Path(tempfile.mkdtemp(dir=tmp_path)))
    argv = ["serve", "--model", "Qwen/Qwen3-1.7B", "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert cli.main(argv) == EXIT_MODEL_CHANGED
    err = capsys.readouterr().err
    assert "'Qwen/Qwen3-0.6B'" in err and "'Qwen/Qwen3-1.7B'" in err and "--start-over" in err
    assert (tmp_path / "ckpt" / "latest").exists()  # nothing moved
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the temp state dir was removed again


def test_start_over_moves_the_old_checkpoints_aside(tmp_path, monkeypatch, base_dir):
    old = _checkpoint(tmp_path / "ckpt", base_dir, "Qwen/Qwen3-0.6B")
    cfg, _, _ = prepare(["--model", "Qwen/Qwen3-1.7B", "--checkpoint-dir", str(tmp_path / "ckpt"), "--start-over"],
                        tmp_path, monkeypatch)
    assert cfg.model == cfg.base_model == "Qwen/Qwen3-1.7B"  # from the new model, not the old checkpoint
    (aside,) = [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("previous-")]
    assert sorted(p.name for p in aside.iterdir()) == ["latest", old.path.name]  # moved, not deleted
    assert CheckpointStore(tmp_path / "ckpt").latest() is None
    # The same model again: --start-over changes nothing (a deployment may keep the flag set).
    new = _checkpoint(tmp_path / "ckpt", base_dir, "Qwen/Qwen3-1.7B", step=9)
    cfg, _, _ = prepare(["--model", "Qwen/Qwen3-1.7B", "--checkpoint-dir", str(tmp_path / "ckpt"), "--start-over"],
                        tmp_path, monkeypatch)
    assert cfg.model == str(new.path)


def test_guard_file_is_read_validated_and_passed_in_the_config(tmp_path, monkeypatch):
    guard = tmp_path / "guard.yaml"
    guard.write_text("probes:\n  - messages: [{role: user, content: hi}]\n    expect: hello\n")
    cfg, _, _ = prepare(["--guard", str(guard)], tmp_path, monkeypatch)
    assert cfg.guard.probes[0].expect == "hello"
    assert type(cfg).model_validate_json(cfg.model_dump_json()) == cfg  # what the plugin and trainer read
    assert prepare([], tmp_path, monkeypatch)[0].guard is None
    guard.write_text("probes: []\n")
    with pytest.raises(cli.Refused, match=f"--guard {guard}: guard: a guard needs at least one probe") as refused:
        prepare(["--guard", str(guard)], tmp_path, monkeypatch)
    assert refused.value.code == EXIT_USAGE
    with pytest.raises(cli.Refused, match="cannot read it"):
        prepare(["--guard", str(tmp_path / "missing.yaml")], tmp_path, monkeypatch)


def test_anchor_file_is_read_validated_and_passed_in_the_config(tmp_path, monkeypatch):
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text("builtin: false\nconversations:\n  - messages: [{role: user, content: hi}, "
                       "{role: assistant, content: hello}]\n")
    cfg, _, _ = prepare(["--anchor-file", str(anchors)], tmp_path, monkeypatch)
    assert cfg.anchor_file.conversations[0].messages[1].content == "hello" and not cfg.anchor_file.builtin
    assert type(cfg).model_validate_json(cfg.model_dump_json()) == cfg  # what the plugin and trainer read
    assert prepare([], tmp_path, monkeypatch)[0].anchor_file is None
    with pytest.raises(cli.Refused, match="anchor_weight.*is 0") as refused:
        prepare(["--anchor-file", str(anchors), "--anchor-weight", "0"], tmp_path, monkeypatch)
    assert refused.value.code == EXIT_USAGE
    anchors.write_text("conversations:\n  - messages: [{role: user, content: hi}]\n")
    with pytest.raises(cli.Refused, match=f"--anchor-file {anchors}: conversations.0.messages: List should have at "
                                          "least 2 items") as refused:
        prepare(["--anchor-file", str(anchors)], tmp_path, monkeypatch)
    assert refused.value.code == EXIT_USAGE
    with pytest.raises(cli.Refused, match="cannot read it"):
        prepare(["--anchor-file", str(tmp_path / "missing.yaml")], tmp_path, monkeypatch)
